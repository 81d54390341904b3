"""``GET /backends`` stays cheap with thousands of members: counts by state for all, a page of members."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from prequal_middleware import Gateway, HealthSettings, UpstreamPool
from tests.browser import dump_dom, parse_dom
from tests.helpers import gateway_app
from tests.servers import ServerThread, serve

MEMBERS = 250


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    upstreams = [f"http://127.0.0.1:{20000 + i}" for i in range(MEMBERS)]
    off = HealthSettings(path=None)
    gateway = Gateway(
        pools=[UpstreamPool("/api", upstreams=upstreams, policy="round_robin", health=off), UpstreamPool("/b")]
    )
    with serve(gateway_app(gateway)) as s:
        yield s


def backends(server: ServerThread, query: str = "") -> httpx.Response:
    return httpx.get(server.url + "/_prequal/backends" + query, timeout=10)


def test_a_page_of_members_and_counts_for_all(server: ServerThread) -> None:
    pool = next(p for p in backends(server).json()["pools"] if p["prefix"] == "/api")
    assert pool["member_count"] == MEMBERS
    assert sum(pool["member_states"].values()) == MEMBERS and pool["member_states"]["healthy"] == MEMBERS
    assert pool["members_offset"] == 0
    assert [m["url"] for m in pool["members"]] == [f"http://127.0.0.1:{20000 + i}" for i in range(100)]


def test_pages_and_one_pool(server: ServerThread) -> None:
    reply = backends(server, "?pool=/api&offset=200&limit=1000").json()
    assert [p["prefix"] for p in reply["pools"]] == ["/api"]
    (pool,) = reply["pools"]
    assert pool["members_offset"] == 200 and pool["member_count"] == MEMBERS
    assert [m["url"] for m in pool["members"]] == [f"http://127.0.0.1:{20000 + i}" for i in range(200, MEMBERS)]
    assert len(backends(server, "?limit=1000").json()["pools"][0]["members"]) == MEMBERS
    assert backends(server, "?offset=9999").json()["pools"][0]["members"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=abc", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=%D9%A3", "limit"),  # an Arabic-Indic digit: int() would take it
        ("?offset=-5", "offset"),
        ("?offset=1e3", "offset"),
        ("?pool=/nope", "pool"),
    ],
)
def test_bad_queries_name_the_field(server: ServerThread, query: str, field: str) -> None:
    reply = backends(server, query)
    assert reply.status_code == 400 and reply.json()["field"] == field, reply.text


def test_the_status_page_says_how_many_it_shows(server: ServerThread) -> None:
    page = parse_dom(dump_dom(server.url + "/_prequal/"))
    api = page.find("section", data_pool_prefix="/api")
    assert api.find("p", data_field="members-shown").text.strip().startswith("Members 1\u2013100 of 250")
    assert len(api.find_all("tr", data_member_url=None)) == 100
    assert page.find("section", data_pool_prefix="/b").find_all("p", data_field="members-shown") == []

"""Hostile registrations through a real uvicorn gateway: one spelling per backend, no special addresses,
bounded pools and a bounded write rate. Every refusal names the field and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from prequal_middleware import AdminSettings, Gateway, HealthSettings, UpstreamPool
from prequal_middleware.registry.registration import WriteRate
from tests.helpers import gateway_app, members
from tests.servers import serve

OFF = HealthSettings(path=None)


def gateway_url(**admin: Any) -> Iterator[str]:
    settings = AdminSettings(trust_loopback=True, **admin)
    gateway = Gateway(pools=[UpstreamPool("/api", health=OFF)], admin=settings)
    with serve(gateway_app(gateway), proxy_headers=False) as server:
        yield server.url


@pytest.fixture
def url() -> Iterator[str]:
    yield from gateway_url(max_writes_per_s=1000.0)


def register(url: str, backend: str) -> httpx.Response:
    return httpx.post(url + "/_prequal/register", json={"url": backend})


def test_one_spelling_per_backend(url: str) -> None:
    for spelling in ("http://LOCALHOST:080/", "HTTP://localhost:80", "http://localhost.:0080//", "http://localhost:80"):
        reply = register(url, spelling)
        assert reply.status_code == 201, (spelling, reply.text)
        assert reply.json()["url"] == "http://localhost:80"
    for spelling in ("http://[0:0:0:0:0:0:0:1]:81", "http://[::1]:81"):
        assert register(url, spelling).json()["url"] == "http://[::1]:81"
    assert sorted(members(url)) == ["http://[::1]:81", "http://localhost:80"]


@pytest.mark.parametrize(
    "spelling",
    [
        "http://2130706433:80",  # 127.0.0.1 as one number: the C resolver accepts it
        "http://0x7f.1:80",
        "http://0x7f000001:80",
        "http://127.1:80",
        "http://017700000001:80",
        "http://127.000.000.001:80",
        "http://[::ffff:127.0.0.1]:80",
        "http://[::ffff:7f00:1]:80",
        "http://[fe80::1%25eth0]:80",
        "http://127.0.0.1:80?",
        "http://127.0.0.1:80#",
        "http://127.0.0.1:80/?",
        "http://127.0.0.1:80/base/../admin",
        "http://loc%61lhost:80",
        "http://local_host:80",
    ],
)
def test_other_spellings_are_refused(url: str, spelling: str) -> None:
    reply = register(url, spelling)
    assert reply.status_code == 400, reply.text
    assert reply.json()["field"] == "url"
    assert members(url) == {}


@pytest.mark.parametrize(
    "backend",
    [
        "http://169.254.169.254:80",
        "http://169.254.0.1:8080",
        "http://[fe80::1]:80",
        "http://0.0.0.0:80",
        "http://0.1.2.3:80",
        "http://[::]:80",
        "http://224.0.0.1:80",
        "http://[ff02::1]:80",
        "http://255.255.255.255:80",
    ],
)
def test_special_addresses_are_refused_unless_listed(url: str, backend: str) -> None:
    reply = register(url, backend)
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"] == "forbidden_upstream" and reply.json()["field"] == "url"
    assert members(url) == {}


def test_a_listed_link_local_network_allows_it() -> None:
    for url in gateway_url(allowed_upstreams=("169.254.10.0/24", "0.0.0.0/0")):
        assert register(url, "http://169.254.10.7:80").status_code == 201
        # 0.0.0.0/0 allows every host, but it is not an explicit allowance of link-local addresses.
        assert register(url, "http://169.254.169.254:80").status_code == 403
        assert register(url, "http://10.1.2.3:80").status_code == 201


def test_a_pool_has_at_most_max_members() -> None:
    for url in gateway_url(max_members_per_pool=3, max_writes_per_s=1000.0):
        for port in (9001, 9002, 9003):
            assert register(url, f"http://127.0.0.1:{port}").status_code == 201
        full = register(url, "http://127.0.0.1:9004")
        assert full.status_code == 409 and full.json()["error"] == "pool_full" and full.json()["field"] == "pool"
        assert register(url, "http://127.0.0.1:9002").status_code == 201, "a member may register again"
        assert sorted(members(url)) == [f"http://127.0.0.1:{p}" for p in (9001, 9002, 9003)]


def test_admin_writes_are_rate_limited() -> None:
    for url in gateway_url(max_writes_per_s=2.0):
        statuses = [register(url, f"http://127.0.0.1:{9100 + i}").status_code for i in range(8)]
        assert statuses[:4] == [201] * 4, statuses  # a burst of twice the rate
        assert 429 in statuses[4:], statuses
        limited = register(url, "http://127.0.0.1:9200")
        assert limited.status_code == 429 and limited.json()["error"] == "too_many_writes"
        assert 1 <= int(limited.headers["retry-after"]) <= 1
        assert "http://127.0.0.1:9200" not in members(url)
        time.sleep(0.6)
        assert register(url, "http://127.0.0.1:9201").status_code == 201, "the bucket refills"


def test_write_rate_is_a_token_bucket() -> None:
    bucket = WriteRate(4.0)
    assert [bucket.take(0.0) for _ in range(8)] == [0.0] * 8  # burst of 8
    assert bucket.take(0.0) == pytest.approx(0.25)
    assert bucket.take(0.25) == 0.0
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(100.0) == 0.0
    assert sum(1 for _ in range(20) if bucket.take(100.0) == 0.0) == 7, "refilled to the burst, no more"

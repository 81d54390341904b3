"""The status page, rendered by a real headless Chromium against a JSON fixture on a loopback server."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from prequal_middleware.admin.status_page import STATUS_PAGE_CSP, STATUS_PAGE_HTML, status_page
from tests.browser import Element, dump_dom, parse_dom
from tests.servers import serve

DASH = "\u2014"
HOSTILE = "<img src=x onerror=alert(1)>"
STATIC_FILES = ("status.css", "status.js", "status.html")
HOSTILE_URL = 'http://10.0.0.9:8000/"><img src=x onerror=alert(2)>'


def member(url: str, state: str, **fields: Any) -> dict[str, Any]:
    return {
        "url": url,
        "state": state,
        "probe_mode": "probe",
        "weight": 1.0,
        "rif": 2,
        "latency_ms": 12.3,
        "in_flight": 1,
        "lease_expires_in_s": 8.2,
        "ejected_for_s": None,
        "consecutive_failures": 0,
        "failure_rate": 0.0,
        "source": "registered",
        "metadata": {"zone": "a"},
        **fields,
    }


FIXTURE: dict[str, Any] = {
    "state": "running",
    "registry": {"kind": "redis", "version": 12, "stale": True, "stale_for_s": 42.0},
    "pools": [
        {
            "prefix": "/api",
            "policy": "prequal",
            "in_flight": 3,
            "clients": 1,
            "pool_size": 12,
            "pool_capacity": 16,
            "rif_threshold": 3.0,
            "panic": False,
            "selections": {"cold": 10, "hot": 2, "fallback": 1, "panic": 0, "policy": 0},
            "members": [
                member("http://127.0.0.1:8001", "healthy"),
                member("http://127.0.0.1:8002", "unhealthy", consecutive_failures=4, failure_rate=0.5),
                member("http://127.0.0.1:8003", "ejected", probe_mode="local", ejected_for_s=12.5),
                member("http://127.0.0.1:8004", "draining", rif=0, in_flight=0),
            ],
        },
        {
            "name": "legacy",  # a named pool two routes lead to
            "prefix": "/legacy",
            "routes": ["/legacy", "/old"],
            "policy": "round_robin",
            "in_flight": 0,
            "clients": 1,
            "pool_size": None,
            "pool_capacity": None,
            "rif_threshold": None,
            "panic": True,
            "selections": {"cold": 0, "hot": 0, "fallback": 0, "panic": 3, "policy": 7},
            "members": [
                member(
                    HOSTILE_URL,
                    "healthy",
                    probe_mode="local",
                    rif=None,
                    latency_ms=None,
                    lease_expires_in_s=None,
                    source="static",
                    metadata={"note": HOSTILE},
                ),
            ],
        },
    ],
}
HISTORY: dict[str, Any] = {
    "window_s": 300,
    "step_s": 5,
    "age_s": [15.0, 10.0, 5.0, 0.0],
    "rps": [40.0, 38.5, 0.0, 41.5],
    "p99_ms": [12.0, 14.5, None, 11.0],
    "backends": [
        {"url": HOSTILE_URL, "share": [0.5, 0.6, None, 0.7]},
        {"url": "http://127.0.0.1:8001", "share": [0.3, 0.4, None, 0.3]},
        {"url": None, "share": [0.2, 0.0, None, 0.0]},
    ],
}
FIXTURE["pools"][1]["history"] = HISTORY
FIXTURE["pools"][0]["history"] = None  # not sampled yet
EXPECTED_STATES = {
    "http://127.0.0.1:8001": "healthy",
    "http://127.0.0.1:8002": "unhealthy",
    "http://127.0.0.1:8003": "ejected",
    "http://127.0.0.1:8004": "draining",
    HOSTILE_URL: "healthy",
}


def gateway_admin(backends: Callable[[Request], Response]) -> Starlette:
    """The page at ``/_prequal/`` (and ``/_prequal``), ``backends`` at ``/_prequal/backends``."""

    async def endpoint(request: Request) -> Response:
        return backends(request)

    return Starlette(
        routes=[
            Route("/_prequal", status_page),
            Mount("/_prequal", routes=[Route("/", status_page), Route("/backends", endpoint)]),
        ]
    )


def fixture_json(request: Request) -> Response:
    return JSONResponse(FIXTURE)


def render(backends: Callable[[Request], Response], path: str = "/_prequal/") -> Element:
    with serve(gateway_admin(backends)) as server:
        return parse_dom(dump_dom(server.url + path))


def cell(row: Element, field: str) -> str:
    return row.find("td", data_field=field).text.strip()


@pytest.fixture(scope="module")
def page() -> Element:
    return render(fixture_json)


def test_members_render_with_their_state(page: Element) -> None:
    rows = page.find_all("tr", data_member_url=None)
    assert {row.attrs["data-member-url"]: row.attrs["data-state"] for row in rows} == EXPECTED_STATES
    for url, state in EXPECTED_STATES.items():
        row = page.find("tr", data_member_url=url)
        assert cell(row, "url") == url
        assert cell(row, "state").startswith(state)
    api_rows = page.find("section", data_pool_prefix="/api").find_all("tr", data_member_url=None)
    assert [row.attrs["data-member-url"] for row in api_rows] == [f"http://127.0.0.1:{p}" for p in range(8001, 8005)]

    healthy = page.find("tr", data_member_url="http://127.0.0.1:8001")
    assert healthy.attrs["data-probe-mode"] == "probe"
    assert {f: cell(healthy, f) for f in ("rif", "latency_ms", "in_flight", "weight", "lease_expires_in_s")} == {
        "rif": "2",
        "latency_ms": "12.3",
        "in_flight": "1",
        "weight": "1",
        "lease_expires_in_s": "8.2",
    }
    assert cell(page.find("tr", data_member_url="http://127.0.0.1:8002"), "consecutive_failures") == "4"
    ejected = page.find("tr", data_member_url="http://127.0.0.1:8003")
    assert ejected.attrs["data-probe-mode"] == "local"
    assert cell(ejected, "state") == "ejected (12.5 s left)"
    # "local" is explained where it is shown, and in the legend.
    local_badge = ejected.find("td", data_field="probe_mode").find("span")
    assert "answers no probes" in (local_badge.attrs["title"] or "")
    assert "answers no probes" in page.by_id("legend").text


def test_nulls_render_as_dashes(page: Element) -> None:
    row = page.find("tr", data_member_url=HOSTILE_URL)
    for field in ("rif", "latency_ms", "lease_expires_in_s"):
        assert cell(row, field) == DASH, field
    legacy = page.find("section", data_pool_prefix="/legacy")
    assert legacy.find("div", data_field="pool").find("dd").text.strip() == DASH
    assert legacy.find("div", data_field="rif_threshold").find("dd").text.strip() == DASH


def test_pools_show_prefix_policy_and_counters(page: Element) -> None:
    sections = page.find_all("section", data_pool_prefix=None)
    assert [(s.attrs["data-pool-prefix"], s.attrs["data-policy"]) for s in sections] == [
        ("/api", "prequal"),
        ("/legacy", "round_robin"),
    ]
    api, legacy = sections
    assert api.find("h2").text == "/api"
    assert api.find_all("span", data_field="routes") == []  # named by its one prefix: nothing more to say
    assert legacy.find("h2").text == "legacy"
    assert legacy.find("span", data_field="routes").text == "/legacy /old"
    assert api.find("span", data_field="policy").text == "prequal"
    assert legacy.find("span", data_field="policy").text == "round_robin"
    assert api.find("div", data_field="pool").find("dd").text.strip() == "12 / 16"
    assert api.find("div", data_field="rif_threshold").find("dd").text.strip() == "3"
    assert api.find("div", data_field="in_flight").find("dd").text.strip() == "3"

    assert api.attrs["data-panic"] == "false" and legacy.attrs["data-panic"] == "true"
    assert "PANIC" in legacy.find("div", class_="pool-head").text
    assert "PANIC" not in api.find("div", class_="pool-head").text

    cold = api.find("tr", data_selection="cold")
    assert (cold.attrs["data-count"], cold.attrs["data-share"]) == ("10", "0.7692")
    assert "76.9%" in cold.text
    assert [r.attrs["data-selection"] for r in api.find_all("tr", data_selection=None)] == [
        "cold",
        "hot",
        "fallback",
        "panic",
        "policy",
    ]
    assert legacy.find("tr", data_selection="policy").attrs["data-share"] == "0.7000"
    assert legacy.find("tr", data_selection_total=None).attrs["data-selection-total"] == "10"


def test_registry_and_refresh(page: Element) -> None:
    registry = page.by_id("registry")
    assert registry.attrs["data-stale"] == "true"
    assert "redis" in registry.text and "12" in registry.text and "STALE" in registry.text
    banner = page.by_id("registry-stale")
    assert not banner.is_hidden()
    assert "STALE for 42.0 s" in banner.text
    assert "registry-stale" in (page.find("body").attrs["class"] or "")

    assert page.by_id("gateway-state").text == "running"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", page.by_id("last-refresh").text)
    assert page.by_id("error-banner").is_hidden()
    assert page.find("body").attrs["data-fetch"] == "ok"


def test_hostile_strings_stay_text(page: Element) -> None:
    row = page.find("tr", data_member_url=HOSTILE_URL)
    assert HOSTILE in cell(row, "metadata")
    assert HOSTILE_URL == cell(row, "url")
    assert page.find_all("img") == []
    assert not any(name.startswith("on") for node in page.iter() for name in node.attrs)


def test_fresh_registry_and_page_without_trailing_slash() -> None:
    fresh = {**FIXTURE, "registry": {"kind": "memory", "version": 3, "stale": False, "stale_for_s": None}}
    page = render(lambda request: JSONResponse(fresh), path="/_prequal")
    assert len(page.find_all("tr", data_member_url=None)) == len(EXPECTED_STATES)
    assert page.by_id("registry").attrs["data-stale"] == "false"
    assert page.by_id("registry-stale").is_hidden()
    assert "fresh" in page.by_id("registry").text


def test_endpoint_serves_a_self_contained_page() -> None:
    with serve(gateway_admin(fixture_json)) as server:
        response = httpx.get(server.url + "/_prequal/")
        head = httpx.head(server.url + "/_prequal/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert response.text == STATUS_PAGE_HTML
    assert head.status_code == 200

    html = STATUS_PAGE_HTML
    # The SVG namespace is a name (createElementNS), never fetched: the one URL the page may hold.
    assert not re.search(r"https?://", html.replace('"http://www.w3.org/2000/svg"', ""))
    assert not re.search(r"<script[^>]*\ssrc\s*=", html, re.I)
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']?(https?:)?//", html, re.I)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert not re.search(r"@import|url\(|@font-face", style, re.I)
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html

    # The CSP allows exactly the page's inline script and style, by hash.
    csp = response.headers["content-security-policy"]
    assert csp == STATUS_PAGE_CSP
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_fetch_failure_shows_the_error_banner() -> None:
    page = render(lambda request: Response("boom", status_code=500))
    banner = page.by_id("error-banner")
    assert not banner.is_hidden()
    assert "HTTP 500" in banner.text and "No data yet" in banner.text
    assert page.find("body").attrs["data-fetch"] == "error"
    assert page.find_all("tr", data_member_url=None) == []
    assert page.by_id("last-refresh").text == "never"


def test_fetch_failure_keeps_the_last_data() -> None:
    calls = 0

    def first_then_fail(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return JSONResponse(FIXTURE) if calls == 1 else Response("boom", status_code=500)

    page = render(first_then_fail)
    assert calls >= 2
    banner = page.by_id("error-banner")
    assert not banner.is_hidden()
    assert "HTTP 500" in banner.text and "Showing data from" in banner.text
    rows = page.find_all("tr", data_member_url=None)
    assert {row.attrs["data-member-url"]: row.attrs["data-state"] for row in rows} == EXPECTED_STATES


def test_the_fallback_is_described_as_the_library_does_it(page: Element) -> None:
    # The default fallback takes the fewest of this client's requests in flight; "random" is the paper's rule.
    titles = {row.find("td", title=None).attrs["title"] for row in page.find_all("tr", data_selection="fallback")}
    legend = page.find("footer").find("dl")
    terms = [child for child in legend.children if isinstance(child, Element)]
    fallback = next(terms[i + 1].text for i, term in enumerate(terms) if term.tag == "dt" and term.text == "fallback")
    for text in [*titles, fallback]:
        assert text is not None
        assert "fewest" in text and "in flight" in text, text
        assert "so a uniformly random backend" not in text, text


def test_the_page_is_built_from_its_static_files() -> None:
    # Edited as files in admin/static/, shipped in the wheel, put inline into one document at import.
    static = files("prequal_middleware.admin").joinpath("static")
    css, js, template = (static.joinpath(name).read_text(encoding="utf-8") for name in STATIC_FILES)
    assert f"<style>\n{css}</style>" in STATUS_PAGE_HTML
    assert f"<script>\n{js}</script>" in STATUS_PAGE_HTML
    assert "{{" not in STATUS_PAGE_HTML, "every marker of status.html is filled"
    rebuilt = STATUS_PAGE_HTML.replace(css, "{{status.css}}").replace(js, "{{status.js}}")
    assert re.sub(r'content="default-src[^"]*"', 'content="{{csp}}"', rebuilt) == template


def test_history_charts(page: Element) -> None:
    legacy = page.find("section", data_pool_prefix="/legacy")
    charts = legacy.find("div", class_="charts")
    assert charts.attrs["data-points"] == "4"
    rps = charts.find("svg", data_chart="rps")
    (line,) = rps.find_all("path", data_series="rps")
    assert line.attrs["data-points"] == "4"
    assert len(re.findall(r"[ML]", line.attrs["d"] or "")) == 4
    assert "41.5" in charts.find("figure", data_chart="rps").find("figcaption").text
    p99 = charts.find("svg", data_chart="p99").find("path", data_series="p99")
    assert p99.attrs["data-points"] == "3", "a step without requests has no p99: the line breaks"
    assert (p99.attrs["d"] or "").count("M") == 2
    share = charts.find("svg", data_chart="share")
    lines = share.find_all("path", data_series=None)
    assert [(p.attrs["data-series"], p.attrs.get("data-series-url"), p.attrs["data-points"]) for p in lines] == [
        ("backend", HOSTILE_URL, "3"),
        ("backend", "http://127.0.0.1:8001", "3"),
        ("other", None, "3"),
    ]
    assert lines[0].find("title").text == HOSTILE_URL, "the line is labelled with its backend's URL, as text"
    legend = charts.find("ul", class_="chart-legend")
    hostile = legend.find("li", data_series_url=HOSTILE_URL)
    assert hostile.text.startswith(HOSTILE_URL) and hostile.text.endswith("70.0%")
    assert legend.find("li", data_series="other").text.startswith("other backends")
    assert page.find_all("img") == [], "the hostile URL stayed text in the charts too"


def test_no_history_yet(page: Element) -> None:
    api = page.find("section", data_pool_prefix="/api")
    assert api.find("p", data_field="history").text == "No history yet."
    assert api.find_all("svg") == []

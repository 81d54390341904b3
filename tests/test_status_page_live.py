"""The status page of a real running gateway, rendered in headless Chromium, shows the live members."""

from __future__ import annotations

import threading
import time

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from prequal_middleware import AdminSettings, Gateway, HistorySettings, PrequalMiddleware, UpstreamPool
from tests.apps import make_backend
from tests.browser import dump_dom, parse_dom, require_chromium
from tests.helpers import members, wait_for
from tests.servers import serve


def test_status_page_shows_the_live_members() -> None:
    require_chromium()
    app_a, _ = make_backend("a")
    app_b, _ = make_backend("b", instrumented=False)
    with serve(app_a) as a, serve(app_b) as b:
        gateway = Gateway(
            pools=[UpstreamPool("/api", upstreams=[a.url]), UpstreamPool("/legacy", policy="round_robin")],
            admin=AdminSettings(trust_loopback=True),
        )
        app = Starlette(routes=[Mount("/_prequal", gateway.admin_app())])
        app.add_middleware(PrequalMiddleware, gateway=gateway)
        with serve(app) as g:
            registered = httpx.post(
                g.url + "/_prequal/register", json={"url": b.url, "pool": "/legacy", "metadata": {"zone": "z1"}}
            )
            assert registered.status_code == 201
            for _ in range(10):
                httpx.get(g.url + "/api/x")

            def settled() -> bool:
                listed = members(g.url)
                return bool(
                    listed[a.url]["state"] == listed[b.url]["state"] == "healthy"
                    and listed[a.url]["probe_mode"] == "probe"
                )

            # Polled, not slept: the page shows what this JSON says (rendered, then checked below).
            wait_for(settled, timeout_s=5, what="both members healthy, a in probe mode")
            dom = parse_dom(dump_dom(g.url + "/_prequal/"))
    api = dom.find("section", data_pool_prefix="/api")
    assert api.attrs["data-policy"] == "prequal"
    row_a = api.find("tr", data_member_url=a.url)
    assert row_a.attrs["data-state"] == "healthy"
    assert row_a.attrs["data-probe-mode"] == "probe"
    legacy = dom.find("section", data_pool_prefix="/legacy")
    assert legacy.attrs["data-policy"] == "round_robin"
    row_b = legacy.find("tr", data_member_url=b.url)
    assert row_b.attrs["data-state"] == "healthy"
    assert "z1" in row_b.text
    assert dom.by_id("error-banner").is_hidden(), "the JSON endpoint answered"


HOSTILE = "<img src=x onerror=alert(1)>"


def history_points(gateway_url: str) -> int:
    history = httpx.get(gateway_url + "/_prequal/backends").json()["pools"][0]["history"]
    return 0 if history is None else len(history["age_s"])


def test_history_charts_of_live_traffic() -> None:
    require_chromium()
    # Steps of a second: one sequential client has traffic in each even while Chromium starts on 2 cores.
    settings = HistorySettings(window_s=6.0, step_s=1.0, max_backends=5)
    app_a, _ = make_backend("a")
    app_b, _ = make_backend("b")
    with serve(app_a) as a, serve(app_b) as b:
        gateway = Gateway(
            pools=[UpstreamPool("/api", upstreams=[a.url])],
            admin=AdminSettings(trust_loopback=True),
            history=settings,
        )
        app = Starlette(routes=[Mount("/_prequal", gateway.admin_app())])
        app.add_middleware(PrequalMiddleware, gateway=gateway)
        with serve(app) as g:
            registered = httpx.post(g.url + "/_prequal/register", json={"url": b.url, "metadata": {"note": HOSTILE}})
            assert registered.status_code == 201
            stop = threading.Event()

            def traffic() -> None:
                with httpx.Client() as client:
                    while not stop.is_set():
                        client.get(g.url + "/api/x")

            sender = threading.Thread(target=traffic, daemon=True)
            sender.start()
            try:
                # Traffic for longer than the window: every point of the window has some.
                started = time.monotonic()
                wait_for(
                    lambda: (
                        time.monotonic() - started > settings.window_s + 0.5
                        and history_points(g.url) == settings.points
                    ),
                    timeout_s=15,
                    what="a full window of history",
                )
                dom = parse_dom(dump_dom(g.url + "/_prequal/"))
            finally:
                stop.set()
                sender.join(5)
    charts = dom.find("section", data_pool_prefix="/api").find("div", class_="charts")
    assert charts.attrs["data-points"] == str(settings.points)
    rps = charts.find("svg", data_chart="rps").find("path", data_series="rps")
    assert rps.attrs["data-points"] == str(settings.points)
    p99 = charts.find("svg", data_chart="p99").find("path", data_series="p99")
    assert p99.attrs["data-points"] == str(settings.points), "traffic in every step: a p99 in every point"
    lines = charts.find("svg", data_chart="share").find_all("path", data_series=None)
    assert sorted(p.attrs["data-series-url"] or "" for p in lines) == sorted([a.url, b.url])
    for line in lines:
        assert line.find("title").text == line.attrs["data-series-url"]
        assert line.attrs["data-points"] == str(settings.points)
    legend = charts.find("ul", class_="chart-legend")
    assert {li.attrs["data-series-url"] for li in legend.find_all("li")} == {a.url, b.url}
    assert HOSTILE in dom.find("tr", data_member_url=b.url).text
    assert dom.find_all("img") == [], "hostile metadata stayed text"

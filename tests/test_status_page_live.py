"""The status page of a real running gateway, rendered in headless Chromium, shows the live members."""

from __future__ import annotations

import time

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from prequal_middleware import AdminSettings, Gateway, PrequalMiddleware, UpstreamPool
from tests.apps import make_backend
from tests.browser import dump_dom, parse_dom, require_chromium
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
            time.sleep(0.2)
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

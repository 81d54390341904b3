"""Event logs through a real gateway: ejections and returns, health changes and panic, registrations,
unregistrations and lease expiry, each logged once, repeats held back and counted on the next line."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from prequal_middleware import Gateway, UpstreamPool
from prequal_middleware.config import AdminSettings, HealthSettings, RetrySettings
from prequal_middleware.core import OutlierSettings
from tests.apps import make_backend
from tests.helpers import gateway_app, wait_for
from tests.logcapture import Lines, captured
from tests.servers import serve

LOGGER = "prequal_middleware.events"
TOKEN = "an-admin-token"


def _failing() -> Any:
    async def fail(request: Request) -> PlainTextResponse:
        return PlainTextResponse("down", status_code=500)

    return Starlette(routes=[Route("/{path:path}", fail)])


def _matching(lines: Lines, pattern: str) -> list[str]:
    return [m for m in lines.messages if re.search(pattern, m)]


def test_ejections_and_returns_once_each_repeats_counted() -> None:
    good, _ = make_backend("good")
    with serve(good) as ok, serve(_failing()) as bad, captured(LOGGER) as lines:
        pool = UpstreamPool(
            "/api",
            upstreams=[ok.url, bad.url],
            policy="round_robin",
            health=HealthSettings(path=None),
            retry=RetrySettings(attempts=1),
            outliers=OutlierSettings(consecutive_failures=2, base_ejection_s=0.2, max_ejection_s=0.2),
        )
        gateway = Gateway([pool])
        gateway.events.throttle.interval_s = 2.5
        ejected = rf"^backend {re.escape(bad.url)} of pool /api ejected for 0\.2 s"
        returned = rf"^backend {re.escape(bad.url)} of pool /api back from ejection"
        with serve(gateway_app(gateway)) as g, httpx.Client() as client:
            for _ in range(4):  # round robin: two failures in a row on the failing one
                client.get(g.url + "/api/x")
            wait_for(lambda: len(_matching(lines, ejected)) == 1, what="the ejection line")
            wait_for(lambda: len(_matching(lines, returned)) == 1, what="the return line", timeout_s=3)
            # Flapping: on probation, each failure ejects it again; lines held back for the interval.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                client.get(g.url + "/api/x")
                time.sleep(0.05)
            outliers = gateway.pools["/api"].clients[0].outliers  # type: ignore[attr-defined]
            wait_for(lambda: len(_matching(lines, ejected)) == 2, what="the second ejection line")
            total = outliers.ejections_total
            held = gateway.events.throttle.held(("ejected", "/api", bad.url))
    lines_ejected = _matching(lines, ejected)
    assert lines_ejected[0].endswith("(outlier detection)"), "the first: nothing held back"
    suppressed = re.search(r"\(suppressed (\d+) similar\)$", lines_ejected[1])
    assert suppressed is not None, lines_ejected[1]
    assert 2 + int(suppressed.group(1)) + held == total, "every ejection logged or counted, none twice"
    assert int(suppressed.group(1)) >= 1
    assert all(r.levelname == "WARNING" for r in lines.records if "ejected for" in r.getMessage())


def test_health_changes_and_panic_logged_once_each() -> None:
    sick = {"now": False}

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no" if sick["now"] else "ok", status_code=500 if sick["now"] else 200)

    flaky = Starlette(routes=[Route("/healthz", healthz)])
    good, _ = make_backend("good")
    with serve(good) as ok, serve(flaky) as f, captured(LOGGER) as lines:
        pool = UpstreamPool(
            "/api",
            upstreams=[ok.url, f.url],
            health=HealthSettings(path="/healthz", interval_s=0.1, fall=2, rise=2),
            outliers=OutlierSettings(panic_threshold=0.75),
        )
        gateway = Gateway([pool])
        with serve(gateway_app(gateway)):
            time.sleep(0.5)
            sick["now"] = True
            wait_for(lambda: bool(_matching(lines, "out of panic|in panic")), what="panic", timeout_s=5)
            time.sleep(2.5)  # several gauge samples and health rounds while it stays sick
            sick["now"] = False
            wait_for(lambda: bool(_matching(lines, "out of panic")), what="the end of panic", timeout_s=5)
            time.sleep(1.5)
    name = re.escape(f.url)
    assert len(_matching(lines, rf"^backend {name} of pool /api unhealthy: failed 2 health checks$")) == 1
    assert len(_matching(lines, r"^pool /api in panic: 1 of 2 members healthy, routing over all of them$")) == 1
    assert len(_matching(lines, rf"^backend {name} of pool /api healthy again: passed 2 health checks$")) == 1
    assert len(_matching(lines, r"^pool /api out of panic: 2 of 2 members healthy$")) == 1
    levels = {r.getMessage().split(":")[0]: r.levelname for r in lines.records}
    assert levels["pool /api in panic"] == "WARNING" and levels["pool /api out of panic"] == "INFO"


def test_registrations_unregistrations_and_expiry() -> None:
    app, _ = make_backend("r")
    with serve(app) as backend, captured(LOGGER) as lines:
        gateway = Gateway([UpstreamPool("/api", health=HealthSettings(path=None))], admin=AdminSettings(token=TOKEN))
        auth = {"authorization": f"Bearer {TOKEN}"}
        with serve(gateway_app(gateway)) as g, httpx.Client(headers=auth) as client:
            body = {"url": backend.url, "pool": "/api", "ttl_s": 30}
            for _ in range(3):
                assert client.post(g.url + "/_prequal/register", json=body).status_code == 201
            gone = {"url": backend.url, "pool": "/api"}
            assert client.post(g.url + "/_prequal/unregister", json=gone).status_code == 200
            short = {**body, "ttl_s": 1}
            assert client.post(g.url + "/_prequal/register", json=short).status_code == 201
            expired = rf"^backend {re.escape(backend.url)} left pool /api: its lease ran out \(no heartbeat\)$"
            wait_for(lambda: bool(_matching(lines, expired)), what="the expiry line", timeout_s=5)
    url = re.escape(backend.url)
    assert _matching(lines, rf"^backend {url} registered in pool /api \(30 s lease\)$") != []
    assert len(_matching(lines, rf"^backend {url} registered again in pool /api")) == 1, "the third held back"
    assert len(_matching(lines, rf"^backend {url} unregistered from pool /api$")) == 1
    assert len(_matching(lines, expired)) == 1
    # The fourth registration (after the unregistration) is a first one again, within the interval: held back.
    assert len(_matching(lines, rf"^backend {url} registered in pool /api")) == 1
    assert gateway.events.throttle.held(("registered", "/api", backend.url, False)) == 1


def test_admin_refusals_are_escaped_and_held_back() -> None:
    """Ready for the admin routes (the call there lands with their rewrite): one line per status and
    client per interval, a hostile path escaped."""
    now = [0.0]
    gateway = Gateway([UpstreamPool("/api", health=HealthSettings(path=None))], clock=lambda: now[0])
    with captured(LOGGER) as lines:
        gateway.events.admin_refused(401, "unauthorized", "POST", '/_prequal/register\r\nforged "x"', "127.0.0.1")
        gateway.events.admin_refused(401, "unauthorized", "POST", "/_prequal/register", "127.0.0.1")
        gateway.events.admin_refused(429, "too_many_writes", "POST", "/_prequal/register", "127.0.0.1")
        now[0] = 11.0
        gateway.events.admin_refused(401, "unauthorized", "POST", "/_prequal/heartbeat", "127.0.0.1")
    assert lines.messages == [
        'admin POST /_prequal/register\\x0d\\x0aforged \\"x\\" refused with 401 unauthorized for client 127.0.0.1',
        "admin POST /_prequal/register refused with 429 too_many_writes for client 127.0.0.1",
        "admin POST /_prequal/heartbeat refused with 401 unauthorized for client 127.0.0.1 (suppressed 1 similar)",
    ]


def test_admin_routes_log_their_refusals() -> None:
    # Through the real admin routes: a write without the token, a bad body, a registration of an unknown
    # pool; the same refusal again from the same client is held back.
    gateway = Gateway([UpstreamPool("/api", health=HealthSettings(path=None))], admin=AdminSettings(token=TOKEN))
    with captured(LOGGER) as lines, serve(gateway_app(gateway)) as g, httpx.Client() as client:
        assert client.post(g.url + "/_prequal/register", json={"url": "http://127.0.0.1:9"}).status_code == 401
        assert client.post(g.url + "/_prequal/heartbeat", json={"url": "http://127.0.0.1:9"}).status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        bad = client.post(
            g.url + "/_prequal/register", json={"url": "http://127.0.0.1:9", "pool": "nope"}, headers=auth
        )
        assert bad.status_code == 400
    assert lines.messages == [
        "admin POST /_prequal/register refused with 401 unauthorized for client 127.0.0.1",
        "admin POST /_prequal/register refused with 400 invalid_field for client 127.0.0.1",
    ]
    assert gateway.events.throttle.held(("admin", 401, "127.0.0.1")) == 1

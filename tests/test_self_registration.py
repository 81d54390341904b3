"""Backends register themselves: at startup, with heartbeats, again after a 404, and leave at shutdown."""

from __future__ import annotations

import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from prequal_middleware import AdminSettings, Gateway, LoadReportingMiddleware, SelfRegistration, UpstreamPool
from tests.helpers import gateway_app, members, wait_for
from tests.servers import ServerThread, free_port, serve


def backend_app(registration: SelfRegistration) -> Any:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("self-registered")

    return LoadReportingMiddleware(Starlette(routes=[Route("/{p:path}", hello)], lifespan=registration.lifespan))


def test_registers_heartbeats_reregisters_and_leaves() -> None:
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as g:
        port = free_port()
        registration = SelfRegistration(g.url + "/_prequal", f"http://127.0.0.1:{port}", ttl_s=2.0, interval_s=0.2)
        backend = ServerThread(backend_app(registration), port=port).start()
        try:
            assert list(members(g.url)) == [f"http://127.0.0.1:{port}"], "registered during startup"
            # It gets traffic once its first health check passes (checked at once, then soon again).
            wait_for(lambda: members(g.url)[f"http://127.0.0.1:{port}"]["state"] == "healthy", what="first check")
            assert httpx.get(g.url + "/api/x").text == "self-registered"
            wait_for(lambda: registration.heartbeats >= 3, what="heartbeats")
            # The gateway forgets it (as after a restart): the next heartbeat gets 404 and it registers again.
            httpx.post(g.url + "/_prequal/unregister", json={"url": f"http://127.0.0.1:{port}"})
            assert list(members(g.url)) == []
            wait_for(lambda: list(members(g.url)) == [f"http://127.0.0.1:{port}"], what="re-registration after a 404")
            wait_for(lambda: registration.registrations == 2, what="the second registration to be counted")
        finally:
            backend.stop()
        assert list(members(g.url)) == [], "unregistered at shutdown, not left to expire"


def test_a_gateway_that_is_down_does_not_block_startup() -> None:
    gateway_port, backend_port = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    registration = SelfRegistration(gateway_url + "/_prequal", f"http://127.0.0.1:{backend_port}", interval_s=0.2)
    started = time.monotonic()
    backend = ServerThread(backend_app(registration), port=backend_port).start()
    try:
        assert time.monotonic() - started < 3.0, "startup went on without the gateway"
        assert not registration.registered
        assert httpx.get(f"http://127.0.0.1:{backend_port}/x").text == "self-registered", "it serves meanwhile"
        gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
        with serve(gateway_app(gateway), port=gateway_port):
            wait_for(lambda: registration.registered, timeout_s=8.0, what="registration once the gateway is up")
            assert list(members(gateway_url)) == [f"http://127.0.0.1:{backend_port}"]
    finally:
        backend.stop()

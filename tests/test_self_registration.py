"""Backends register themselves: at startup, with heartbeats, again after a 404, and leave at shutdown."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from prequal_middleware import AdminSettings, Gateway, LoadReportingMiddleware, SelfRegistration, UpstreamPool
from tests.helpers import gateway_app, members, wait_for
from tests.reliability.procs import HttpProc, backend_proc
from tests.servers import ServerThread, free_port, serve


def backend_app(registration: SelfRegistration) -> Any:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("self-registered")

    return LoadReportingMiddleware(Starlette(routes=[Route("/{p:path}", hello)], lifespan=registration.lifespan))


def test_registers_heartbeats_reregisters_and_leaves() -> None:
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as g:
        port = free_port()
        # A long lease: late heartbeats on a loaded machine never let it lapse (a second re-registration).
        registration = SelfRegistration(g.url + "/_prequal", f"http://127.0.0.1:{port}", ttl_s=30.0, interval_s=0.2)
        backend = ServerThread(backend_app(registration), port=port).start()
        try:
            assert list(members(g.url)) == [f"http://127.0.0.1:{port}"], "registered during startup"
            # It gets traffic once its first health check passes (checked at once, then soon again).
            wait_for(lambda: members(g.url)[f"http://127.0.0.1:{port}"]["state"] == "healthy", what="first check")
            assert httpx.get(g.url + "/api/x").text == "self-registered"
            wait_for(lambda: registration.heartbeats >= 3, what="heartbeats")
            # The gateway forgets it (as after a restart): the next heartbeat gets 404 and it registers again.
            # Not `members == []` after it: the next heartbeat (0.2 s) may already have registered it again.
            # A second registration happens only after a heartbeat's 404, i.e. once the gateway forgot it.
            forgot = httpx.post(g.url + "/_prequal/unregister", json={"url": f"http://127.0.0.1:{port}"})
            assert forgot.status_code == 200 and forgot.json()["unregistered"] is True
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


@contextlib.contextmanager
def self_registered(tmp_path: Path, name: str, drain_s: float) -> Iterator[tuple[str, HttpProc]]:
    """A gateway in-process and a backend process registered with it (healthy), stopped by PID at the end."""
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as g:
        backend = backend_proc(name, tmp_path, register=g.url + "/_prequal", extra_args=["--drain", str(drain_s)])
        backend.start()
        try:
            backend.wait_http(backend.url + "/healthz")
            wait_for(lambda: backend.url in members(g.url), what="registration")
            yield g.url, backend
        finally:
            backend.stop()


def test_sigterm_unregisters_first_and_serves_through_the_drain(tmp_path: Path) -> None:
    """uvicorn closes its listener and idle connections before the lifespan shutdown; the drain comes first."""
    # A drain long enough that a slow machine still unregisters and asks /healthz well inside it.
    drain_s = 5.0
    with self_registered(tmp_path, "drained", drain_s=drain_s) as (gateway_url, backend):
        backend.signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: backend.url not in members(gateway_url), timeout_s=3.5, what="unregistration on SIGTERM")
        # Unregistered, and still accepting and answering: nothing the gateway sent meanwhile is cut.
        assert httpx.get(backend.url + "/healthz", timeout=1.0).status_code == 200
        assert time.monotonic() - signalled < drain_s
        assert backend.popen is not None
        # uvicorn re-raises the signal it handled once it has shut down: death by SIGTERM, after the drain.
        assert backend.popen.wait(timeout=15) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled >= drain_s, "the server stopped only after the drain"


def test_a_second_sigterm_skips_the_drain(tmp_path: Path) -> None:
    with self_registered(tmp_path, "hurried", drain_s=30) as (gateway_url, backend):
        backend.signal(signal.SIGTERM)
        wait_for(lambda: backend.url not in members(gateway_url), timeout_s=10.0, what="unregistration on SIGTERM")
        signalled = time.monotonic()
        backend.signal(signal.SIGTERM)
        assert backend.popen is not None
        backend.popen.wait(timeout=20)
        # Waiting out the drain would end 30 - 10 = 20 s from here at the earliest.
        assert time.monotonic() - signalled < 15.0, "the second SIGTERM did not wait out the 30 s drain"

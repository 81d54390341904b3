"""No background loop dies of one bad iteration (issue 12, item 7b).

A real gateway (uvicorn on loopback) whose policy, transport or registry raises once, or on every call:
the gauges, health checks, idle probes and registry sync (lease expiry) go on afterwards, the loop
tasks are still alive, and a persistent error is logged once, not once per iteration or probe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from prequal_middleware import (
    AdminSettings,
    Gateway,
    HealthSettings,
    MemoryRegistry,
    UpstreamPool,
)
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.config import Timeouts
from prequal_middleware.core import PolicySnapshot, PrequalPolicy, PrequalSettings
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport, UpstreamRequest, UpstreamResponse
from prequal_middleware.transports.http1 import H1Transport
from tests.helpers import gateway_app, wait_for
from tests.reliability.support import metric
from tests.servers import ServerThread, serve

OFF = HealthSettings(path=None)


class Poisoned(RuntimeError):
    """What the injected faults raise."""


class FlakyPolicy(PrequalPolicy):
    """Prequal, except that the methods named in ``fail_once`` raise on their next call, and those in
    ``fail_always`` on every call."""

    def __init__(self, settings: PrequalSettings | None = None) -> None:
        super().__init__(settings)
        self.fail_once: set[str] = set()
        self.fail_always: set[str] = set()

    def _fault(self, method: str) -> None:
        if method in self.fail_always:
            raise Poisoned(f"{method} is poisoned")
        if method in self.fail_once:
            self.fail_once.discard(method)
            raise Poisoned(f"{method} raised once")

    def snapshot(self, now: float) -> PolicySnapshot:
        self._fault("snapshot")
        return super().snapshot(now)

    def idle_probes(self, now: float) -> Any:
        self._fault("idle_probes")
        return super().idle_probes(now)

    def on_probe(self, backend: str, now: float, rif: int, latency_s: float) -> None:
        # Raises after Prequal took the answer: a policy that raised before would keep the backend's
        # probe "on the way" for PROBE_PENDING_S, and Prequal sends no second probe meanwhile.
        super().on_probe(backend, now, rif, latency_s)
        self._fault("on_probe")


def backend_app() -> Any:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("ok")

    return LoadReportingMiddleware(Starlette(routes=[Route("/{path:path}", hello)]))


@contextmanager
def running_gateway(
    pool: Callable[[list[str]], UpstreamPool], *, backends: int = 1, **gateway: Any
) -> Iterator[tuple[ServerThread, Gateway, list[ServerThread]]]:
    servers = [ServerThread(backend_app()).start() for _ in range(backends)]
    try:
        gw = Gateway(pools=[pool([s.url for s in servers])], admin=AdminSettings(trust_loopback=True), **gateway)
        with serve(gateway_app(gw)) as server:
            yield server, gw, servers
    finally:
        for s in servers:
            s.stop()


def loops_alive(gateway: Gateway) -> None:
    scheduler = gateway._scheduler
    assert scheduler is not None
    tasks = list(scheduler._tasks)
    assert tasks, "the scheduler runs its loops"
    assert all(not t.done() for t in tasks), [t for t in tasks if t.done()]


def test_gauges_and_idle_probes_go_on_after_a_policy_raised() -> None:
    policies: list[FlakyPolicy] = []

    def flaky() -> FlakyPolicy:
        policies.append(FlakyPolicy())
        return policies[-1]

    def pool(upstreams: list[str]) -> UpstreamPool:
        return UpstreamPool("/api", upstreams=upstreams, policy=flaky, health=OFF)

    with running_gateway(pool, backends=2) as (server, gateway, backends):
        url = server.url
        wait_for(lambda: metric(url, "prequal_backends", pool="/api", state="healthy") == 2, what="first gauges")
        (policy,) = policies
        policy.fail_once |= {"snapshot", "idle_probes"}
        wait_for(lambda: not policy.fail_once, timeout_s=5, what="both faults to fire")
        probes_before = metric(url, "prequal_probes_total", pool="/api")
        # A change the gauge loop has to notice: a third member registers (through the admin API).
        with serve(backend_app()) as third:
            reply = httpx.post(url + "/_prequal/register", json={"pool": "/api", "url": third.url})
            assert reply.status_code == 201, reply.text
            wait_for(
                lambda: metric(url, "prequal_backends", pool="/api", state="healthy") == 3,
                timeout_s=5,
                what="the gauge loop to update after the snapshot raised",
            )
            wait_for(
                lambda: metric(url, "prequal_probes_total", pool="/api") > probes_before,
                timeout_s=5,
                what="idle probes to go on after idle_probes raised",
            )
            loops_alive(gateway)


class RaisingTransport:
    """The gateway's transport, except that health checks raise a plain exception ``raises`` times."""

    def __init__(self, raises: int) -> None:
        aiohttp = os.environ.get("PREQUAL_TEST_TRANSPORT") == "aiohttp"
        self.inner: Transport = AiohttpTransport() if aiohttp else H1Transport()
        self.raises = raises

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        if request.target == "/healthz" and self.raises > 0:
            self.raises -= 1
            raise Poisoned("the transport raised something it should not")
        return await self.inner.send(request, timeouts)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_health_checks_go_on_after_the_transport_raised() -> None:
    def pool(upstreams: list[str]) -> UpstreamPool:
        return UpstreamPool("/api", upstreams=upstreams, health=HealthSettings(path="/healthz", interval_s=0.1))

    with running_gateway(pool, transport=RaisingTransport(raises=1)) as (server, gateway, _):
        first = metric(server.url, "prequal_health_checks_total", pool="/api")
        wait_for(
            lambda: metric(server.url, "prequal_health_checks_total", pool="/api", result="ok") >= first + 3,
            timeout_s=5,
            what="health checks after the transport raised",
        )
        loops_alive(gateway)


class FlakyRegistry(MemoryRegistry):
    """A memory registry whose ``wait_for_change`` raises once when armed."""

    armed = False

    async def wait_for_change(self, timeout_s: float) -> None:
        if self.armed:
            self.armed = False
            raise Poisoned("the registry raised")
        await super().wait_for_change(timeout_s)


def test_registry_sync_and_lease_expiry_go_on_after_the_registry_raised() -> None:
    registry = FlakyRegistry()

    def pool(upstreams: list[str]) -> UpstreamPool:
        return UpstreamPool("/api", health=OFF)

    with running_gateway(pool, registry=registry) as (server, gateway, backends):
        registry.armed = True
        wait_for(lambda: not registry.armed, timeout_s=5, what="the fault to fire")
        reply = httpx.post(
            server.url + "/_prequal/register", json={"pool": "/api", "url": backends[0].url, "ttl_s": 1.0}
        )
        assert reply.status_code == 201, reply.text
        assert backends[0].url in gateway.pools["/api"].members
        wait_for(
            lambda: backends[0].url not in gateway.pools["/api"].members,
            timeout_s=6,
            what="the lease to expire (the registry loop syncs)",
        )
        loops_alive(gateway)


def test_a_persistent_error_is_logged_once_not_per_probe(caplog: pytest.LogCaptureFixture) -> None:
    policies: list[FlakyPolicy] = []

    def flaky() -> FlakyPolicy:
        # Every draw a probe on the network (no piggybacked reports): the 60 requests make many probes.
        policies.append(FlakyPolicy(PrequalSettings(report_max_age_s=0.0)))
        policies[-1].fail_always.add("on_probe")
        return policies[-1]

    def pool(upstreams: list[str]) -> UpstreamPool:
        return UpstreamPool("/api", upstreams=upstreams, policy=flaky, health=OFF)

    caplog.set_level(logging.ERROR, logger="prequal_middleware")
    with running_gateway(pool, backends=2) as (server, gateway, _):
        with httpx.Client(base_url=server.url, timeout=5) as http:
            for i in range(60):
                assert http.get(f"/api/{i}").status_code == 200
        wait_for(
            lambda: metric(server.url, "prequal_probes_total", pool="/api") >= 60,
            timeout_s=5,
            what="probe answers to come back",
        )
        loops_alive(gateway)
    errors = [r for r in caplog.records if r.name.startswith("prequal_middleware") and r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= 2, [r.getMessage() for r in errors]

"""Membership churn leaks nothing (issue 12, item 13).

A gateway process (``tests.reliability.gateway_app``, on each upstream transport) sees 100 backends
register, take requests and probes, and unregister through its admin API (200 churn events). Afterwards
its open file descriptors return near where they started, its probe client keeps no state for departed
backends (``prequal_probe_backends``), and every backend has seen all its connections closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import members, wait_for
from tests.reliability.procs import HttpProc, fd_count, gateway_proc
from tests.reliability.rawservers import PROBE_PATH, PROBE_ZERO, LoopThread, response
from tests.reliability.support import metric, pools_env

CHURNED = 100  # backends, each registered then unregistered: 200 churn events
WRITE_PAUSE_S = 0.03  # admin writes stay under max_writes_per_s (50/s)
# Both transports close idle upstream connections after keepalive_s (30 s); aiohttp's connector checks
# every keepalive_s, so a departed backend's idle connection may live up to twice that.
SETTLE_S = 75.0
FD_SLACK = 8


class Backends:
    """``count`` raw HTTP/1.1 servers on one loop thread; each counts its open connections and requests."""

    def __init__(self, count: int) -> None:
        self.loop = LoopThread().start()
        self.open: dict[int, int] = {}
        self.requests: dict[int, int] = {}
        self.probes: dict[int, int] = {}
        self.servers: list[asyncio.Server] = []
        for _ in range(count):
            server = self.loop.call(asyncio.start_server(self._handler, "127.0.0.1", 0))
            port = server.sockets[0].getsockname()[1]
            self.servers.append(server)
            self.open[port] = self.requests[port] = self.probes[port] = 0

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.open]

    async def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        self.open[port] += 1
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if head.split(b" ", 2)[1] == PROBE_PATH:
                        self.probes[port] += 1
                        writer.write(PROBE_ZERO)
                    else:
                        self.requests[port] += 1
                        writer.write(response(200, b"ok"))
                    await writer.drain()
        finally:
            self.open[port] -= 1
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self.servers:
                server.close()

        with contextlib.suppress(Exception):
            self.loop.call(close())
        self.loop.stop()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends(CHURNED)
    yield b
    b.stop()


@pytest.mark.parametrize("transport", ["aiohttp", "h1"])
def test_churn_leaks_no_fds_probe_state_or_connections(tmp_path: Path, backends: Backends, transport: str) -> None:
    env = pools_env({"/api": []}, PREQUAL_TRANSPORT=transport)
    gateway: HttpProc = gateway_proc(f"gateway-{transport}", tmp_path, env)
    gateway.start()
    try:
        gateway.wait_http(gateway.url + "/_prequal/healthz")
        time.sleep(1.0)  # the loops have started and imported what they need
        baseline = fd_count(gateway.pid)
        with httpx.Client(base_url=gateway.url, timeout=10) as admin:
            for url in backends.urls:
                registered = admin.post("/_prequal/register", json={"pool": "/api", "url": url})
                assert registered.status_code == 201, registered.text
                time.sleep(WRITE_PAUSE_S)
                # A registered member gets traffic after its first passing health check, made at once
                # but an HTTP exchange away: wait for it rather than bet on 30 ms on a busy machine.
                wait_for(lambda url=url: members(gateway.url)[url]["state"] == "healthy", what="the first check")
                for i in range(3):
                    assert admin.get(f"/api/{i}").status_code == 200
                gone = admin.post("/_prequal/unregister", json={"pool": "/api", "url": url})
                assert gone.status_code in (200, 204), gone.text
                time.sleep(WRITE_PAUSE_S)
        assert all(n > 0 for n in backends.requests.values()), "every backend got traffic"
        assert sum(backends.probes.values()) >= CHURNED, "and probes"

        deadline = time.monotonic() + SETTLE_S
        while True:
            fds = fd_count(gateway.pid)
            still_open = {p: n for p, n in backends.open.items() if n}
            known = metric(gateway.url, "prequal_probe_backends", pool="/api")
            if fds <= baseline + FD_SLACK and not still_open and known == 0:
                break
            assert time.monotonic() < deadline, (
                f"after {SETTLE_S} s: {fds} fds (baseline {baseline}), {len(still_open)} backends with "
                f"connections still open, probe client knows {known} backends\n{gateway.log_tail()}"
            )
            time.sleep(0.5)
        assert metric(gateway.url, "prequal_probe_connections", pool="/api") == 0
    finally:
        gateway.stop()

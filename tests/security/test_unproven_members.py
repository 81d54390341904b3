"""Registered members earn traffic with their first passing health check (issue 12, item 12).

Through a real uvicorn gateway: one healthy static backend, then many registered black holes (they
accept connections and never answer anything, health checks included). Before, every registered member
was a candidate at once, and with most members unhealthy panic mode routed over all of them: nearly
every request went to a black hole and timed out. Now the black holes are neither candidates nor
panic choices, and a healthy newcomer gets traffic as soon as its first health check passes (it is
checked at once, not at the next round).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest

from prequal_middleware import AdminSettings, Gateway, HealthSettings, Timeouts, UpstreamPool
from tests.apps import make_backend
from tests.helpers import gateway_app, members
from tests.reliability.rawservers import LoopThread
from tests.servers import serve

HOLES = 20


class BlackHoles:
    """``count`` listeners that accept connections and never write a byte."""

    def __init__(self, loop: LoopThread, count: int) -> None:
        self.loop = loop
        self.count = count
        self.ports: list[int] = []
        self.accepted = 0
        self._servers: list[asyncio.Server] = []

    def start(self) -> BlackHoles:
        async def go() -> list[int]:
            for _ in range(self.count):
                server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
                self._servers.append(server)
            return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

        self.ports = self.loop.call(go())
        return self

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()

        with contextlib.suppress(Exception):
            self.loop.call(close())


@pytest.fixture
def holes() -> Iterator[BlackHoles]:
    loop = LoopThread().start()
    server = BlackHoles(loop, HOLES).start()
    try:
        yield server
    finally:
        server.stop()
        loop.stop()


def test_registered_black_holes_get_no_traffic_and_a_good_newcomer_gets_it_at_once(holes: BlackHoles) -> None:
    good_app, _ = make_backend("good")
    new_app, _ = make_backend("new")
    health = HealthSettings(path="/healthz", interval_s=30.0, timeout_s=0.5)
    timeouts = Timeouts(connect_s=1.0, response_headers_s=1.0, read_idle_s=1.0)
    with serve(good_app) as good, serve(new_app) as new:
        pool = UpstreamPool("/api", upstreams=[good.url], health=health, timeouts=timeouts, policy="round_robin")
        gateway = Gateway(pools=[pool], admin=AdminSettings(trust_loopback=True, max_writes_per_s=1000.0))
        with serve(gateway_app(gateway)) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            # Wait for the gateway's first health round (it proves the static member, already trusted).
            time.sleep(0.3)
            for port in holes.ports:
                assert client.post("/_prequal/register", json={"url": f"http://127.0.0.1:{port}"}).status_code == 201
            assert len(members(g.url)) == HOLES + 1
            started = time.monotonic()
            served = [client.get("/api/x") for _ in range(40)]
            assert [r.status_code for r in served] == [200] * 40
            assert {r.json()["backend"] for r in served} == {"good"}, "a black hole got a request"
            assert time.monotonic() - started < 5.0
            states = {m["url"]: m["state"] for m in members(g.url).values()}
            assert states[good.url] == "healthy"
            assert all(states[f"http://127.0.0.1:{p}"] == "unhealthy" for p in holes.ports)
            # A healthy newcomer is checked at once (the round interval is 30 s) and then gets its share.
            assert client.post("/_prequal/register", json={"url": new.url}).status_code == 201
            deadline = time.monotonic() + 3.0
            seen: set[str] = set()
            while time.monotonic() < deadline and "new" not in seen:
                seen.add(client.get("/api/x").json()["backend"])
            assert "new" in seen, "the newcomer passed its first check but got no traffic"

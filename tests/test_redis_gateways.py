"""Two gateway processes sharing one Redis: registration spreads, Redis outages do not stop traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from tests.apps import make_backend
from tests.helpers import consecutive_free_ports, members, seconds_until, wait_http
from tests.registry.conftest import RedisServer, new_redis_server
from tests.servers import serve


@contextmanager
def gateway_process(port: int, redis_url: str, **extra: str) -> Iterator[str]:
    env = {**os.environ, "PREQUAL_REGISTRY": redis_url, "PREQUAL_POOLS": json.dumps({"/api": []}), **extra}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example_app.gateway:app", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/_prequal/healthz")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def backend_of(gateway: str) -> str | None:
    reply = httpx.get(gateway + "/api/x", timeout=5)
    return reply.json().get("backend") if reply.status_code == 200 else None


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = new_redis_server()
    yield server
    server.stop()


def test_two_gateways_share_membership_and_survive_redis_outages(redis: RedisServer) -> None:
    app_a, _ = make_backend("a")
    app_b, _ = make_backend("b")
    first = consecutive_free_ports(2)
    with ExitStack() as stack:
        a = stack.enter_context(serve(app_a))
        b = stack.enter_context(serve(app_b))
        # g1 turns not ready after 3 s of registry outage; g2 keeps the default bound (30 s).
        g1 = stack.enter_context(gateway_process(first, redis.url, PREQUAL_READY_WHILE_STALE_S="3"))
        g2 = stack.enter_context(gateway_process(first + 1, redis.url))

        assert httpx.post(g1 + "/_prequal/register", json={"url": a.url}).status_code == 201
        # Shared membership, not pub/sub latency (tests/registry/test_redis.py): a gateway also re-reads
        # Redis every REGISTRY_REFRESH_S (1 s), so the bound leaves a loaded machine room above that.
        spread = seconds_until(lambda: backend_of(g2) == "a")
        assert spread < 3.0, f"registration took {spread:.3f} s to reach the other gateway"

        assert httpx.post(g2 + "/_prequal/unregister", json={"url": a.url}).status_code == 200
        gone = seconds_until(lambda: backend_of(g1) is None)
        assert gone < 3.0, f"unregistration took {gone:.3f} s to reach the other gateway"

        for gateway, backend in ((g1, a), (g2, b)):
            assert httpx.post(gateway + "/_prequal/register", json={"url": backend.url}).status_code == 201
        seconds_until(lambda: sorted(members(g1)) == sorted(members(g2)) == sorted([a.url, b.url]))

        redis.stop()
        seconds_until(lambda: httpx.get(g1 + "/_prequal/backends").json()["registry"]["stale"] is True, timeout_s=5.0)
        assert httpx.get(g1 + "/_prequal/readyz").status_code == 200, "a brief outage leaves the gateway ready"
        deadline = time.monotonic() + 2.0
        served = 0
        while time.monotonic() < deadline or served <= 20:  # a count, not a rate: a loaded machine is slow
            for gateway in (g1, g2):
                assert backend_of(gateway) in {"a", "b"}, "traffic goes on from the last snapshot"
                served += 1
        seconds_until(lambda: httpx.get(g1 + "/_prequal/readyz").status_code == 503, timeout_s=6.0)
        assert httpx.get(g2 + "/_prequal/readyz").status_code == 200, "g2's bound (30 s) is not reached"
        assert httpx.get(g2 + "/_prequal/backends").json()["registry"]["stale"] is True, "yet staleness shows"
        described = httpx.get(g1 + "/_prequal/backends").json()
        assert described["registry"]["stale"] is True
        assert "registry has been unreachable" in " ".join(httpx.get(g1 + "/_prequal/readyz").json()["problems"])
        refused = httpx.post(g1 + "/_prequal/register", json={"url": a.url})
        assert refused.status_code == 503 and refused.json()["error"] == "registry_unavailable"
        metrics = httpx.get(g2 + "/_prequal/metrics").text
        stale = [line for line in metrics.splitlines() if line.startswith("prequal_registry_stale_seconds ")]
        assert stale and float(stale[0].split()[1]) > 0

        redis.start()  # empty: no persistence; backends heartbeat, get 404 and register again
        for gateway, backend in ((g1, a), (g2, b)):
            seconds_until(
                lambda g=gateway, s=backend: (
                    httpx.post(g + "/_prequal/register", json={"url": s.url}).status_code == 201
                ),
                timeout_s=5.0,
            )
        converged = seconds_until(
            lambda: sorted(members(g1)) == sorted(members(g2)) == sorted([a.url, b.url]), timeout_s=5.0
        )
        assert converged < 3.0  # as above: within a refresh (1 s) and room for a loaded machine
        print(f"\nspread {spread * 1000:.0f} ms, removal {gone * 1000:.0f} ms, converged {converged * 1000:.0f} ms")
        assert httpx.get(g1 + "/_prequal/readyz").status_code == 200
        assert httpx.get(g2 + "/_prequal/backends").json()["registry"]["stale"] is False

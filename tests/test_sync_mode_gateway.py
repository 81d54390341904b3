"""Prequal's sync mode through a real gateway on uvicorn, in front of three real backends.

Each backend runs ``LoadReportingMiddleware``. A backend holding many requests (high RIF) is avoided; a
backend that does not answer probes in time delays no request beyond ``sync_wait_s``; afterwards every
count is back to zero and no task was left behind, and the scheduler leaves none after shutdown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from prequal_middleware import Gateway, HealthSettings, ProbeSettings, UpstreamPool
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.core import PrequalPolicy, PrequalSettings
from prequal_middleware.core.load_report import DEFAULT_PROBE_PATH
from tests.helpers import gateway_app, probe_rif, wait_for
from tests.servers import ServerThread, serve

HELD = 20  # requests kept in flight on the busy backend


def backend(name: str, probe_delay_s: float = 0.0, release: threading.Event | None = None) -> Any:
    async def work(request: Request) -> Response:
        await asyncio.sleep(0.002)
        return PlainTextResponse(name)

    async def hold(request: Request) -> Response:  # ``s`` seconds, or until ``release`` is set (polled)
        deadline = time.monotonic() + float(request.query_params["s"])
        while time.monotonic() < deadline and not (release is not None and release.is_set()):
            await asyncio.sleep(0.05)
        return PlainTextResponse(name)

    app = LoadReportingMiddleware(Starlette(routes=[Route("/hold", hold), Route("/{path:path}", work)]))
    if probe_delay_s <= 0:
        return app

    async def deaf(scope: Any, receive: Any, send: Any) -> None:  # answers probes, too late
        if scope["type"] == "http" and scope["path"] == DEFAULT_PROBE_PATH:
            await asyncio.sleep(probe_delay_s)
        await app(scope, receive, send)

    return deaf


def tasks(server: ServerThread) -> set[asyncio.Task[Any]]:
    """The tasks alive on ``server``'s event loop (but the one asking)."""

    async def alive() -> set[asyncio.Task[Any]]:
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert server.loop is not None
    return asyncio.run_coroutine_threadsafe(alive(), server.loop).result(5.0)


@contextmanager
def sync_gateway(
    backends: list[Any], settings: PrequalSettings, probes: ProbeSettings
) -> Iterator[tuple[Gateway, ServerThread, list[str]]]:
    with ExitStack() as stack:
        urls = [stack.enter_context(serve(app)).url for app in backends]
        pool = UpstreamPool("/api", upstreams=urls, prequal=settings, probes=probes, health=HealthSettings(path=None))
        gateway = Gateway(pools=[pool])
        with serve(gateway_app(gateway)) as gw:
            yield gateway, gw, urls
        scheduler = gateway._scheduler
        assert scheduler is None or not scheduler._tasks, "the scheduler left tasks after shutdown"


def get_all(url: str, n: int, concurrency: int) -> list[tuple[str, float]]:
    """``n`` requests, ``concurrency`` at a time: (who answered, seconds) each."""

    async def run() -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            left = list(range(n))

            async def worker() -> None:
                while left:
                    left.pop()
                    t0 = time.perf_counter()
                    response = await http.get("/api/x")
                    assert response.status_code == 200, response.text
                    out.append((response.text, time.perf_counter() - t0))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    return asyncio.run(run())


def settled(gateway: Gateway) -> None:
    """Every count back to zero: the pool's, its policies' and the probes'."""
    pool = gateway.pools["/api"]
    wait_for(lambda: pool.probes_in_flight == 0, 10.0, "probes in flight back to 0")
    assert pool.in_flight == 0 and not any(pool.backend_in_flight.values()) and not pool.at_limit
    for policy in pool.clients:
        assert all(b.in_flight == 0 for b in policy.snapshot(time.monotonic()).backends)


def test_sync_mode_avoids_a_busy_backend() -> None:
    # Wait and probe timeout with room for a loaded machine (five event loops share one GIL): what is
    # pinned is where the answers send requests, not how fast they come.
    settings = PrequalSettings(mode="sync", sync_probes=3, sync_wait_s=0.2)
    release = threading.Event()
    servers = [backend("a"), backend("b"), backend("busy", release=release)]
    with sync_gateway(servers, settings, ProbeSettings(timeout_s=0.5)) as (gateway, gw, urls):
        pool = gateway.pools["/api"]
        assert pool.sync
        get_all(gw.url, 6, 2)  # warm up connections before the baseline of tasks
        settled(gateway)
        baseline = tasks(gw)

        async def hold_busy() -> None:  # HELD requests in flight on "busy", straight to it, until released
            async with httpx.AsyncClient(timeout=90.0) as http:
                await asyncio.gather(*(http.get(urls[2] + "/hold", params={"s": "60"}) for _ in range(HELD)))

        holder = threading.Thread(target=lambda: asyncio.run(hold_busy()), daemon=True)
        holder.start()
        try:
            wait_for(lambda: probe_rif(urls[2]) >= HELD, 10.0, "the busy backend holds its requests")
            answered = get_all(gw.url, 150, 4)
            # The whole load ran while "busy" was busy: checked, not assumed from a duration.
            assert probe_rif(urls[2]) >= HELD, "the busy backend let its requests go during the load"
        finally:
            release.set()
            holder.join(30.0)
        assert not holder.is_alive(), "the held requests did not end"

        counts = Counter(name for name, _ in answered)
        assert counts["busy"] <= 0.05 * len(answered), counts
        policies = [p for p in pool.clients if isinstance(p, PrequalPolicy)]
        assert sum(p.sync_choices for p in policies) >= 0.9 * len(answered), "chosen among the answers"
        settled(gateway)
        assert tasks(gw) - baseline == set(), "no task left behind by sync mode"


def test_a_backend_deaf_to_probes_delays_no_request_beyond_the_wait() -> None:
    # Two of three backends answer probes after 5 s; the probe timeout (3 s) is far beyond the wait
    # (30 ms): only the wait's own bound ends it. One answer is no choice: the async choice decides.
    # A wait that outlived sync_wait_s would last the probe timeout, 3 s: far from the 1.5 s bound below,
    # which leaves room for stalls of the five event loops sharing one GIL.
    wait_s = 0.03
    # No idle probes (every max_idle_s): a deaf one lasts 3 s, so probes in flight would never reach 0.
    settings = PrequalSettings(mode="sync", sync_probes=3, sync_wait_s=wait_s, max_idle_s=600.0)
    deaf = [backend("a"), backend("deaf1", probe_delay_s=5.0), backend("deaf2", probe_delay_s=5.0)]
    # Deaf probes stay in flight for 3 s: a cap above all 40 requests' probes, or later ones are skipped.
    probes = ProbeSettings(timeout_s=3.0, max_in_flight=1000)
    with sync_gateway(deaf, settings, probes) as (gateway, gw, _):
        get_all(gw.url, 3, 1)
        wait_for(lambda: gateway.pools["/api"].probes_in_flight == 0, 10.0, "warm-up probes over")
        baseline = tasks(gw)
        answered = get_all(gw.url, 40, 2)
        seconds = sorted(s for _, s in answered)
        assert seconds[-1] < 1.5, f"slowest {seconds[-1]:.3f} s: the wait outlived sync_wait_s"
        assert seconds[len(seconds) // 2] >= wait_s * 0.9, "too few answers came: each request waited"
        policies = [p for p in gateway.pools["/api"].clients if isinstance(p, PrequalPolicy)]
        assert sum(p.sync_fallbacks for p in policies) >= len(answered) * 0.9
        settled(gateway)
        assert tasks(gw) - baseline == set(), "no task left behind by sync mode"

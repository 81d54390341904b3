"""A backend that lies in its probe answers (issue 12, item 8), through a real gateway.

Three backends behind one Prequal pool: two honest ones (``LoadReportingMiddleware``, ~25 ms per
request) and a liar whose probe answers always say ``x-prequal-rif: 0`` and ``x-prequal-latency-us: 0``
but which takes 300 ms per request. Before the cross-check it took ~90% of the requests (round robin
gives it a third) and the clients' p99 was its 300 ms. The gateway knows better: its own requests in
flight to the liar pile up (a RIF of 0 below them is impossible), and it measures the liar's latency
itself (a report of 0 against 300 ms measured is a lie). With ``PrequalSettings.cross_check`` (on by
default) the liar gets at most about round robin's third (measured: ~4%, against ~91% without it).

What is left for the liar is what an honest slow backend gets too: when both honest backends are hot
(their RIF above the threshold) and the liar holds none of our requests, HCL sends the next one to
the lowest RIF, the liar. So about 4% of the requests still take 300 ms, and the p99 stays near the
liar's 300 ms (round robin's would too); the share of slow requests, p50, p90, the mean and the
throughput are what improve.

Each run is a fresh gateway in-process (uvicorn on loopback), loaded closed-loop by ``CONCURRENCY``
clients for ``LOAD_S`` seconds after a short warm-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from prequal_middleware import Gateway, HealthSettings, UpstreamPool
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.core import PrequalSettings
from tests.helpers import gateway_app
from tests.servers import serve

HONEST_S = 0.025
LIAR_S = 0.300
CONCURRENCY = 12
WARMUP_S = 0.5
LOAD_S = 3.0


def honest_app(name: str) -> Any:
    async def work(request: Request) -> Response:
        await asyncio.sleep(HONEST_S)
        return PlainTextResponse(name)

    return LoadReportingMiddleware(Starlette(routes=[Route("/{path:path}", work)]))


def liar_app() -> Any:
    """Answers every probe "idle and instant", and serves every request in 300 ms."""

    async def probe(request: Request) -> Response:
        return Response(b"", headers={"x-prequal-rif": "0", "x-prequal-latency-us": "0"})

    async def work(request: Request) -> Response:
        await asyncio.sleep(LIAR_S)
        return PlainTextResponse("liar")

    return Starlette(routes=[Route("/_prequal/probe", probe), Route("/{path:path}", work)])


@dataclass
class Measured:
    share: Counter[str]
    latencies: list[float]
    errors: int

    @property
    def liar_share(self) -> float:
        return self.share["liar"] / max(1, sum(self.share.values()))

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("inf")

    @property
    def slow_share(self) -> float:
        """The share of requests that took at least the liar's service time."""
        return sum(1 for t in self.latencies if t >= LIAR_S) / max(1, len(self.latencies))

    @property
    def mean(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else float("inf")

    def line(self, label: str) -> str:
        return (
            f"{label}: {sum(self.share.values())} requests, liar share {self.liar_share:.2f} "
            f"({dict(self.share)}), mean {1000 * self.mean:.0f} ms, p50 {1000 * self.percentile(0.5):.0f} ms, "
            f"p90 {1000 * self.percentile(0.9):.0f} ms, p99 {1000 * self.percentile(0.99):.0f} ms, "
            f"slow share {self.slow_share:.2f}, errors {self.errors}"
        )


async def load(url: str) -> Measured:
    share: Counter[str] = Counter()
    latencies: list[float] = []
    errors = 0
    started = time.monotonic()
    measure_from = started + WARMUP_S
    stop = measure_from + LOAD_S

    async def client(http: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        n = 0
        while time.monotonic() < stop:
            sent = time.monotonic()
            try:
                reply = await http.get(f"/api/{i}/{n}")
            except httpx.TransportError:
                errors += 1
                continue
            n += 1
            if sent >= measure_from:
                latencies.append(time.monotonic() - sent)
                if reply.status_code == 200:
                    share[reply.text] += 1
                else:
                    errors += 1

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits) as http:
        await asyncio.gather(*(client(http, i) for i in range(CONCURRENCY)))
    return Measured(share, latencies, errors)


def measure(prequal: PrequalSettings) -> Measured:
    with serve(honest_app("a")) as a, serve(honest_app("b")) as b, serve(liar_app()) as liar:
        pool = UpstreamPool(
            "/api", upstreams=[a.url, b.url, liar.url], prequal=prequal, health=HealthSettings(path=None)
        )
        with serve(gateway_app(Gateway(pools=[pool]))) as gw:
            return asyncio.run(load(gw.url))


def test_a_lying_backend_does_not_capture_the_pool() -> None:
    after = measure(PrequalSettings())
    print(after.line("cross-check on (default)"))
    assert after.errors == 0
    assert sum(after.share.values()) > 100
    assert after.liar_share <= 0.4, after.line("cross-check on")

    # The old behaviour: no cross-check, and every probe on the network (reports reused within
    # report_max_age_s add the requests sent since, which by itself already takes the liar down to ~50%).
    before = measure(dataclasses.replace(PrequalSettings(), cross_check=False, report_max_age_s=0.0))
    print(before.line("cross-check off (the old behaviour)"))
    assert before.liar_share > 0.6, "without the cross-check the liar captures the pool (the bug reproduced)"
    lines = (after.line("on"), before.line("off"))
    # What the cross-check changes is the share of requests that take the liar's 300 ms (measured: 0.04
    # against 0.92). Percentiles and means of the two runs are not compared: on a busy machine the honest
    # requests slow down too, and with 8% slow requests (a loaded run) the p90 sits on the liar's 300 ms
    # whichever run it is. The p99 sits on those few slow requests either way: it is held to an absolute
    # bound, three of the liar's service times (a queue behind it; two were exceeded by 1 ms once with
    # both CPUs taken by busy loops).
    assert after.slow_share < 0.15, lines  # 0.04 on a quiet machine, 0.08 beside two busy loops
    assert after.slow_share < before.slow_share / 5, lines
    assert after.percentile(0.99) < 3 * LIAR_S, lines

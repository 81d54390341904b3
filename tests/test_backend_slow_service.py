"""A slow service behind LoadReportingMiddleware on a real uvicorn server still reports its latency.

Requests take 1.5 s. Two finish, then more than a second passes before a probe: with the old fixed
1 s window every sample was stale and the probe said 0 at the RIF in flight; the window now follows
the service time, so the probe reports ~1.5 s.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.test_backend import Gate, build, probe, serve

SERVICE_S = 1.5


async def test_a_probe_reports_the_latency_of_a_slow_service_at_the_rif_in_flight() -> None:
    started = time.monotonic()
    middleware, _ = build(Gate())
    with serve(middleware) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:

            async def slow() -> None:
                assert (await http.get("/sleep", params={"s": SERVICE_S})).status_code == 200

            first = asyncio.create_task(slow())  # arrives at RIF 0
            await asyncio.sleep(0.1)
            await asyncio.gather(first, slow())  # the second arrives at RIF 1
            finished = time.monotonic()
            await asyncio.sleep(1.2)  # both samples are now older than the old 1 s window
            in_flight = asyncio.create_task(slow())
            while middleware.tracker.rif < 1:
                await asyncio.sleep(0.01)
            rif, latency_us = await probe(http)
            assert time.monotonic() - finished > 1.0, "the samples really are older than 1 s"
            assert rif == 1
            assert SERVICE_S * 1e6 <= latency_us < (SERVICE_S + 0.5) * 1e6
            await in_flight
    assert time.monotonic() - started < 15.0

"""Piggybacked load reports through a real gateway: backends report on every response, probes fall.

Two backends behind ``LoadReportingMiddleware`` on uvicorn, a Prequal pool in front, on both the aiohttp
and H1 transports. Under steady concurrent load the reports on the responses answer most of the probes
the sampler draws, so far fewer probes go on the network than the sampler draws; the client never sees
the report headers. With ``report_max_age_s=0`` (the paper's rule) every draw is a probe (or one in
flight already).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from prequal_middleware import Gateway, HealthSettings, UpstreamPool
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.core import PrequalPolicy, PrequalSettings
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport
from prequal_middleware.transports.http1 import H1Transport
from tests.helpers import gateway_app
from tests.servers import serve

REQUESTS = 300
CONCURRENCY = 8


def backend(name: str) -> Any:
    async def work(request: Request) -> Response:
        await asyncio.sleep(0.002)
        return PlainTextResponse(name)

    return LoadReportingMiddleware(Starlette(routes=[Route("/{path:path}", work)]))


async def load(url: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        queue = list(range(REQUESTS))
        out: list[httpx.Response] = []

        async def worker() -> None:
            while queue:
                queue.pop()
                out.append(await http.get("/api/x"))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return out


# "default": the gateway's own choice (H1Transport, or what PREQUAL_TEST_TRANSPORT switches it to).
TRANSPORTS: dict[str, Callable[[], Transport | None]] = {
    "default": lambda: None,
    "aiohttp": AiohttpTransport,
    "h1": H1Transport,
}


def run(transport: str, settings: PrequalSettings) -> tuple[list[httpx.Response], PrequalPolicy, int]:
    with serve(backend("a")) as a, serve(backend("b")) as b:
        pool = UpstreamPool("/api", upstreams=[a.url, b.url], prequal=settings, health=HealthSettings(path=None))
        gateway = Gateway(pools=[pool], transport=TRANSPORTS[transport]())
        with serve(gateway_app(gateway)) as gw:
            responses = asyncio.run(load(gw.url))
            policy = gateway.pools["/api"].clients[0]
            assert isinstance(policy, PrequalPolicy)
            assert gateway._scheduler is not None
            return responses, policy, gateway._scheduler.probes_sent


@pytest.mark.parametrize("transport", ["aiohttp", "h1"])
def test_reports_on_responses_answer_most_probes(transport: str) -> None:
    responses, policy, sent = run(transport, PrequalSettings())
    assert [r.status_code for r in responses] == [200] * REQUESTS
    assert all("x-prequal-rif" not in r.headers for r in responses)
    drawn = policy.probes_requested + policy.probes_from_reports + policy.probes_reused + policy.probes_pending
    # One piggybacked report per response, each pooled at its first draw: about one draw in two here.
    assert policy.probes_from_reports > 0.25 * drawn, (policy.probes_from_reports, drawn)
    assert policy.probes_from_reports + policy.probes_reused > 0.7 * drawn, (policy.probes_reused, drawn)
    assert sent < 0.2 * drawn, (sent, drawn)


def test_without_reports_every_draw_is_a_probe() -> None:
    responses, policy, sent = run("default", PrequalSettings(report_max_age_s=0.0))
    assert [r.status_code for r in responses] == [200] * REQUESTS
    assert policy.probes_from_reports == 0 and policy.probes_reused == 0
    # Every draw is a probe on the network, or one already on its way to that backend.
    assert sent == policy.probes_requested > 0.5 * (policy.probes_requested + policy.probes_pending)


def run_quiet(settings: PrequalSettings, requests: int = 40, gap_s: float = 0.03) -> tuple[PrequalPolicy, int]:
    """One request at a time, ``gap_s`` apart: every report is older than ``report_max_age_s`` when read."""

    async def paced(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            statuses = []
            for _ in range(requests):
                statuses.append((await http.get("/api/x")).status_code)
                await asyncio.sleep(gap_s)
            return statuses

    with serve(backend("a")) as a, serve(backend("b")) as b:
        pool = UpstreamPool("/api", upstreams=[a.url, b.url], prequal=settings, health=HealthSettings(path=None))
        gateway = Gateway(pools=[pool], transport=TRANSPORTS["default"]())
        with serve(gateway_app(gateway)) as gw:
            assert asyncio.run(paced(gw.url)) == [200] * requests
            policy = gateway.pools["/api"].clients[0]
            assert isinstance(policy, PrequalPolicy)
            assert gateway._scheduler is not None
            return policy, gateway._scheduler.probes_sent


def test_a_quiet_sole_gateway_reads_its_reports_for_report_max_queries_queries() -> None:
    """``report_max_queries``: the gateway is the backends' only client, so old reports still answer draws."""
    policy, sent = run_quiet(PrequalSettings(report_max_age_s=0.02, report_max_queries=8))
    # 40 queries drawing both backends: the first draws probe, then each backend's report (from its
    # responses, or a probe answer) answers until 8 queries pass without one.
    assert sent <= 12, (sent, policy.probes_from_reports, policy.probes_reused)
    assert policy.probes_from_reports + policy.probes_reused >= 60
    by_age, sent_by_age = run_quiet(PrequalSettings(report_max_age_s=0.02, report_max_queries=0))
    assert sent_by_age >= 35, "every report is 30 ms old: nearly every draw is probed"
    assert by_age.probes_from_reports + by_age.probes_reused <= 10

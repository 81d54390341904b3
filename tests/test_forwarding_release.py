"""The gateway releases a backend's in-flight counts whatever closing its response does (issue 11)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import httpx
import pytest

from prequal_middleware import Gateway, UpstreamPool
from prequal_middleware.config import Timeouts
from prequal_middleware.exceptions import UpstreamProtocolError
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport, UpstreamRequest, UpstreamResponse
from prequal_middleware.transports.http1 import H1Transport
from tests.apps import two_backends
from tests.helpers import gateway_app, wait_for
from tests.servers import ServerThread, serve

SECRET = "close-failed-3f9a"  # in the exception text only: must never reach a client


class CloseFails:
    """The suite's transport, except that closing a response under ``/echo`` raises after closing it.

    As a connection pool that trips while taking the connection back would. Health checks are left alone.
    """

    def __init__(self, error: Exception) -> None:
        # The suite's switch (tests/conftest.py) picks the transport underneath.
        aiohttp = os.environ.get("PREQUAL_TEST_TRANSPORT") == "aiohttp"
        self.inner: Transport = AiohttpTransport() if aiohttp else H1Transport()
        self.error = error
        self.closes = 0

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        response = await self.inner.send(request, timeouts)
        if not request.target.startswith("/echo"):
            return response

        async def close() -> None:
            await response.aclose()
            self.closes += 1
            raise self.error

        return UpstreamResponse(response.status, response.headers, response.body, close)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[ServerThread, ServerThread]]:
    with two_backends() as pair:
        yield pair


def in_flight(gateway: Gateway) -> list[int]:
    """The pool's count and every policy's count per backend."""
    pool = gateway.pools["/api"]
    now = gateway.clock()
    return [pool.in_flight, *(b.in_flight for p in pool.clients for b in p.snapshot(now).backends)]


@pytest.mark.parametrize(
    "error",
    [UpstreamProtocolError(f"reset while closing {SECRET}"), OSError(f"{SECRET}: bad file descriptor")],
    ids=["upstream-error", "other-exception"],
)
def test_a_failing_response_close_still_releases_in_flight_counts(
    backends: tuple[ServerThread, ServerThread], error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = backends
    transport = CloseFails(error)
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[a.url, b.url])], transport=transport)
    with caplog.at_level(logging.WARNING), serve(gateway_app(gateway), proxy_headers=False) as g:
        with httpx.Client(base_url=g.url, timeout=5.0) as client:
            for i in range(6):
                response = client.get(f"/api/echo/{i}")
                assert response.status_code == 200, response.text
                assert response.json()["raw_path"] == f"/echo/{i}"
                assert SECRET not in response.text
                assert client.get("/api/healthz").text == "ok", "the connection is still usable"
        assert transport.closes == 6, "each response was closed once: no retry after the response went out"
        wait_for(lambda: in_flight(gateway) == [0] * len(in_flight(gateway)), what="in-flight counts back to 0")
        assert set(gateway.pools["/api"].backend_in_flight.values()) <= {0}
    assert any("closing" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

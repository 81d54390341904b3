"""Hypothesis fuzzing of upstream response bytes against the transports' parsers (aiohttp and h1).

A raw backend answers the first request of a case with fuzzed bytes (status lines, interim answers,
headers, framing, trailers, a second response behind the first) and every later request, on that
connection or a new one, with a clean ``200 next``. Through one transport, for every case:

- the first exchange is an ``UpstreamError`` (the gateway's 502; so is a 101 aiohttp lets through for
  WebSocket handshakes, which the forwarder refuses on a plain request) or a well-formed response: a final
  status in 200-599, at most one ``Content-Length``, a body of exactly that length when it completes,
  nothing of the response that follows it (``Set-Cookie: stolen``, ``EVIL``);
- the next exchange through the same transport is the clean ``200 next`` or an error, never a leftover
  of the fuzzed bytes: no merged, duplicated or leaked response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from prequal_middleware import Timeouts
from prequal_middleware.exceptions import UpstreamError
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport, UpstreamRequest
from prequal_middleware.transports.http1 import H1Transport
from tests.reliability.rawservers import LoopThread, RawRequest, RawServer

TIMEOUTS = Timeouts(connect_s=2.0, response_headers_s=2.0, read_idle_s=0.5)
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: stolen=1\r\n\r\nEVIL!"
NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"

STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.1 503 Busy",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 600 Beyond",
    b"HTTP/1.1 099 Below",
    b"HTTP/1.1 2000 Long",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK",
    b"HTTX/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1  200 OK",
]
HEADERS = [
    b"Content-Length: 5",
    b"Content-Length: 3",
    b"Content-Length: 50",
    b"Content-Length: -1",
    b"Content-Length: 5, 5",
    b"Content-Length: +5",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, identity",
    b"Set-Cookie: mine=1",
    b"Connection: close",
    b"Connection: keep-alive",
    b"X-Long: " + b"a" * 3000,
    b"Bad Header: x",
    b" Folded: x",
    b"X-Nul: a\x00b",
    b"X-Empty:",
]
BODIES = [
    b"",
    b"hello",
    b"hel",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\nSet-Cookie: trailer=1\r\nContent-Length: 9\r\n\r\n",
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello\r\n",
    b"hello" * 20,
]


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from(STATUS_LINES))
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=4))
    body = draw(st.sampled_from(BODIES))
    head = b"\r\n".join([status, *headers]) + b"\r\n\r\n"
    tail = draw(st.sampled_from([b"", b"", EVIL, b"\r\n" + EVIL, b"garbage"]))
    return head + body + tail


class Fuzzed(RawServer):
    """The first request after ``arm``: ``payload``; every later one, on any connection: ``NEXT``."""

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self.payload = b""
        self.served = False

    def arm(self, payload: bytes) -> None:
        self.payload = payload
        self.served = False

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(NEXT if self.served else self.payload)
        self.served = True
        return True


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    loop = LoopThread().start()
    server = Fuzzed(loop).start()
    try:
        yield server
    finally:
        server.stop()
        loop.stop()


async def exchange(transport: Transport, url: str, target: str) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """(status, headers, body) of one complete exchange, or None when the transport raised (a 502)."""
    try:
        response = await transport.send(UpstreamRequest("GET", url, target, []), TIMEOUTS)
    except UpstreamError:
        return None
    try:
        chunks: list[bytes] = []
        async for chunk in response.body:
            chunks.append(chunk)
        return response.status, list(response.headers), b"".join(chunks)
    except UpstreamError:
        return None  # cut mid-body: the client sees an incomplete response, never a merged one
    finally:
        await response.aclose()


def make(kind: str) -> Transport:
    return AiohttpTransport() if kind == "aiohttp" else H1Transport()


@pytest.mark.parametrize("kind", ["aiohttp", "h1"])
def test_fuzzed_responses_are_well_formed_or_502(fuzzed: Fuzzed, kind: str) -> None:
    url = f"http://127.0.0.1:{fuzzed.port}"
    seen = {"ok": 0, "error": 0}

    async def run(payload: bytes) -> None:
        fuzzed.arm(payload)
        transport = make(kind)
        try:
            first = await exchange(transport, url, "/fuzz")
            if first is not None and kind == "aiohttp" and first[0] == 101:
                first = None  # aiohttp lets 101 through for WebSocket handshakes; the forwarder makes it a 502
            if first is not None:
                status, headers, body = first
                assert 200 <= status <= 599, (payload, status)
                lengths = [v for k, v in headers if k.lower() == b"content-length"]
                assert len(lengths) <= 1, (payload, headers)
                if lengths and status not in (204, 304):
                    assert len(body) == int(lengths[0]), (payload, lengths, body)
                assert b"stolen" not in b"".join(v for _, v in headers), (payload, headers)
                assert b"trailer=1" not in b"".join(v for _, v in headers), (payload, headers)
                assert b"EVIL" not in body or payload.count(b"EVIL") > 1, (payload, body)
                seen["ok"] += 1
            else:
                seen["error"] += 1
            second = await exchange(transport, url, "/next")
            if second is not None:
                assert second[0] == 200 and second[2] == b"next", (payload, second)
                assert b"stolen" not in b"".join(v for _, v in second[1]), (payload, second)
        finally:
            await transport.aclose()

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(payload=responses())
    def case(payload: bytes) -> None:
        asyncio.run(run(payload))

    case()
    # Both branches exercised. How many fuzzed answers aiohttp completes depends on timing (those it waits
    # on past the timeout are errors): 9 of 150 on a quiet machine, 4 in a busy CI run. So: at least one.
    assert seen["ok"] >= 1 and seen["error"] >= 5, seen

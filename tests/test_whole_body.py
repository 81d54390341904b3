"""An answer whose body arrived with its head: ``H1Transport`` frees the connection at once and hands the
body over as a ``WholeBody``, which the forwarder sends in one ASGI message."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

from prequal_middleware import Gateway, PrequalMiddleware, Timeouts, UpstreamPool
from prequal_middleware.config import HealthSettings
from prequal_middleware.transports.base import UpstreamRequest, UpstreamResponse, WholeBody
from prequal_middleware.transports.http1 import H1Transport
from tests.test_probe_client import raw_server

FAST = Timeouts(connect_s=1.0, response_headers_s=1.0, read_idle_s=1.0)
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


async def test_a_whole_answer_frees_its_connection_before_its_body_is_read() -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ANSWER)  # head and body in one write: they arrive together
            await writer.drain()

    transport = H1Transport()
    try:
        async with raw_server(handle) as url:
            first = await transport.send(UpstreamRequest("GET", url, "/a", []), FAST)
            second = await transport.send(UpstreamRequest("GET", url, "/b", []), FAST)
            assert connections == 1, "the first answer's connection was free for the second request"
            assert type(first.body) is WholeBody and type(second.body) is WholeBody
            assert [chunk async for chunk in first.body] == [b"hello"]
            assert [chunk async for chunk in first.body] == [], "one chunk, read once"
            assert second.body.data == b"hello"
            await first.aclose()
            await second.aclose()
    finally:
        await transport.aclose()


async def test_a_body_that_comes_after_its_head_streams_and_holds_its_connection() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER[:-5])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"hello")
        await writer.drain()
        await reader.read()

    transport = H1Transport()
    try:
        async with raw_server(handle) as url:
            response = await transport.send(UpstreamRequest("GET", url, "/a", []), FAST)
            assert type(response.body) is not WholeBody
            assert b"".join([chunk async for chunk in response.body]) == b"hello"
            await response.aclose()
    finally:
        await transport.aclose()


class Canned:
    """A transport answering every request with one ``UpstreamResponse`` made by ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        return self.answer()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        pass


async def relay(answer: Any) -> list[dict[str, Any]]:
    """The ASGI messages the gateway sends its client for ``GET /api/x`` answered by ``answer``."""
    pool = UpstreamPool("/api", upstreams=["http://b1.invalid"], policy="round_robin", health=HealthSettings(path=None))
    gateway = Gateway([pool], transport=Canned(answer), request_id_header=None)
    app = PrequalMiddleware(lambda scope, receive, send: None, gateway=gateway)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/x",
        "raw_path": b"/api/x",
        "query_string": b"",
        "headers": [(b"host", b"gw")],
        "http_version": "1.1",
        "scheme": "http",
        "client": ("127.0.0.1", 5000),
    }
    async with gateway:
        for _ in range(200):  # the static members join at the scheduler's first sync
            if gateway.readiness().ready:
                break
            await asyncio.sleep(0.01)
        await app(scope, receive, send)
    return [m for m in sent if m["type"] == "http.response.body"]


async def test_the_forwarder_sends_a_whole_body_in_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer() -> UpstreamResponse:
        return UpstreamResponse(200, [(b"content-length", b"5")], WholeBody(b"hello"))

    async def never(self: WholeBody) -> bytes:
        raise AssertionError("a whole body is sent as it is, not iterated")

    monkeypatch.setattr(WholeBody, "__anext__", never)
    assert await relay(answer) == [{"type": "http.response.body", "body": b"hello", "more_body": False}]
    monkeypatch.undo()
    assert await relay(answer) == [{"type": "http.response.body", "body": b"hello", "more_body": False}]


async def test_a_whole_body_that_disagrees_with_its_length_is_not_sent_as_complete() -> None:
    def answer() -> UpstreamResponse:
        return UpstreamResponse(200, [(b"content-length", b"7")], WholeBody(b"hello"))

    messages = await relay(answer)
    assert {"type": "http.response.body", "body": b"hello", "more_body": False} not in messages
    assert messages[:1] == [{"type": "http.response.body", "body": b"hello", "more_body": True}]


async def _chunks() -> AsyncIterator[bytes]:
    yield b"hel"
    yield b"lo"


@pytest.mark.parametrize("length", [b"5", None])
async def test_a_streamed_body_is_still_relayed_chunk_by_chunk(length: bytes | None) -> None:
    def answer() -> UpstreamResponse:
        headers = [(b"content-length", length)] if length else []
        return UpstreamResponse(200, headers, _chunks())

    messages = await relay(answer)
    assert b"".join(m["body"] for m in messages) == b"hello"
    assert messages[0] == {"type": "http.response.body", "body": b"hel", "more_body": True}
    assert messages[-1]["more_body"] is False


class _Body:
    """A one-byte request body that can be watched with a weak reference."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield b"x"


async def test_an_idle_connection_keeps_no_request_alive() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(1)
            writer.write(ANSWER[:-5])  # the head first, the body later: both deadlines are armed
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"hello")
            await writer.drain()

    transport = H1Transport()
    try:
        async with raw_server(handle) as url:
            body = _Body()
            watched = weakref.ref(body)
            request = UpstreamRequest("POST", url, "/a", [(b"content-length", b"1")], body, 1)
            response = await transport.send(request, FAST)
            assert b"".join([chunk async for chunk in response.body]) == b"hello"
            await response.aclose()
            del body, request, response
            gc.collect()
            assert watched() is None, "the idle connection still holds the request"
    finally:
        await transport.aclose()

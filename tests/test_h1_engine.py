"""One HTTP/1.1 engine (``transports.h1_connection``, ``transports.h1_pool``) under both of its users.

The forwarding transport (``H1Transport``) and the probe client (``ProbeClient``) share the parser
callbacks, framing, interim-answer rules, connection pools and idle sweep; each brings its own bounds.
These tests pin the sharing; the behaviour of each user is pinned in tests/test_transport_h1.py,
tests/test_probe_client.py and tests/security/.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import prequal_middleware.transports.http1 as http1
import prequal_middleware.transports.probe as probe
from prequal_middleware import Timeouts
from prequal_middleware.exceptions import UpstreamProtocolError
from prequal_middleware.transports.base import UpstreamRequest
from prequal_middleware.transports.h1_connection import H1Connection
from prequal_middleware.transports.h1_pool import H1Pool
from prequal_middleware.transports.http1 import H1Transport
from prequal_middleware.transports.probe import MAX_BODY_BYTES, ProbeClient, ProbeFailed, ProbeResult

FAST = Timeouts(connect_s=1.0, response_headers_s=1.0, read_idle_s=1.0)
LOAD = b"x-prequal-rif: 3\r\nx-prequal-latency-us: 250\r\n"


@contextlib.asynccontextmanager
async def answering(reply: bytes) -> AsyncIterator[str]:
    """A loopback server answering every request on a connection with ``reply``; yields its URL."""
    handlers: list[asyncio.Task[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(reply)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers)
        await server.wait_closed()


async def forward(transport: H1Transport, url: str) -> tuple[int, bytes]:
    response = await transport.send(UpstreamRequest("GET", url, "/", [], None), FAST)
    body = b"".join([chunk async for chunk in response.body])
    return response.status, body


async def eventually(check: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.02)


def test_the_probe_client_and_the_transport_run_on_the_same_engine() -> None:
    client, transport = ProbeClient(), H1Transport()
    assert type(client._pool) is H1Pool and type(transport._pool) is H1Pool
    assert issubclass(probe._ProbeConnection, H1Connection) and issubclass(http1._Connection, H1Connection)
    for subclass in (probe._ProbeConnection, http1._Connection):
        for callback in ("data_received", "connection_lost", "on_header", "on_headers_complete", "on_body"):
            assert getattr(subclass, callback) is getattr(H1Connection, callback), f"{subclass} {callback}"
    # No second HTTP/1.1 client: the probe module has no parser and no URL parsing of its own.
    assert not hasattr(probe, "httptools") and not hasattr(probe, "urlsplit")


async def test_an_idle_probe_connection_is_swept_by_the_engine_sweep() -> None:
    client = ProbeClient(timeout_s=1.0, keepalive_s=0.1)
    try:
        async with answering(b"HTTP/1.1 200 OK\r\n" + LOAD + b"content-length: 0\r\n\r\n") as url:
            assert await client.probe(url) == ProbeResult(3, 0.00025)
            (conn,) = client._open
            assert client._backends[url].idle == [conn]
            await eventually(lambda: client.open_connections == 0)  # no probe came: the sweep closed it
            assert conn.closed and conn.transport is not None and conn.transport.is_closing()
            assert client.backends_known == 0, "an origin with nothing open is forgotten, as the transport's"
            assert await client.probe(url) == ProbeResult(3, 0.00025), "a new connection after the sweep"
    finally:
        await client.aclose()


async def test_a_body_the_transport_forwards_is_over_the_probe_bound_and_closes_the_probe_connection() -> None:
    body = b"b" * (MAX_BODY_BYTES + 1)
    reply = b"HTTP/1.1 200 OK\r\n" + LOAD + b"content-length: %d\r\n\r\n" % len(body) + body
    client, transport = ProbeClient(timeout_s=1.0), H1Transport()
    try:
        async with answering(reply) as url:
            assert await forward(transport, url) == (200, body), "the transport has no body bound"
            assert len(transport._origins[url].idle) == 1, "and keeps its connection"
            with pytest.raises(ProbeFailed, match=f"body larger than {MAX_BODY_BYTES} bytes"):
                await client.probe(url)
            await asyncio.sleep(0)
            assert client.open_connections == 0 and client._backends[url].idle == []
    finally:
        await client.aclose()
        await transport.aclose()


@pytest.mark.parametrize("interim", [b"HTTP/1.1 102 Processing\r\n\r\n", b"HTTP/1.1 101 Switching\r\n\r\n"])
async def test_one_interim_rule_for_both(interim: bytes) -> None:
    """Only 100 and 103 may come before the answer, to the transport and to the probe client alike."""
    reply = interim + b"HTTP/1.1 200 OK\r\n" + LOAD + b"content-length: 0\r\n\r\n"
    client, transport = ProbeClient(timeout_s=1.0), H1Transport()
    try:
        async with answering(reply) as url:
            with pytest.raises(UpstreamProtocolError, match="interim|upgrade"):
                await forward(transport, url)
            with pytest.raises(ProbeFailed, match="interim|upgrade"):
                await client.probe(url)
    finally:
        await client.aclose()
        await transport.aclose()


async def test_an_unframed_answer_is_read_to_its_end_by_the_transport_and_taken_at_its_head_by_a_probe() -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + LOAD + b"\r\nthe body runs to the end of the connection"

    handlers: list[asyncio.Task[Any]] = []

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
            if request.startswith(b"GET /_prequal/"):
                await asyncio.sleep(2)  # the probe's answer never ends: it must not wait for the end
        finally:
            writer.close()

    server = await asyncio.start_server(once, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client, transport = ProbeClient(timeout_s=1.0), H1Transport()
    try:
        assert await forward(transport, url) == (200, b"the body runs to the end of the connection")
        assert await client.probe(url) == ProbeResult(3, 0.00025)
        await asyncio.sleep(0)
        assert client.open_connections == 0, "an unframed answer's connection is not kept"
    finally:
        await client.aclose()
        await transport.aclose()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_cancel_as_the_connect_completes_closes_the_connection() -> None:
    """The pool made the protocol, so a connect cancelled at any point frees its slot and its socket."""
    transport = H1Transport(limit_per_backend=1)
    try:
        async with answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as url:
            origin = transport._pool.origin(url)
            loop = asyncio.get_running_loop()
            for delay in range(6):  # cancel after 0..5 loop iterations: before, during and after the connect
                task = loop.create_task(transport._pool.connect(origin, loop.time() + 1.0))
                for _ in range(delay):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    (await task).abort()  # it won the race: close it as a caller would
                await asyncio.sleep(0.01)
                assert origin.open == 0 and transport._pool.connections == set(), f"cancelled after {delay}"
            assert await forward(transport, url) == (200, b""), "the one slot is free"
    finally:
        await transport.aclose()


async def test_bytes_after_a_chunked_end_close_the_connection_and_the_forwarded_answer_stands() -> None:
    """The end of the body and a stray answer in one read: the reader is told the body ended (no wait
    for ``read_idle_s``) and the connection is not reused; to a probe the same bytes are a failure."""
    handlers: list[asyncio.Task[Any]] = []

    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n" + LOAD + b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(2)
        finally:
            writer.close()

    server = await asyncio.start_server(split, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client, transport = ProbeClient(timeout_s=1.0), H1Transport()
    try:
        started = asyncio.get_running_loop().time()
        assert await forward(transport, url) == (200, b"hello")
        assert asyncio.get_running_loop().time() - started < 0.5, "told at the end, not at the idle timeout"
        assert transport._pool.connections == set() and transport._origins[url].idle == []
        with pytest.raises(ProbeFailed, match="bytes after the response"):
            await client.probe(url)
    finally:
        await client.aclose()
        await transport.aclose()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_a_connection_of_an_origin_the_sweep_forgot_is_closed_after_use_not_kept() -> None:
    """An origin with nothing open is forgotten by the sweep while a request may still hold it: its
    connection must not go idle where no sweep and no request will ever look again."""
    transport = H1Transport()
    try:
        async with answering(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as url:
            pool = transport._pool
            origin = pool.origin(url)  # held, as by a request about to connect
            pool._sweep_idle()  # nothing open: forgotten
            assert url not in pool.origins
            loop = asyncio.get_running_loop()
            conn = await pool.connect(origin, loop.time() + 1.0)
            conn.keep_alive = True  # as after a complete kept-alive exchange
            pool.release(conn, loop.time())
            assert conn.closed and origin.idle == [] and pool.connections == set()
    finally:
        await transport.aclose()

"""``H1Transport`` against real uvicorn backends on loopback: keep-alive, limits, timeouts, errors.

It is the gateway's default transport, so the gateway's behaviour suites (data plane, reliability,
security, TLS) run on it; ``tests/test_transport_aiohttp_suites.py`` runs the data-plane suites on the
opt-in ``AiohttpTransport`` as well (``PREQUAL_TEST_TRANSPORT=aiohttp``, see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from prequal_middleware import Timeouts
from prequal_middleware.exceptions import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from prequal_middleware.transports.base import UpstreamRequest
from prequal_middleware.transports.http1 import H1Transport
from tests.servers import ServerThread, free_port

REPO = Path(__file__).resolve().parents[1]
FAST = Timeouts(connect_s=1.0, response_headers_s=1.0, read_idle_s=1.0)


class Backend:
    """A raw ASGI backend that reports which client port each request came from (one per connection)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if path == "/slow":
                await asyncio.sleep(0.2)
            elif path == "/hang":
                await asyncio.sleep(2)
            headers = [(b"content-type", b"text/plain"), (b"x-client-port", str(scope["client"][1]).encode())]
            if path == "/stall-body":
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": b"first", "more_body": True})
                await asyncio.sleep(2)
                return
            if path == "/big":
                payload = b"x" * (1 << 20)
            elif path == "/echo":
                framing = b"chunked" if (b"transfer-encoding", b"chunked") in scope["headers"] else b"length"
                payload = framing + b":" + body
            else:
                payload = b"hello"
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload})
        finally:
            self.in_flight -= 1


@pytest.fixture
def backend() -> Iterator[tuple[ServerThread, Backend]]:
    app = Backend()
    server = ServerThread(app, timeout_keep_alive=2).start()
    try:
        yield server, app
    finally:
        server.stop()


async def fetch(
    transport: H1Transport, url: str, path: str, method: str = "GET", **kw: Any
) -> tuple[int, dict[bytes, bytes], bytes]:
    timeouts = kw.pop("timeouts", FAST)
    response = await transport.send(UpstreamRequest(method, url, path, [], **kw), timeouts)
    try:
        body = b"".join([chunk async for chunk in response.body])
    finally:
        await response.aclose()
    return response.status, dict(response.headers), body


async def test_keep_alive_reuses_one_connection(backend: tuple[ServerThread, Backend]) -> None:
    server, _ = backend
    transport = H1Transport()
    try:
        ports = set()
        for _ in range(20):
            status, headers, body = await fetch(transport, server.url, "/x")
            assert (status, body) == (200, b"hello")
            ports.add(headers[b"x-client-port"])
        assert len(ports) == 1, "every request on the same keep-alive connection"
        status, headers, body = await fetch(transport, server.url, "/x", "HEAD")
        assert (status, body, headers[b"content-length"]) == (200, b"", b"5")
        status, after_head, body = await fetch(transport, server.url, "/x")
        assert (status, body) == (200, b"hello"), "a HEAD answer leaves the connection usable"
        assert after_head[b"x-client-port"] in ports
    finally:
        await transport.aclose()


async def test_a_connection_the_backend_closed_while_idle_is_replaced(backend: tuple[ServerThread, Backend]) -> None:
    server = ServerThread(Backend(), timeout_keep_alive=0.1).start()  # closes idle connections quickly
    transport = H1Transport()
    try:
        _, first, _ = await fetch(transport, server.url, "/x")
        # Polled: the backend closes it after 0.1 s idle, later on a loaded machine; a connection whose
        # close the transport never notices stays in its pool and this times out.
        deadline = asyncio.get_running_loop().time() + 5.0
        while transport._pool.connections:
            assert asyncio.get_running_loop().time() < deadline, "the idle connection was never dropped"
            await asyncio.sleep(0.01)
        status, second, body = await fetch(transport, server.url, "/x")
        assert (status, body) == (200, b"hello")
        assert second[b"x-client-port"] != first[b"x-client-port"]
    finally:
        await transport.aclose()
        server.stop()


async def test_only_idempotent_requests_are_resent_when_a_reused_connection_closes() -> None:
    # A raw server that answers the first request of a connection and drops the connection, unanswered,
    # on the second: to the client that looks like a keep-alive connection closed as it was reused.
    seen: list[tuple[str, int]] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number, answered = connections, 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append((head.split(b" ", 1)[0].decode(), number))
                if answered:
                    break  # the second request: close without a word
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                answered += 1
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    transport = H1Transport()
    try:
        assert (await fetch(transport, url, "/a"))[2] == b"ok"  # connection 1, now idle
        assert (await fetch(transport, url, "/b"))[2] == b"ok", "GET resent on a fresh connection"
        assert seen == [("GET", 1), ("GET", 1), ("GET", 2)]
        with pytest.raises(UpstreamProtocolError) as post:
            await fetch(transport, url, "/c", "POST")  # reuses connection 2, which drops it
        assert post.value.sent, "the POST may have reached the backend: never sent twice"
        assert seen[3:] == [("POST", 2)]
    finally:
        await transport.aclose()
        server.close()
        await server.wait_closed()


async def test_limit_per_backend_queues_requests(backend: tuple[ServerThread, Backend]) -> None:
    server, app = backend
    transport = H1Transport(limit_per_backend=2)
    try:
        results = await asyncio.gather(*(fetch(transport, server.url, "/slow") for _ in range(6)))
        assert [r[2] for r in results] == [b"hello"] * 6
        assert app.max_in_flight == 2
        assert len({r[1][b"x-client-port"] for r in results}) == 2, "the two connections were reused"
    finally:
        await transport.aclose()


async def test_bodies_stream_both_ways_framed_right(backend: tuple[ServerThread, Backend]) -> None:
    server, _ = backend
    transport = H1Transport()

    async def chunks() -> AsyncIterator[bytes]:
        for piece in (b"ab", b"", b"cd" * 1000):
            yield piece

    try:
        status, _, body = await fetch(transport, server.url, "/echo", "POST", body=chunks())
        assert (status, body) == (200, b"chunked:ab" + b"cd" * 1000), "unknown length: chunked"
        length_headers = [(b"content-length", b"2002")]
        response = await transport.send(
            UpstreamRequest("POST", server.url, "/echo", length_headers, chunks(), 2002), FAST
        )
        assert b"".join([c async for c in response.body]) == b"length:ab" + b"cd" * 1000
        status, _, body = await fetch(transport, server.url, "/big")
        assert len(body) == 1 << 20
    finally:
        await transport.aclose()


async def test_errors_say_whether_the_request_was_sent(backend: tuple[ServerThread, Backend]) -> None:
    server, _ = backend
    transport = H1Transport()
    try:
        with pytest.raises(UpstreamConnectError) as refused:
            await fetch(transport, f"http://127.0.0.1:{free_port()}", "/x")
        assert refused.value.sent is False
        with pytest.raises(UpstreamTimeout) as headers:
            await fetch(
                transport,
                server.url,
                "/hang",
                timeouts=Timeouts(connect_s=1.0, response_headers_s=0.2, read_idle_s=1.0),
            )
        assert headers.value.phase == "headers" and headers.value.sent
        response = await transport.send(
            UpstreamRequest("GET", server.url, "/stall-body", []),
            Timeouts(connect_s=1.0, response_headers_s=1.0, read_idle_s=0.2),
        )
        got = []
        with pytest.raises(UpstreamTimeout) as body:
            async for chunk in response.body:
                got.append(chunk)
        assert got == [b"first"] and body.value.phase == "body"
        await response.aclose()
        # After all that, the transport still serves (the broken connections were dropped).
        assert (await fetch(transport, server.url, "/x"))[2] == b"hello"
    finally:
        await transport.aclose()


async def test_closing_a_response_early_closes_its_connection(backend: tuple[ServerThread, Backend]) -> None:
    server, _ = backend
    transport = H1Transport()
    try:
        response = await transport.send(UpstreamRequest("GET", server.url, "/big", []), FAST)
        first = dict(response.headers)[b"x-client-port"]
        await response.aclose()  # the client left: the rest of the body is not wanted
        _, headers, body = await fetch(transport, server.url, "/x")
        assert body == b"hello" and headers[b"x-client-port"] != first
        with pytest.raises(UpstreamProtocolError):
            async for _ in response.body:
                pass
    finally:
        await transport.aclose()
    with pytest.raises(UpstreamConnectError):
        await transport.send(UpstreamRequest("GET", server.url, "/x", []), FAST)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None and not os.environ.get("CI"), reason="needs the openssl CLI")
async def test_https_backends_are_verified(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    server = ServerThread(Backend(), ssl_keyfile=str(key), ssl_certfile=str(cert)).start()
    url = f"https://127.0.0.1:{server.port}"
    trusting = H1Transport(ssl=ssl.create_default_context(cafile=str(cert)))
    default = H1Transport()  # the system's CAs: a self-signed certificate is refused
    try:
        for _ in range(3):
            status, _, body = await fetch(trusting, url, "/x")
            assert (status, body) == (200, b"hello")
        with pytest.raises(UpstreamConnectError) as refused:
            await fetch(default, url, "/x")
        assert refused.value.sent is False
    finally:
        await trusting.aclose()
        await default.aclose()
        server.stop()

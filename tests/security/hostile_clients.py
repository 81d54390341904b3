"""Hostile clients and a scriptable raw backend for the security suite (issue 12).

- ``HostileBackend``: a raw HTTP/1.1 backend (``tests.reliability.rawservers``) that redirects to
  itself, refuses or completes WebSocket handshakes, and counts the requests and sockets it holds.
- ``Dribbler``: a client that declares a body and sends it a few bytes at a time, in a thread.
- ``ws_open`` / ``ws_handshake``: a raw WebSocket handshake, kept open or answered and closed.
- ``gateway_procs``: one gateway process per uvicorn parser (httptools, h11) and upstream transport
  (aiohttp, h1), like ``test_request_targets``.

Everything here speaks raw bytes on sockets, so what a hostile client sends is exactly what the test says.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.reliability.procs import HttpProc, gateway_proc
from tests.reliability.rawclient import RawResponse, exchange, parse
from tests.reliability.rawservers import PROBE_PATH, RawRequest, RawServer, response
from tests.reliability.support import pools_env

SERVERS = ("httptools", "h11")
TRANSPORTS = ("aiohttp", "h1")
COMBINATIONS = [(h, t) for h in SERVERS for t in TRANSPORTS]
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


class HostileBackend(RawServer):
    """A backend whose answer the path picks.

    - ``.../redirect``: 302 to ``<its own URL>/target?x=1`` (an absolute ``Location`` at the backend);
    - a WebSocket handshake on ``/refuse``: 403; on any other path: 101, then held until the peer
      closes (``open_sockets`` counts them);
    - anything else: 200 ``ok``. Probes get 404 (the gateway uses its own view), health checks 200.

    Every request but probes and health checks is recorded in ``requests``.
    """

    def __init__(self, loop: Any) -> None:
        super().__init__(loop)
        self.requests: list[RawRequest] = []
        self.refused = 0
        self.open_sockets = 0

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if request.path == PROBE_PATH:
            writer.write(response(404, b"no probes here"))
            return True
        if request.path == b"/healthz":
            writer.write(response(200, b"ok"))
            return True
        self.requests.append(request)
        if request.header_values(b"upgrade") == [b"websocket"]:
            if request.path == b"/refuse":
                self.refused += 1
                writer.write(response(403, b"forbidden"))
                return True
            key = (request.header_values(b"sec-websocket-key") or [b""])[0]
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: " + ws_accept(key) + b"\r\n\r\n"
            )
            await writer.drain()
            self.open_sockets += 1
            try:
                while await reader.read(65536):
                    pass  # frames are ignored; held until the gateway closes
            finally:
                self.open_sockets -= 1
            return False
        if request.path.endswith(b"/redirect"):
            writer.write(response(302, b"", [(b"location", self.url.encode() + b"/target?x=1")]))
            return True
        writer.write(response(200, b"ok", [(b"x-backend", b"hostile")]))
        return True


# --- clients --------------------------------------------------------------------------------------


def request(
    port: int, target: bytes, headers: bytes = b"", *, method: bytes = b"GET", host: bytes = b"gw"
) -> list[RawResponse]:
    """One request on a fresh connection; the final (non-1xx) responses."""
    head = method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + headers
    payload = head + b"Connection: close\r\n\r\n"
    responses, _ = exchange(port, payload)
    return [r for r in responses if r.status >= 200]


def ws_handshake_bytes(target: bytes, host: bytes = b"gw") -> bytes:
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + WS_KEY + b"\r\n\r\n"
    )


def ws_open(port: int, target: bytes, timeout_s: float = 5.0) -> tuple[socket.socket, int]:
    """Send a WebSocket handshake; return the open socket and the status it was answered with."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.sendall(ws_handshake_bytes(target))
    data = b""
    deadline = time.monotonic() + timeout_s
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return sock, status


def ws_handshake(port: int, target: bytes) -> tuple[int, bytes]:
    """A WebSocket handshake on a fresh connection: (status, body) of the answer (0 for none)."""
    responses, _ = exchange(port, ws_handshake_bytes(target), idle_s=0.3)
    if not responses:
        return 0, b""
    return responses[0].status, responses[0].body


class Dribbler:
    """A client that sends ``head`` then ``total`` body bytes, ``step`` bytes every ``interval_s``, in a thread.

    ``status`` is the status of the response it got (0 while none); ``answered_after`` how long after
    the start it came. ``stop()`` closes the socket.
    """

    def __init__(self, port: int, head: bytes, total: int, *, step: int = 1, interval_s: float = 0.1) -> None:
        self.port = port
        self.head = head
        self.total = total
        self.step = step
        self.interval_s = interval_s
        self.status = 0
        self.body = b""
        self.answered_after: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def start(self, prefix: bytes = b"") -> Dribbler:
        self._prefix = prefix
        self._started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        except OSError:
            return
        data = b""
        try:
            sock.sendall(self.head + self._prefix)
            sock.setblocking(False)
            sent = len(self._prefix)
            while not self._stop.is_set():
                if sent < self.total:
                    piece = b"x" * min(self.step, self.total - sent)
                    try:
                        sock.send(piece)
                        sent += len(piece)
                    except (BlockingIOError, InterruptedError):
                        pass
                try:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    parsed = parse(data)[0]
                    if parsed:
                        self.status = parsed[0].status
                        self.body = parsed[0].body
                        self.answered_after = time.monotonic() - self._started
                        break
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    break
                self._stop.wait(self.interval_s)
        except OSError:
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --- gateways -------------------------------------------------------------------------------------


@contextmanager
def gateway_procs(
    name: str, log_dir: Path, pools: dict[str, Any], **env: str
) -> Iterator[dict[tuple[str, str], HttpProc]]:
    """A gateway process per (uvicorn parser, upstream transport), all with ``pools``; stopped at the end."""
    procs: dict[tuple[str, str], HttpProc] = {}
    for http, transport in COMBINATIONS:
        proc_env = pools_env(pools, PREQUAL_TRANSPORT=transport, **env)
        procs[(http, transport)] = gateway_proc(
            f"{name}-{http}-{transport}", log_dir, proc_env, http=http, record_attempts=True
        )
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_http(proc.url + "/_prequal/healthz")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()

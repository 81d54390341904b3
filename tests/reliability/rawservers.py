"""Raw asyncio HTTP/1.1 servers that misbehave on purpose, in a thread of the test process.

- ``BlackHole``: answers probes with zero load and health checks with 200, then never answers a
  request: the worst backend a load-aware balancer can meet. Counts requests held open at once.
- ``Resetter``: breaks exchanges at chosen points: RST mid-body, RST before any response byte,
  FIN short of the declared length.
- ``Recorder``: a well-behaved backend that records each request exactly as it arrived (raw head,
  headers, framing, body), to check what a gateway really sends upstream.

Each request is parsed by hand: the head up to the blank line, the body by ``Content-Length`` or
chunked; anything else is recorded as malformed and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

T = TypeVar("T")
PROBE_PATH = b"/_prequal/probe"


class LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="raw-servers", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RawRequest:
    method: bytes
    target: bytes
    version: bytes
    head: bytes  # the request line and header lines, exactly as received
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values stripped, duplicates kept
    body: bytes
    framing: str  # "none", "length", "chunked"
    at: float = field(default_factory=time.time)

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


class Malformed(Exception):
    pass


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """One request from ``reader``; ``None`` at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise Malformed(f"connection closed mid-head: {exc.partial[:80]!r}") from None
    except asyncio.LimitOverrunError:
        raise Malformed("head too long") from None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Malformed(f"bad request line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise Malformed(f"bad header line {line[:80]!r}")
        headers.append((name.lower(), value.strip(b" \t")))
    te = [v for k, v in headers if k == b"transfer-encoding"]
    cl = [v for k, v in headers if k == b"content-length"]
    if te and cl:
        raise Malformed("both Transfer-Encoding and Content-Length")
    if len(cl) > 1:
        raise Malformed(f"{len(cl)} Content-Length headers")
    body = b""
    framing = "none"
    if te:
        if te != [b"chunked"]:
            raise Malformed(f"Transfer-Encoding {te!r}")
        framing = "chunked"
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise Malformed("bad chunk end")
        body = b"".join(chunks)
    elif cl:
        if not cl[0].isdigit():
            raise Malformed(f"Content-Length {cl[0]!r}")
        framing = "length"
        body = await reader.readexactly(int(cl[0]))
    return RawRequest(parts[0], parts[1], parts[2], head, headers, body, framing)


def response(status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    lines = [b"HTTP/1.1 %d X" % status, b"content-length: %d" % len(body)]
    lines += [k + b": " + v for k, v in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


PROBE_ZERO = response(200, b'{"rif": 0, "latency_s": 0.0}', [(b"x-prequal-rif", b"0"), (b"x-prequal-latency-us", b"0")])


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class RawServer:
    """A loopback HTTP/1.1 server on ``loop``; subclasses implement ``handle``."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.port = 0
        self._server: asyncio.Server | None = None
        self.malformed: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        async def go() -> int:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, limit=1 << 20)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self.loop.call(go())
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            self.loop.call(close())

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await read_request(reader)
                except Malformed as exc:
                    self.malformed.append(str(exc))
                    writer.write(response(400, b"malformed"))
                    break
                if request is None:
                    break
                if not await self.handle(request, reader, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer ``request``; return whether to keep the connection for another."""
        raise NotImplementedError


class BlackHole(RawServer):
    """Probes: zero load. Health: 200. Anything else: held until the peer closes, never answered."""

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self.holding = 0
        self.max_holding = 0
        self.requests = 0
        self.held: list[tuple[float, float]] = []  # (arrived, peer closed) per request

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if request.path == PROBE_PATH:
            writer.write(PROBE_ZERO)
            return True
        if request.path == b"/healthz":
            writer.write(response(200, b"ok"))
            return True
        self.requests += 1
        self.holding += 1
        self.max_holding = max(self.max_holding, self.holding)
        arrived = time.time()
        try:
            while await reader.read(65536):
                pass  # until the gateway gives up and closes
        finally:
            self.holding -= 1
            self.held.append((arrived, time.time()))
        return False


class Resetter(RawServer):
    """Breaks the exchange as the path says: ``/rst-mid-body``, ``/rst-mid-chunked``, ``/rst-before-response``,
    ``/fin-mid-body``; ``/ok`` answers normally. Probes get zero load, health checks 200."""

    TOTAL = 1_000_000
    SENT = 100_000

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self.broken = 0

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        path = request.path
        if path == PROBE_PATH:
            writer.write(PROBE_ZERO)
            return True
        if path in (b"/healthz", b"/ok"):
            writer.write(response(200, b"ok", [(b"x-backend", b"resetter")]))
            return True
        self.broken += 1
        if path == b"/rst-before-response":
            reset(writer)
            return False
        if path == b"/rst-mid-chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n" % (self.SENT, b"c" * self.SENT))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.TOTAL)
            writer.write(b"b" * self.SENT)
        await writer.drain()
        await asyncio.sleep(0.05)  # let the bytes reach the gateway first
        if path == b"/fin-mid-body":
            writer.close()
        else:
            reset(writer)
        return False


class Recorder(RawServer):
    """Answers every request with 200 and a small body; records what arrived. Probes get 404 (the
    gateway then uses its own view), so no probe traffic mixes with the requests under test."""

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self.requests: list[RawRequest] = []

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if request.path == PROBE_PATH:
            writer.write(response(404, b"no probes here"))
            return True
        if request.path == b"/healthz":
            writer.write(response(200, b"ok"))
            return True
        self.requests.append(request)
        writer.write(response(200, b"recorded", [(b"x-backend", b"recorder")]))
        return True

"""``H1Transport``: a lean HTTP/1.1 upstream transport on ``asyncio`` protocols and ``httptools``.

The gateway's default upstream transport (``AiohttpTransport`` and ``HttpxTransport`` stay opt-in
behind the same seam), built the way ``ProbeClient`` is: one ``asyncio.Protocol`` per keep-alive
connection, uvicorn's own parser, the request head written as one byte string, the body streamed with
the transport's flow control both ways. It
does what a proxy needs and nothing else: no cookies, no decompression, no redirects, no invented
headers (only ``Host`` when the request has none, and ``Transfer-Encoding: chunked`` for a body of
unknown length), the target sent byte-exact.

    gateway = Gateway(pools=[...])                             # H1Transport() with its defaults
    gateway = Gateway(pools=[...], transport=H1Transport(limit_per_backend=64))

- Connections: a LIFO stack of idle keep-alive connections per backend origin, at most
  ``limit_per_backend`` open per origin (more requests wait), idle ones kept ``keepalive_s``.
- Timeouts, as ``Timeouts`` says: ``connect_s``; ``response_headers_s`` from the end of the request
  body; ``read_idle_s`` between body chunks either way (a stalled upload or a stalled download).
- Errors, as ``UpstreamError`` subclasses with ``sent`` told right: a refused connection or a connect
  timeout was never sent; anything after the first request byte was. A reused idle connection that the
  backend had closed is retried once on a fresh one for an idempotent request without a body.
- ``https://`` backends use TLS (``ssl.create_default_context()`` unless you pass a context).
- WebSockets go through an ``AiohttpTransport`` this transport owns (opened on first use, with this
  transport's TLS context, closed with it). Deliberately not on this engine: a WebSocket is a second
  protocol after the ``101`` (the upgrade handshake with its key check and subprotocol choice, then
  masked frames, fragmentation, control frames, close codes, per-message limits), which would need a
  frame codec of our own to write and harden; aiohttp's client is proven, and a WebSocket is one
  long-lived connection, so the per-request CPU this engine saves on plain requests does not apply.

What a hostile or broken backend sends is bounded and never outlives its exchange:

- Only 100 and 103 are accepted as interim answers; any other 1xx (101 without an upgrade asked for
  included) or a status above 599 fails the exchange (``UpstreamProtocolError``: a 502 and a failure).
- The head and each trailer section are bounded in bytes (``max_response_headers`` times
  ``max_response_header_bytes``), not only line by line; trailer fields are parsed and dropped, never
  merged into the head that was already handed on.
- A byte after the end of the response (a second response in the same segment, a late one on the
  idle connection, a body on a 204/304) closes the connection: it is never parsed as the answer to the
  next request.
- An error answer (4xx/5xx, or one that closes the connection) that arrives while the request body is
  still being sent (an early 413) is returned at once; the upload stops, its last chunk unsent, and
  the connection is closed after the response.
- A request waits for a connection slot (``limit_per_backend``) no longer than ``Timeouts.connect_s``
  (an ``UpstreamTimeout`` in the ``connect`` phase: nothing was sent); a periodic sweep closes
  connections idle longer than ``keepalive_s`` and forgets origins with nothing open.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import httptools

from prequal_middleware.exceptions import (
    TimeoutPhase,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import (
    RawHeaders,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamWebSocket,
    upstream_origin,
)

if TYPE_CHECKING:
    from prequal_middleware.config import Timeouts

# Sent again on a fresh connection when a reused one closed before any answer (no body only).
RESENDABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Origins kept without any connection before the unused ones are dropped (backends come and go).
MAX_IDLE_ORIGINS = 1024
# Stop reading from the backend while this much of its body waits for the client (backpressure).
READ_HIGH_WATER = 256 * 1024
# The interim answers a request without ``Expect``/``Upgrade`` games can get (RFC 9110 15.2; 103 Early Hints).
INTERIM_OK = (100, 103)
# How often at most, and at least, idle connections are swept (a fraction of ``keepalive_s``, clamped).
SWEEP_MIN_S = 0.05
SWEEP_MAX_S = 10.0


class _Overrun(Exception):
    """Raised from a parser callback: bytes after the end of the response (the connection must go)."""


class _Refused(Exception):
    """Raised from a parser callback: the response breaks a rule; the message says which."""


class _Origin:
    """One backend origin (scheme, host, port): its connections and what every request to it shares."""

    __slots__ = ("url", "host", "port", "ssl", "host_header", "base", "idle", "open", "waiters", "limit")

    def __init__(self, url: str, limit: int, tls: ssl_module.SSLContext | None) -> None:
        parts = upstream_origin(url)
        self.url = url
        self.host = parts.host
        self.port = parts.port
        self.ssl = tls if parts.scheme == "https" else None
        self.host_header = parts.authority.encode("ascii")
        self.base = parts.base_path.encode("ascii")
        self.idle: list[_Connection] = []  # LIFO: the warmest connection first
        self.open = 0  # connections open or being opened
        self.waiters: deque[asyncio.Future[None]] = deque()  # requests waiting for a connection slot
        self.limit = limit

    def release_slot(self) -> None:
        """A connection closed: its slot goes to the first request still waiting, if any."""
        self.open -= 1
        self.wake_one()

    def wake_one(self) -> None:
        """Wake the first request still waiting for a connection (a slot or an idle one), if any."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; one exchange at a time."""

    def __init__(self, origin: _Origin, registry: set[_Connection], max_headers: int, max_header_bytes: int) -> None:
        self.origin = origin
        self._registry = registry  # the transport's open connections, for aclose()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exchanges = 0  # exchanges begun: tells a late close of an earlier response from this one
        self.idle_since = 0.0
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        # A head or trailer section larger than this fails the exchange (httptools would buffer any size).
        self.max_head_bytes = max_headers * max_header_bytes
        self._reset(head_only=False)

    def _reset(self, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only  # a HEAD request: the answer has no body whatever its headers say
        self.active = False
        self.received = False
        self.status = 0
        self.headers: RawHeaders = []
        self.framed = False
        self.keep_alive = False
        self.headers_waiter: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.data_waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: UpstreamError | None = None
        self.reading_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False
        self.since_body = 0  # bytes received since the last body bytes: the head, chunk framing, trailers
        self.uploader: asyncio.Task[object] | None = None  # the task sending the request body, while it does
        self.answered_early = False  # the final answer came before the request body was all sent

    def begin(self, loop: asyncio.AbstractEventLoop, head_only: bool) -> asyncio.Future[None]:
        """Start an exchange: a fresh parser (a HEAD answer leaves the old one expecting a body)."""
        self._reset(head_only)
        self.active = True
        self.exchanges += 1
        waiter = self.headers_waiter = loop.create_future()
        return waiter

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._registry.discard(self)
            origin = self.origin
            if self in origin.idle:
                origin.idle.remove(self)
            origin.release_slot()
        if self.transport is not None:
            self.transport.abort()

    def fail(self, error: UpstreamError) -> None:
        """End the exchange with ``error`` (whoever waits gets it) and close the connection."""
        if self.error is None and not self.complete:
            self.error = error
        for waiter in (self.headers_waiter, self.data_waiter, self.drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved here: an unawaited waiter must not log
        self.abort()

    def time_out(self, phase: TimeoutPhase, request: UpstreamRequest) -> None:
        """A timer fired: fail the exchange (the error is built only now, not for every request)."""
        what = "no response headers in time" if phase == "headers" else "no body data in time"
        self.fail(UpstreamTimeout(f"{request!r}: {what}", phase=phase))

    # --- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Bytes nobody asked for (idle, or after the end of the response): never parsed as the
            # next request's answer; the stream can no longer be trusted.
            self.abort()
            return
        self.received = True
        self.since_body += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamProtocolError(f"{self.origin.url}: unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Overrun):
                self.abort()  # the response stands (it ended); what followed it closes the connection
                return
            what = cause if isinstance(cause, _Refused) else exc
            self.fail(UpstreamProtocolError(f"{self.origin.url}: malformed response ({what})"))
            return
        if self.since_body > self.max_head_bytes:
            self.fail(UpstreamProtocolError(f"{self.origin.url}: response head or trailers too large"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        if self.active and not self.complete:
            if self.status and not self.framed and self.error is None:
                self._finish()  # a body delimited by the end of the connection: complete
            else:
                what = "before the response headers" if not self.status else "mid-body"
                self.fail(UpstreamProtocolError(f"{self.origin.url}: connection closed {what}"))
        self.abort()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.status:
            raise _Overrun()  # a second response after the final one: nobody asked for it

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers or len(name) + len(value) + 2 > self.max_header_bytes:
            raise _Refused("response headers too large")  # httptools reports it as a parser error
        if self.status:
            return  # a trailer field: the head went on already, and nothing after it joins it
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status not in INTERIM_OK:
                raise _Refused(f"unexpected interim status {status}")  # 101 with no upgrade asked for, too
            self.headers = []  # an interim answer (100 Continue, 103): the final one follows
            self.framed = False
            return
        if status > 599:
            raise _Refused(f"status {status} out of range")
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        uploader = self.uploader
        if uploader is not None and (status >= 400 or not self.keep_alive):
            # A refusal while the body is still going up (an early 413, say): stop the upload so the
            # answer goes back now (RFC 9112 9.3; the upload's handler tells this from other cancels).
            # An early 2xx/3xx on a kept connection may be a backend streaming while it reads: the
            # upload goes on.
            self.uploader = None
            self.answered_early = True
            uploader.cancel()
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.head_only or status in (204, 304):
            self.framed = True
            self._finish()

    def on_body(self, body: bytes) -> None:
        self.since_body = 0
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # end of an interim answer
        self._finish()

    def _finish(self) -> None:
        if not self.complete:
            self.complete = True
            self._wake()

    def _wake(self) -> None:
        waiter = self.data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        """The body bytes that arrived (joined); reading resumes if it was paused."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return data


class H1Transport:
    """A lean HTTP/1.1 transport (see the module docstring).

    Parameters:
        limit_per_backend: connections per backend origin; requests beyond it wait for one, at most
            ``Timeouts.connect_s``.
        keepalive_s: how long an idle connection is kept (a sweep closes it soon after, even if no
            request comes).
        max_response_header_bytes: the longest upstream response header line accepted.
        max_response_headers: the most upstream response headers accepted.
        ssl: the TLS context for ``https://`` backends (default: ``ssl.create_default_context()``).
    """

    def __init__(
        self,
        *,
        limit_per_backend: int = 1024,
        keepalive_s: float = 30.0,
        max_response_header_bytes: int = 8190,
        max_response_headers: int = 128,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if limit_per_backend < 1:
            raise ValueError(f"limit_per_backend must be >= 1, got {limit_per_backend!r}")
        self.limit_per_backend = limit_per_backend
        self.keepalive_s = keepalive_s
        self.max_response_header_bytes = max_response_header_bytes
        self.max_response_headers = max_response_headers
        self._ssl = ssl
        self._origins: dict[str, _Origin] = {}
        self._connections: set[_Connection] = set()
        self._websockets: AiohttpTransport | None = None
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None

    # --- Transport -----------------------------------------------------------------------------

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        if self._closed:
            raise UpstreamConnectError("the transport is closed")
        origin = self._origins.get(request.backend) or self._origin(request.backend)
        loop = asyncio.get_running_loop()
        head, chunked = self._head(request, origin)
        head_only = request.method == "HEAD"
        conn = self._pop_idle(origin, loop)
        if conn is not None and request.body is None and request.method in RESENDABLE:
            try:
                return await self._exchange(conn, request, head, chunked, head_only, timeouts, loop)
            except UpstreamProtocolError:
                if conn.received:
                    raise
                # The connection closed before any answer: most likely the backend closed it while it
                # sat idle, as we reused it. An idempotent request without a body loses nothing by
                # being sent again, on a fresh connection (what browsers do).
            conn = None
        if conn is None:
            conn = await self._connect(origin, timeouts, loop)
        return await self._exchange(conn, request, head, chunked, head_only, timeouts, loop)

    async def connect_websocket(
        self, backend: str, target: str, headers: RawHeaders, subprotocols: list[str], timeouts: Timeouts
    ) -> UpstreamWebSocket:
        if self._websockets is None:
            self._websockets = AiohttpTransport(ssl=self._ssl if self._ssl is not None else True)
        return await self._websockets.connect_websocket(backend, target, headers, subprotocols, timeouts)

    async def aclose(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._connections):
            conn.abort()
        self._connections.clear()
        for origin in self._origins.values():
            for waiter in origin.waiters:
                if not waiter.done():
                    waiter.set_exception(UpstreamConnectError("the transport is closed"))
        websockets, self._websockets = self._websockets, None
        if websockets is not None:
            await websockets.aclose()
        await asyncio.sleep(0)  # let the transports' close callbacks run

    # --- connections ---------------------------------------------------------------------------

    def _origin(self, url: str) -> _Origin:
        tls = None
        if url.startswith("https:"):
            if self._ssl is None:
                self._ssl = ssl_module.create_default_context()
            tls = self._ssl
        try:
            origin = _Origin(url, self.limit_per_backend, tls)
        except (ValueError, UnicodeEncodeError) as exc:
            raise UpstreamConnectError(f"{url!r}: {exc}") from None
        if len(self._origins) >= MAX_IDLE_ORIGINS:
            for key, old in list(self._origins.items()):
                if old.open == 0 and not old.waiters:
                    del self._origins[key]
        self._origins[url] = origin
        return origin

    def _pop_idle(self, origin: _Origin, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        idle = origin.idle
        now = loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.abort()
            elif now - conn.idle_since > self.keepalive_s:
                conn.abort()
            else:
                return conn
        return None

    async def _connect(self, origin: _Origin, timeouts: Timeouts, loop: asyncio.AbstractEventLoop) -> _Connection:
        # One deadline for getting a connection: the wait for a slot and the connect (as aiohttp's
        # ``connect``). Without it a request queued behind a backend that holds every slot waits forever.
        deadline = loop.time() + timeouts.connect_s
        while origin.open >= origin.limit:
            waiter = loop.create_future()
            origin.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter  # a slot freed; another request may have taken it first, so check again
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    origin.wake_one()  # woken as it gave up: the slot goes to the next in line
                elif waiter in origin.waiters:
                    origin.waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    detail = f"no connection slot within {timeouts.connect_s} s (limit_per_backend={origin.limit})"
                    raise UpstreamTimeout(f"{origin.url}: {detail}", phase="connect") from None
                raise
            reused = self._pop_idle(origin, loop)
            if reused is not None:
                return reused
        origin.open += 1
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(
                        origin, self._connections, self.max_response_headers, self.max_response_header_bytes
                    ),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                )
        except TimeoutError:
            origin.release_slot()
            raise UpstreamTimeout(f"{origin.url}: connect timed out", phase="connect") from None
        except (OSError, ssl_module.SSLError) as exc:
            origin.release_slot()
            raise UpstreamConnectError(f"{origin.url}: cannot connect: {exc}") from None
        except BaseException:
            origin.release_slot()
            raise
        if self._closed:
            conn.abort()
            raise UpstreamConnectError("the transport is closed")
        return conn

    def _release(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        """After a complete exchange: back to the idle stack when reusable, else closed."""
        conn.active = False
        if conn.closed or not conn.keep_alive or self._closed:
            conn.abort()
            return
        conn.idle_since = loop.time()
        conn.origin.idle.append(conn)
        conn.origin.wake_one()  # a request waiting for a slot can take this connection
        if self._sweep is None:
            self._sweep = loop.call_later(self._sweep_interval(), self._sweep_idle, loop)

    def _sweep_interval(self) -> float:
        return min(max(self.keepalive_s / 2, SWEEP_MIN_S), SWEEP_MAX_S)

    def _sweep_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close connections idle past ``keepalive_s``, forget origins with nothing open; again later
        while idle connections remain (no timer runs when nothing is idle)."""
        self._sweep = None
        expired = loop.time() - self.keepalive_s
        remaining = 0
        for url, origin in list(self._origins.items()):
            idle = origin.idle
            while idle and idle[0].idle_since < expired:  # the stack's bottom is the longest idle
                idle.pop(0).abort()
            remaining += len(idle)
            if origin.open == 0 and not origin.waiters:
                del self._origins[url]
        if remaining and not self._closed:
            self._sweep = loop.call_later(self._sweep_interval(), self._sweep_idle, loop)

    # --- one exchange --------------------------------------------------------------------------

    @staticmethod
    def _head(request: UpstreamRequest, origin: _Origin) -> tuple[bytearray, bool]:
        # latin-1: the target is the client's raw path and query, decoded byte for byte.
        head = bytearray(request.method.encode("latin-1"))
        head += b" "
        head += origin.base
        head += request.target.encode("latin-1")
        head += b" HTTP/1.1\r\n"
        has_host = has_length = False
        for name, value in request.headers:
            if name == b"host":
                has_host = True
            elif name == b"content-length":
                has_length = True
            head += name
            head += b": "
            head += value
            head += b"\r\n"
        if not has_host:
            head += b"host: " + origin.host_header + b"\r\n"
        chunked = request.body is not None and not has_length
        if chunked:
            # A body of unknown length, or one whose Content-Length the client named in Connection
            # (so it was dropped as hop-by-hop): frame it ourselves.
            head += b"transfer-encoding: chunked\r\n"
        head += b"\r\n"
        return head, chunked

    async def _exchange(
        self,
        conn: _Connection,
        request: UpstreamRequest,
        head: bytearray,
        chunked: bool,
        head_only: bool,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
    ) -> UpstreamResponse:
        transport = conn.transport
        assert transport is not None
        headers_waiter = conn.begin(loop, head_only)
        timer: asyncio.TimerHandle | None = None
        try:
            transport.write(head)
            if request.body is not None:
                conn.uploader = asyncio.current_task()
                try:
                    await self._upload(conn, request, chunked, timeouts, loop)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not conn.answered_early or task is None or task.uncancel() > 0:
                        raise  # a real cancellation (the client left, shutdown), not the early answer
                    # The request went up only in part: the backend may still wait for the rest, so
                    # the connection serves nothing after this response.
                    conn.keep_alive = False
                finally:
                    conn.uploader = None
            if not headers_waiter.done():
                timer = loop.call_later(timeouts.response_headers_s, conn.time_out, "headers", request)
            await headers_waiter
        except BaseException:
            conn.abort()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if conn.complete and not conn.chunks:
            self._release(conn, loop)  # no body (HEAD, 204, 304, empty): the connection is free now
            return UpstreamResponse(conn.status, conn.headers, _empty())
        return UpstreamResponse(
            conn.status, conn.headers, self._body(conn, request, timeouts.read_idle_s, loop), _Closer(conn)
        )

    async def _upload(
        self,
        conn: _Connection,
        request: UpstreamRequest,
        chunked: bool,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        transport = conn.transport
        assert transport is not None and request.body is not None
        idle_s = timeouts.read_idle_s
        chunks = aiter(request.body)
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    chunk = await anext(chunks, None)
            except TimeoutError:
                raise UpstreamTimeout(f"{request!r}: the request body stalled", phase="body") from None
            if conn.error is not None:
                raise conn.error
            if chunk is None:
                break
            if conn.complete:
                # The whole answer came already: stop. Cut short, so no last chunk (the backend must not
                # take it for the whole body) and no reuse (it may still wait for the rest).
                conn.keep_alive = False
                return
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            else:
                transport.write(chunk)
            if conn.writing_paused:
                waiter = conn.drain_waiter = loop.create_future()
                try:
                    async with asyncio.timeout(idle_s):
                        await waiter
                except TimeoutError:
                    raise UpstreamTimeout(f"{request!r}: the backend stopped reading", phase="body") from None
                finally:
                    conn.drain_waiter = None
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def _body(
        self, conn: _Connection, request: UpstreamRequest, idle_s: float, loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[bytes]:
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                break
            if conn.error is not None:
                raise conn.error
            waiter = conn.data_waiter = loop.create_future()
            timer = loop.call_later(idle_s, conn.time_out, "body", request)
            try:
                await waiter
            finally:
                timer.cancel()
                conn.data_waiter = None
        self._release(conn, loop)


class _Closer:
    """``UpstreamResponse.aclose``: closes the connection unless the body was read to the end."""

    __slots__ = ("_conn", "_exchange")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._exchange = conn.exchanges

    async def __call__(self) -> None:
        conn = self._conn
        # Still this response's exchange and not finished: cancel the request upstream. (Once the
        # body was read to its end the connection may already serve another request: leave it.)
        if conn.active and conn.exchanges == self._exchange:
            conn.fail(UpstreamProtocolError(f"{conn.origin.url}: response closed before its end"))
            conn.active = False


async def _empty() -> AsyncIterator[bytes]:
    return
    yield  # an async generator with nothing in it

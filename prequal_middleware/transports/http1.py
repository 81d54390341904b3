"""``H1Transport``: the gateway's default upstream transport, on our one HTTP/1.1 engine.

The engine (``h1_connection``: the wire, framing, bounds and 1xx handling; ``h1_pool``: per-origin
connection pools, bounded slot waits, the idle sweep) is shared with the probe client; this module adds
what forwarding needs: the request head written as one byte string, the body streamed with the
transport's flow control both ways, timeouts, and the errors of the seam (``AiohttpTransport`` and
``HttpxTransport`` stay opt-in behind the same seam). It does what a proxy needs and nothing else: no
cookies, no decompression, no redirects, no invented headers (only ``Host`` when the request has none,
and ``Transfer-Encoding: chunked`` for a body of unknown length), the target sent byte-exact.

    gateway = Gateway(pools=[...])                             # H1Transport() with its defaults
    gateway = Gateway(pools=[...], transport=H1Transport(limit_per_backend=64))

- Connections: a LIFO stack of idle keep-alive connections per backend origin, at most
  ``limit_per_backend`` open per origin (more requests wait), idle ones kept ``keepalive_s``.
- Timeouts, as ``Timeouts`` says: ``connect_s``; ``response_headers_s`` from the end of the request
  body; ``read_idle_s`` between body chunks either way (a stalled upload or a stalled download).
- Errors, as ``UpstreamError`` subclasses with ``sent`` told right: a refused connection or a connect
  timeout was never sent; anything after the first request byte was. A reused idle connection that the
  backend had closed is retried once on a fresh one for an idempotent request without a body.
- ``https://`` backends use TLS: the request's own context (``UpstreamRequest.tls``, a pool's
  ``UpstreamTLS``) when it has one, else the transport's (``ssl.create_default_context()`` unless you
  pass one). Each context has its own connections, so one made for a pool is never lent to another.
- WebSockets go through an ``AiohttpTransport`` this transport owns (opened on first use, with this
  transport's TLS context, closed with it). Deliberately not on this engine: a WebSocket is a second
  protocol after the ``101`` (the upgrade handshake with its key check and subprotocol choice, then
  masked frames, fragmentation, control frames, close codes, per-message limits), which would need a
  frame codec of our own to write and harden; aiohttp's codec is well kept and proven, and a WebSocket
  is one long-lived connection, so the per-request CPU this engine saves on plain requests does not
  apply. That is why this module imports ``transports.aiohttp``.

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
from typing import TYPE_CHECKING

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
    WholeBody,
)
from prequal_middleware.transports.deadlines import Deadlines
from prequal_middleware.transports.h1_connection import H1Connection
from prequal_middleware.transports.h1_pool import H1Pool, Origin

if TYPE_CHECKING:
    from prequal_middleware.config import Timeouts

# Sent again on a fresh connection when a reused one closed before any answer (no body only).
RESENDABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Stop reading from the backend while this much of its body waits for the client (backpressure).
READ_HIGH_WATER = 256 * 1024


class _Connection(H1Connection):
    """A forwarding connection: the head and the body handed on through futures the exchange awaits."""

    __slots__ = (
        "answered_early",
        "buffered",
        "chunks",
        "data_waiter",
        "drain_waiter",
        "error",
        "headers",
        "headers_waiter",
        "reading_paused",
        "request",
        "uploader",
        "waiting_for",
        "writing_paused",
    )

    def __init__(self, pool: H1Pool[_Connection], origin: Origin[_Connection]) -> None:
        super().__init__(pool, origin)
        self._reset()

    def _reset(self) -> None:
        self.headers: RawHeaders = []
        self.headers_waiter: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.data_waiter: asyncio.Future[None] | None = None
        self.error: UpstreamError | None = None
        self.reading_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False
        self.uploader: asyncio.Task[object] | None = None  # the task sending the request body, while it does
        self.answered_early = False  # the final answer came before the request body was all sent
        self.request: UpstreamRequest | None = None  # this exchange's, only while a deadline is armed for it
        self.waiting_for: TimeoutPhase = "headers"  # what that deadline waits for

    def begin(self, loop: asyncio.AbstractEventLoop, head_only: bool) -> asyncio.Future[None]:
        """Start an exchange; the future resolves when the final head is in."""
        self.start(head_only)
        self._reset()
        waiter = self.headers_waiter = loop.create_future()
        return waiter

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

    # --- engine hooks --------------------------------------------------------------------------

    def field(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def interim(self) -> None:
        self.headers = []

    def head_done(self) -> None:
        uploader = self.uploader
        if uploader is not None and (self.status >= 400 or not self.keep_alive):
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

    def body(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def finished(self) -> None:
        self._wake()

    def failed(self, reason: str) -> None:
        self.fail(UpstreamProtocolError(f"{self.origin.url}: {reason}"))

    def overran(self) -> None:
        # The answer ended and stands (a reader waiting for its end is told); what followed it closes
        # the connection.
        self._wake()
        self.abort()

    # --- flow control --------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        self._pool = self._new_pool(ssl)
        self._origins = self._pool.origins
        # A pool's own TLS context gets connections of its own: one engine pool per context.
        self._tls_pools: dict[ssl_module.SSLContext, H1Pool[_Connection]] = {}
        self._websockets: AiohttpTransport | None = None
        # The response-headers and body-idle timeouts of every exchange, on one loop timer per delay.
        self._deadlines: Deadlines[_Connection] = Deadlines(_timed_out)

    def _new_pool(self, tls: ssl_module.SSLContext | None) -> H1Pool[_Connection]:
        return H1Pool(
            _Connection,
            limit_per_origin=self.limit_per_backend,
            max_idle_per_origin=self.limit_per_backend,
            keepalive_s=self.keepalive_s,
            max_headers=self.max_response_headers,
            max_header_bytes=self.max_response_header_bytes,
            # The head and each trailer section as a whole, not only line by line.
            max_head_bytes=self.max_response_headers * self.max_response_header_bytes,
            ssl=tls,
        )

    def _pool_for(self, tls: ssl_module.SSLContext) -> H1Pool[_Connection]:
        pool = self._tls_pools.get(tls)
        if pool is None:
            pool = self._tls_pools[tls] = self._new_pool(tls)
        return pool

    # --- Transport -----------------------------------------------------------------------------

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        if self._pool.closed:
            raise UpstreamConnectError("the transport is closed")
        pool = self._pool if request.tls is None else self._pool_for(request.tls)
        origin = pool.origins.get(request.backend) or pool.origin(request.backend)
        loop = asyncio.get_running_loop()
        head, chunked = self._head(request, origin)
        head_only = request.method == "HEAD"
        conn = pool.pop_idle(origin, loop.time())
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
            conn = await pool.connect(origin, loop.time() + timeouts.connect_s)
        return await self._exchange(conn, request, head, chunked, head_only, timeouts, loop)

    async def connect_websocket(
        self,
        backend: str,
        target: str,
        headers: RawHeaders,
        subprotocols: list[str],
        timeouts: Timeouts,
        *,
        tls: ssl_module.SSLContext | None = None,
    ) -> UpstreamWebSocket:
        if self._websockets is None:
            default = self._pool.ssl
            self._websockets = AiohttpTransport(ssl=default if default is not None else True)
        return await self._websockets.connect_websocket(backend, target, headers, subprotocols, timeouts, tls=tls)

    async def aclose(self) -> None:
        for pool in (self._pool, *self._tls_pools.values()):
            pool.close(lambda: UpstreamConnectError("the transport is closed"))
        websockets, self._websockets = self._websockets, None
        if websockets is not None:
            await websockets.aclose()
        await asyncio.sleep(0)  # let the transports' close callbacks run

    # --- one exchange --------------------------------------------------------------------------

    @staticmethod
    def _head(request: UpstreamRequest, origin: Origin[_Connection]) -> tuple[bytearray, bool]:
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
        deadlines = self._deadlines
        armed = False
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
                conn.request, conn.waiting_for = request, "headers"
                deadlines.arm(conn, timeouts.response_headers_s)
                armed = True
            await headers_waiter
        except BaseException:
            conn.abort()
            raise
        finally:
            if armed:
                deadlines.disarm(conn)
                conn.request = None  # an idle connection must not keep the request (and its body) alive
        if conn.complete:
            # The whole answer is in (no body, or a small one read with the head): the connection is
            # free now, and the body goes to the forwarder whole.
            response = UpstreamResponse(conn.status, conn.headers, WholeBody(conn.take() if conn.chunks else b""))
            conn.pool.release(conn, loop.time())
            return response
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
            conn.request, conn.waiting_for = request, "body"
            self._deadlines.arm(conn, idle_s)
            try:
                await waiter
            finally:
                self._deadlines.disarm(conn)
                conn.request = conn.data_waiter = None
        conn.pool.release(conn, loop.time())


def _timed_out(conn: _Connection) -> None:
    """A deadline fired: the exchange it guarded fails with a timeout (headers or body)."""
    if conn.request is not None:
        conn.time_out(conn.waiting_for, conn.request)


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

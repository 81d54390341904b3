"""``H1Pool``: the connection pool of our one HTTP/1.1 engine (``h1_connection`` is the wire half).

Used by both the forwarding transport (``http1.H1Transport``) and the probe client
(``probe.ProbeClient``), each with its own connection class and bounds:

- One ``Origin`` per backend URL (scheme, host, port, base path; parsed once by ``upstream_origin``),
  with a LIFO stack of idle keep-alive connections (the warmest reused first), at most
  ``max_idle_per_origin`` of them, and at most ``limit_per_origin`` connections open.
- ``connect`` waits for a connection slot no longer than its deadline (an ``UpstreamTimeout`` in the
  ``connect`` phase: nothing was sent), then connects within the same deadline.
- A periodic sweep closes connections idle longer than ``keepalive_s`` and forgets origins with nothing
  open; no timer runs while nothing is idle.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from prequal_middleware.exceptions import UpstreamConnectError, UpstreamTimeout, UpstreamTLSError
from prequal_middleware.transports.base import upstream_origin
from prequal_middleware.transports.h1_connection import H1Connection

# Origins kept without any connection before the unused ones are dropped (backends come and go).
MAX_IDLE_ORIGINS = 1024
# How often at most, and at least, idle connections are swept (a fraction of ``keepalive_s``, clamped).
SWEEP_MIN_S = 0.05
SWEEP_MAX_S = 10.0

Conn = TypeVar("Conn", bound=H1Connection)


class Origin(Generic[Conn]):
    """One backend URL: its address, its connections and what every request to it shares."""

    __slots__ = (
        "url",
        "host",
        "address",
        "port",
        "ssl",
        "host_header",
        "base",
        "request",
        "idle",
        "open",
        "waiters",
        "limit",
        "retired",
    )

    def __init__(self, url: str, limit: int, tls: ssl_module.SSLContext | None) -> None:
        parts = upstream_origin(url)
        self.url = url
        self.host = parts.host
        self.address = parts.address  # where to connect (a DNS-pinned member's address; else the host)
        self.port = parts.port
        self.ssl = tls if parts.scheme == "https" else None
        self.host_header = parts.authority.encode("ascii")
        self.base = parts.base_path.encode("ascii")
        self.request = b""  # a fixed request its user sends every time, made once (the probe's)
        self.idle: list[Conn] = []  # LIFO: the warmest connection last
        self.open = 0  # connections open or being opened
        self.waiters: deque[asyncio.Future[None]] = deque()  # requests waiting for a connection slot
        self.limit = limit
        self.retired = False  # forgotten: connections in use are closed when their exchange ends

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


class H1Pool(Generic[Conn]):
    """Origins and their connections (see the module docstring).

    Parameters:
        connection: makes the protocol of a new connection (an ``H1Connection`` subclass).
        limit_per_origin: connections open per origin; ``connect`` waits for a slot beyond it.
        max_idle_per_origin: idle connections kept per origin; one more is closed instead.
        keepalive_s: how long an idle connection is kept (the sweep closes it soon after).
        max_headers, max_header_bytes, max_head_bytes, max_body_bytes: the bounds on an answer
            (``H1Connection``; ``max_body_bytes`` 0 for none).
        ssl: the TLS context for ``https://`` origins (default: ``ssl.create_default_context()``).
        closed_message: what ``connect`` says once the pool is closed.
    """

    def __init__(
        self,
        connection: Callable[[H1Pool[Conn], Origin[Conn]], Conn],
        *,
        limit_per_origin: int,
        max_idle_per_origin: int,
        keepalive_s: float,
        max_headers: int,
        max_header_bytes: int,
        max_head_bytes: int,
        max_body_bytes: int = 0,
        ssl: ssl_module.SSLContext | None = None,
        closed_message: str = "the transport is closed",
    ) -> None:
        self.connection = connection
        self.limit_per_origin = limit_per_origin
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_s = keepalive_s
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.ssl = ssl
        self.closed_message = closed_message
        self.origins: dict[str, Origin[Conn]] = {}
        self.connections: set[Conn] = set()  # every open connection, idle or busy
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None

    def origin(self, url: str) -> Origin[Conn]:
        """The origin of ``url``, made on first use; ``UpstreamConnectError`` if ``url`` is not a backend URL."""
        known = self.origins.get(url)
        if known is not None:
            return known
        tls = None
        if url.startswith("https:"):
            if self.ssl is None:
                self.ssl = ssl_module.create_default_context()
            tls = self.ssl
        try:
            origin: Origin[Conn] = Origin(url, self.limit_per_origin, tls)
        except (ValueError, UnicodeEncodeError) as exc:
            raise UpstreamConnectError(f"{url!r}: {exc}") from None
        if len(self.origins) >= MAX_IDLE_ORIGINS:
            for key, old in list(self.origins.items()):
                if old.open == 0 and not old.waiters:
                    self._drop(key, old)
        self.origins[url] = origin
        return origin

    def pop_idle(self, origin: Origin[Conn], now: float) -> Conn | None:
        """The warmest idle connection of ``origin`` still open and fresh, if any."""
        idle = origin.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing() or now - conn.idle_since > self.keepalive_s:
                conn.abort()
            else:
                return conn
        return None

    async def connect(self, origin: Origin[Conn], deadline: float) -> Conn:
        """A connection for ``origin``: an idle one that came free while waiting for a slot, or a new one.

        ``UpstreamTimeout`` (phase ``connect``) past ``deadline``, ``UpstreamConnectError`` if the
        connect fails or the pool is closed.
        """
        # One deadline for getting a connection: the wait for a slot and the connect. Without it a
        # request queued behind a backend that holds every slot waits forever.
        loop = asyncio.get_running_loop()
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
                    detail = f"no connection slot in time (limit_per_backend={origin.limit})"
                    raise UpstreamTimeout(f"{origin.url}: {detail}", phase="connect") from None
                raise
            reused = self.pop_idle(origin, loop.time())
            if reused is not None:
                return reused
        origin.open += 1
        # Made here, not in the factory: a cancel that lands as the connect completes still closes it
        # (``abort`` also frees the slot, once).
        conn = self.connection(self, origin)
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(
                    lambda: conn,
                    origin.address,
                    origin.port,
                    ssl=origin.ssl,
                    # A pinned member connects to its address but verifies the name it stands for.
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            conn.abort()
            raise UpstreamTimeout(f"{origin.url}: connect timed out", phase="connect") from None
        except ssl_module.SSLError as exc:  # before OSError, its base: a TLS failure is told apart
            conn.abort()
            raise UpstreamTLSError(f"{origin.url}: connect failed in the TLS handshake ({exc})") from None
        except OSError as exc:
            conn.abort()
            raise UpstreamConnectError(f"{origin.url}: connect failed ({exc})") from None
        except BaseException:
            conn.abort()
            raise
        if self.closed:
            conn.abort()
            raise UpstreamConnectError(self.closed_message)
        return conn

    def release(self, conn: Conn, now: float) -> None:
        """After a complete exchange: back to the idle stack when reusable, else closed."""
        conn.active = False
        origin = conn.origin
        idle = origin.idle
        if conn.closed or not conn.keep_alive or self.closed or origin.retired or len(idle) >= self.max_idle_per_origin:
            conn.abort()
            return
        conn.idle_since = now
        idle.append(conn)
        if origin.waiters:
            origin.wake_one()  # a request waiting for a slot can take this connection
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._sweep_interval(), self._sweep_idle)

    def forget(self, url: str) -> None:
        """Drop an origin that left: close its idle connections (busy ones close when their exchange ends)."""
        origin = self.origins.pop(url, None)
        if origin is not None:
            origin.retired = True
            for conn in list(origin.idle):
                conn.abort()

    def close(self, error: Callable[[], BaseException]) -> None:
        """Close every connection, idle or busy; requests waiting for a slot get ``error()``."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for origin in self.origins.values():
            origin.retired = True
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()
        for origin in self.origins.values():
            for waiter in origin.waiters:
                if not waiter.done():
                    waiter.set_exception(error())

    def _drop(self, url: str, origin: Origin[Conn]) -> None:
        """Forget an origin with nothing open; a request still holding it closes its connection after use."""
        del self.origins[url]
        origin.retired = True

    def _sweep_interval(self) -> float:
        return min(max(self.keepalive_s / 2, SWEEP_MIN_S), SWEEP_MAX_S)

    def _sweep_idle(self) -> None:
        """Close connections idle past ``keepalive_s``, forget origins with nothing open; again later
        while idle connections remain."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        expired = loop.time() - self.keepalive_s
        remaining = 0
        for url, origin in list(self.origins.items()):
            idle = origin.idle
            while idle and idle[0].idle_since < expired:  # the stack's bottom is the longest idle
                idle.pop(0).abort()
            remaining += len(idle)
            if origin.open == 0 and not origin.waiters:
                self._drop(url, origin)
        if remaining and not self.closed:
            self._sweep = loop.call_later(self._sweep_interval(), self._sweep_idle)

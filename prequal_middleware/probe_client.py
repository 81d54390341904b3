"""``ProbeClient``: the gateway's cheap HTTP/1.1 probe client (the client half of Prequal's probing).

A proxied request costs one to three probes, so a probe must cost far less than the request. An
``aiohttp`` GET spends most of its CPU in client layers a probe does not need; this client is an
``asyncio`` protocol that writes one fixed request per backend and parses the answer with ``httptools``
(uvicorn's own parser), over keep-alive connections kept in a small LIFO stack per backend.

    client = ProbeClient(timeout_s=0.05)
    result = await client.probe("http://10.0.0.5:8000")  # ProbeResult(rif=3, latency_s=0.012)
    await client.aclose()

The answer's ``x-prequal-rif`` (required) and ``x-prequal-latency-us`` (optional, 0 when absent) headers
are read; the body is consumed and ignored. ``404``, ``405`` or a ``200`` without ``x-prequal-rif`` (a
catch-all route) raise ``ProbeUnsupported``: the backend has no ``LoadReportingMiddleware``. Any other
failure (connect, timeout, malformed answer, other status, invalid header value) raises ``ProbeFailed``.
Both are ``ProbeError``.

``https://`` backends are probed over TLS with ``ssl.create_default_context()`` (certificates verified);
a base path in the URL (``http://h:1/svc``) prefixes the probe path. One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

DEFAULT_PROBE_PATH = "/_prequal/probe"
DEFAULT_TIMEOUT_S = 0.05
DEFAULT_MAX_IDLE_PER_BACKEND = 4
UNSUPPORTED_STATUSES = frozenset({404, 405})
RIF_HEADER = b"x-prequal-rif"
LATENCY_HEADER = b"x-prequal-latency-us"

# Python 3.11 counts cancellations; a timeout we raise ourselves must be taken back out of the count.
_COUNTS_CANCELS = sys.version_info >= (3, 11)


class ProbeError(Exception):
    """A probe did not produce a load report."""


class ProbeUnsupported(ProbeError):
    """The backend answered 404, 405 or a 200 without ``x-prequal-rif``: it does not report its load."""


class ProbeFailed(ProbeError):
    """Connect error, timeout, malformed answer, unexpected status or an invalid load header."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One backend's load report: requests in flight and its latency estimate in seconds."""

    rif: int
    latency_s: float


class _Backend:
    """What is fixed per backend URL: the address, the request bytes, the idle connections."""

    __slots__ = ("url", "host", "port", "ssl", "request", "idle", "retired")

    def __init__(self, url: str, host: str, port: int, tls: ssl.SSLContext | None, request: bytes) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.ssl = tls
        self.request = request
        self.idle: list[_ProbeConnection] = []  # LIFO: the warmest connection is reused first
        self.retired = False  # forgotten: connections in use are closed when their probe ends


class _ProbeConnection(asyncio.Protocol):
    """One keep-alive connection; answers at most one probe at a time."""

    __slots__ = (
        "backend",
        "_open",
        "_parser",
        "transport",
        "waiter",
        "closed",
        "received",
        "status",
        "framed",
        "reusable",
        "rif",
        "latency_us",
    )

    def __init__(self, backend: _Backend, open_connections: set[_ProbeConnection]) -> None:
        self.backend = backend
        self._open = open_connections
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.received = False
        self.status = 0
        self.framed = False
        self.reusable = False
        self.rif: bytes | None = None
        self.latency_us: bytes | None = None

    def begin(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Reset for a new exchange; the future resolves when the answer is in."""
        self.received = False
        self.status = 0
        self.framed = self.reusable = False
        self.rif = self.latency_us = None
        waiter = self.waiter = loop.create_future()
        return waiter

    def abort(self) -> None:
        """Close now, dropping any unsent bytes; the client's bookkeeping forgets it at once."""
        self._drop()
        if self.transport is not None:
            self.transport.abort()

    def _drop(self) -> None:
        self.closed = True
        self._open.discard(self)
        idle = self.backend.idle
        if self in idle:
            idle.remove(self)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._open.add(self)

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.abort()  # bytes nobody asked for: the stream can no longer be trusted
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(f"malformed response ({exc!r})")

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop()
        self._fail("connection closed before a full response")

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == RIF_HEADER:
            self.rif = value
        elif name == LATENCY_HEADER:
            self.latency_us = value
        elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # an interim answer; the final one follows
        self.status = status
        self.reusable = self.framed and self._parser.should_keep_alive()
        if not self.framed:
            # The body runs to EOF: take the headers now and close the connection after use.
            self._resolve()

    def on_message_complete(self) -> None:
        if self.status == 0:
            self.framed = False  # end of an interim answer
            self.rif = self.latency_us = None
            return
        self._resolve()

    def _resolve(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, reason: str) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProbeFailed(f"{self.backend.url}: {reason}"))
        self.abort()


class _StaleConnection(Exception):
    """A reused idle connection turned out closed before answering: retry on a fresh one."""


class _Deadline:
    """Cancels the probing task when time is up: one timer, no extra task (unlike ``wait_for``)."""

    __slots__ = ("_task", "_cancelling", "expired")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self._task = task
        self._cancelling = task.cancelling() if _COUNTS_CANCELS else 0
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def caused(self) -> bool:
        """Whether a CancelledError came from this deadline alone (else the caller cancelled too)."""
        if not self.expired:
            return False
        if _COUNTS_CANCELS:
            return self._task.uncancel() <= self._cancelling
        return True


class ProbeClient:
    """Probe backends for their load over persistent HTTP/1.1 connections.

    Parameters:
        path: the probe path on every backend, after the backend URL's own base path.
        timeout_s: budget for one probe, connect and answer included.
        max_idle_per_backend: idle keep-alive connections kept per backend; extra ones are closed.
    """

    def __init__(
        self,
        *,
        path: str = DEFAULT_PROBE_PATH,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_idle_per_backend: int = DEFAULT_MAX_IDLE_PER_BACKEND,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_idle_per_backend < 0:
            raise ValueError(f"max_idle_per_backend must be >= 0, got {max_idle_per_backend!r}")
        self.path = path
        self.timeout_s = timeout_s
        self.max_idle_per_backend = max_idle_per_backend
        self._backends: dict[str, _Backend] = {}
        self._open: set[_ProbeConnection] = set()  # every live connection, idle or busy
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        return self._closed

    async def probe(self, backend_url: str) -> ProbeResult:
        """Ask ``backend_url`` (``http://host:port[/base]``) for its load; raises a ``ProbeError``."""
        if self._closed:
            raise ProbeFailed("the probe client is closed")
        backend = self._backends.get(backend_url)
        if backend is None:
            backend = self._backends[backend_url] = self._backend(backend_url)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "probe() runs inside a task"
        deadline = _Deadline(task)
        timer = loop.call_later(self.timeout_s, deadline.expire)
        try:
            conn = self._pop_idle(backend)
            if conn is not None:
                try:
                    return await self._exchange(conn, loop, reused=True)
                except _StaleConnection:
                    pass  # the server closed it while idle; not the backend's fault
            conn = await self._connect(backend, loop)
            return await self._exchange(conn, loop, reused=False)
        except asyncio.CancelledError:
            if deadline.caused():
                raise ProbeFailed(f"{backend_url}: no answer within {self.timeout_s * 1000:g} ms") from None
            raise
        finally:
            timer.cancel()

    def forget(self, backend_url: str) -> None:
        """Drop a backend that left: close its idle connections and its cached request."""
        backend = self._backends.pop(backend_url, None)
        if backend is not None:
            backend.retired = True
            for conn in list(backend.idle):
                conn.abort()

    async def aclose(self) -> None:
        """Close every connection, idle or busy; ``probe`` raises ``ProbeFailed`` afterwards."""
        self._closed = True
        for backend in self._backends.values():
            backend.retired = True
        for conn in list(self._open):
            conn.abort()
        # Transports close their sockets in a callback scheduled by abort(); let it run.
        await asyncio.sleep(0)

    def _backend(self, url: str) -> _Backend:
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise ProbeFailed(f"{url!r}: not an http:// or https:// URL with a host")
        try:
            port = split.port or (443 if split.scheme == "https" else 80)
        except ValueError as exc:
            raise ProbeFailed(f"{url!r}: {exc}") from None
        tls = None
        if split.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        host_header = split.netloc.rpartition("@")[2]
        target = split.path.rstrip("/") + self.path
        try:
            request = f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode("ascii")
        except UnicodeEncodeError:
            raise ProbeFailed(f"{url!r}: the URL must be ASCII (percent-encoded)") from None
        return _Backend(url, split.hostname, port, tls, request)

    def _pop_idle(self, backend: _Backend) -> _ProbeConnection | None:
        idle = backend.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.abort()
        return None

    async def _connect(self, backend: _Backend, loop: asyncio.AbstractEventLoop) -> _ProbeConnection:
        try:
            _, conn = await loop.create_connection(
                lambda: _ProbeConnection(backend, self._open), backend.host, backend.port, ssl=backend.ssl
            )
        except OSError as exc:
            raise ProbeFailed(f"{backend.url}: connect failed ({exc})") from exc
        if self._closed:  # aclose() ran while we were connecting
            conn.abort()
            raise ProbeFailed("the probe client is closed")
        return conn

    async def _exchange(self, conn: _ProbeConnection, loop: asyncio.AbstractEventLoop, reused: bool) -> ProbeResult:
        backend = conn.backend
        transport = conn.transport
        assert transport is not None
        waiter = conn.begin(loop)
        transport.write(backend.request)
        try:
            await waiter
        except ProbeFailed:
            if reused and not conn.received:
                raise _StaleConnection from None
            raise
        except BaseException:
            conn.abort()  # a timeout or cancellation mid-answer: the stream is out of step
            raise
        finally:
            conn.waiter = None
        try:
            result = self._read(conn)
        except ProbeError:
            conn.abort()
            raise
        idle = backend.idle
        if conn.reusable and not conn.closed and len(idle) < self.max_idle_per_backend and not backend.retired:
            idle.append(conn)
        else:
            conn.abort()
        return result

    @staticmethod
    def _read(conn: _ProbeConnection) -> ProbeResult:
        url = conn.backend.url
        status = conn.status
        if status != 200:
            if status in UNSUPPORTED_STATUSES:
                raise ProbeUnsupported(f"{url}: {status} on the probe path (no LoadReportingMiddleware?)")
            raise ProbeFailed(f"{url}: unexpected status {status}")
        if conn.rif is None:
            # A 200 with no load report: a catch-all route answered, not LoadReportingMiddleware. The
            # backend is fine; counting this as a failure would eject a healthy backend.
            raise ProbeUnsupported(f"{url}: 200 without {RIF_HEADER.decode()} on the probe path")
        try:
            rif = int(conn.rif)
            latency_us = int(conn.latency_us) if conn.latency_us is not None else 0
        except ValueError:
            rif = latency_us = -1
        if rif < 0 or latency_us < 0:
            raise ProbeFailed(f"{url}: invalid load headers {conn.rif!r}, {conn.latency_us!r}")
        return ProbeResult(rif, latency_us / 1e6)

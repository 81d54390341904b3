"""``ProbeClient``: the gateway's cheap HTTP/1.1 probe client (the client half of Prequal's probing).

A proxied request costs one to three probes, so a probe must cost far less than the request. An
``aiohttp`` GET spends most of its CPU in client layers a probe does not need; this client is a thin
user of our one HTTP/1.1 engine (``h1_connection``, ``h1_pool``: the same parser callbacks, framing,
interim answers, connection pools and idle sweep as the forwarding transport): it writes one fixed
request per backend over keep-alive connections kept in a small LIFO stack per backend, with bounds of
its own, and reads the load report from the answer.

    client = ProbeClient(timeout_s=0.05)
    result = await client.probe("http://10.0.0.5:8000")  # ProbeResult(rif=3, latency_s=0.012)
    client.send("http://10.0.0.5:8000", on_result)  # no task: on_result(result, error) follows
    await client.aclose()

``send`` is what the gateway uses: on a kept-alive connection a probe is one write, one timer and the
parser's callbacks, with no task or coroutine of its own (a task per probe cost as much as the rest of
the probe, measured with ``benchmarks.pyspy_profile``). Only a probe that must open a connection runs
a task, to connect.

The answer's ``x-prequal-rif`` (required) and ``x-prequal-latency-us`` (optional, 0 when absent) headers
are read; the body is consumed and ignored. ``404``, ``405`` or a ``200`` without ``x-prequal-rif`` (a
catch-all route) raise ``ProbeUnsupported``: the backend has no ``LoadReportingMiddleware``. Any other
failure (connect, timeout, malformed answer, other status, invalid header value) raises ``ProbeFailed``.
Both are ``ProbeError``.

A probe answer is untrusted input (a backend may be compromised or hostile), so it is bounded and
validated here, the one place where a backend's load report enters the gateway:

- each of ``x-prequal-rif`` and ``x-prequal-latency-us`` is read by ``core.load_report`` (the wire
  format's one home): a plain decimal integer of at most ``MAX_LOAD_DIGITS`` ASCII digits, at most
  ``MAX_RIF`` (a million requests in flight) and ``MAX_LATENCY_US`` (ten minutes), present at most once;
- the head (status line and fields, interim answers included) is at most ``MAX_HEAD_BYTES`` and the
  body, read and dropped, at most ``MAX_BODY_BYTES``; an answer running past either fails at once and
  its connection is closed, without buffering it; so does a byte after the answer, an interim answer
  other than 100 or 103, or a status above 599;
- anything else (an exception in the parser's callbacks included) is a ``ProbeFailed``: the policy
  hears of a failed probe and no value reaches its pool.

``https://`` backends are probed over TLS with the ``ssl`` context given (the gateway gives each pool's
client that pool's context, the one its requests and health checks use), else
``ssl.create_default_context()``. A base path in the URL (``http://h:1/svc``) prefixes the probe path.
Idle connections are closed after ``keepalive_s`` by the engine's sweep. One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from prequal_middleware.core.load_report import (
    DEFAULT_PROBE_PATH,
    LATENCY_HEADER,
    MAX_LATENCY_US,
    MAX_RIF,
    RIF_HEADER,
    parse_load_value,
)
from prequal_middleware.exceptions import (
    ProbeError,
    ProbeFailed,
    ProbeUnsupported,
    UpstreamConnectError,
    UpstreamError,
)
from prequal_middleware.transports.h1_connection import H1Connection
from prequal_middleware.transports.h1_pool import H1Pool, Origin

DEFAULT_TIMEOUT_S = 0.05
DEFAULT_MAX_IDLE_PER_BACKEND = 4
DEFAULT_KEEPALIVE_S = 30.0
UNSUPPORTED_STATUSES = frozenset({404, 405})
# Bounds on what a backend's answer may be (see the module docstring). LoadReportingMiddleware answers
# with a head of about 120 bytes and no body; an answer far beyond that is not a load report. 8 KiB is
# the largest head common servers send by default, and what the probe path buffers at worst per
# connection (plus one read of at most 256 KiB, asyncio's buffer, before the check runs).
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 4 * 1024
CLOSED = "the probe client is closed"

logger = logging.getLogger("prequal_middleware.transports.probe")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One backend's load report: requests in flight and its latency estimate in seconds."""

    rif: int
    latency_s: float


ProbeCallback = Callable[[ProbeResult | None, ProbeError | None], None]
"""Told the outcome of ``ProbeClient.send``: ``(result, None)`` or ``(None, error)``."""


class _ProbeConnection(H1Connection):
    """A probe connection: the engine's parsing and bounds; the load fields kept, the body dropped."""

    __slots__ = ("probe", "rif", "latency_us", "duplicate")

    read_unframed = False  # an answer without framing is taken at its head; the connection closes after
    fields_wanted = frozenset({RIF_HEADER, LATENCY_HEADER})

    def __init__(self, pool: H1Pool[_ProbeConnection], origin: Origin[_ProbeConnection]) -> None:
        super().__init__(pool, origin)
        self.probe: _Probe | None = None  # the probe this connection is answering
        self.rif: bytes | None = None
        self.latency_us: bytes | None = None
        self.duplicate = False  # a load field came twice

    def begin(self, probe: _Probe) -> None:
        """Send ``probe``'s request; its answer (or the failure) is reported to it."""
        self.start()
        self.probe = probe
        self.rif = self.latency_us = None
        self.duplicate = False
        assert self.transport is not None
        self.transport.write(self.origin.request)

    def abort(self) -> None:
        self.probe = None
        super().abort()

    # engine hooks

    def field(self, name: bytes, value: bytes) -> None:
        if name == RIF_HEADER:
            self.duplicate |= self.rif is not None
            self.rif = value
        elif name == LATENCY_HEADER:
            self.duplicate |= self.latency_us is not None
            self.latency_us = value

    def interim(self) -> None:
        self.rif = self.latency_us = None
        self.duplicate = False

    def finished(self) -> None:
        # Told once the read that completed the answer is parsed: a byte after it has failed it first.
        probe = self.probe
        if probe is not None:
            self.probe = None
            probe.answered(self)

    def failed(self, reason: str) -> None:
        probe = self.probe
        self.abort()
        if probe is not None:
            probe.connection_failed(self, reason)

    def overran(self) -> None:
        self.failed("bytes after the response")


class _Probe:
    """One probe in flight: its deadline, its connection or connect task, and whom to tell.

    No task of its own: on a kept-alive connection a probe is a write, a timer and parser callbacks.
    Only a probe that needs a new connection runs a (connect) task.
    """

    __slots__ = ("_client", "_backend", "_callback", "_sent", "_timer", "_conn", "_task", "_reused", "done")

    def __init__(
        self, client: ProbeClient, backend: Origin[_ProbeConnection], callback: ProbeCallback, sent: float
    ) -> None:
        self._client = client
        self._sent = sent  # the loop's time at send: the connection's idle time counts from it, no clock read
        self._backend = backend
        self._callback = callback
        self._timer: asyncio.TimerHandle | None = None
        self._conn: _ProbeConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._reused = False
        self.done = False

    def cancel(self) -> None:
        """Give up without reporting: the callback is not called."""
        self._end(None, None, notify=False)

    # driven by the client and the connection

    def start(self, conn: _ProbeConnection, reused: bool) -> None:
        self._conn = conn
        self._reused = reused
        conn.begin(self)

    def expire(self) -> None:
        self._timer = None
        self._end(None, ProbeFailed(f"{self._backend.url}: no answer within {self._client.timeout_s * 1000:g} ms"))

    def answered(self, conn: _ProbeConnection) -> None:
        self._conn = None
        try:
            result = ProbeClient._read(conn)
        except ProbeError as exc:
            conn.abort()
            self._end(None, exc)
            return
        except Exception as exc:  # a bug in reading must fail this probe, not the parser's caller
            conn.abort()
            self._end(None, ProbeFailed(f"{self._backend.url}: invalid answer ({exc!r})"))
            return
        self._client._pool.release(conn, self._sent)
        self._end(result, None)

    def connection_failed(self, conn: _ProbeConnection, reason: str) -> None:
        self._conn = None
        if self.done:
            return
        if self._reused and not conn.received and not self._client._closed:
            # The server closed the idle connection before our request reached it: not the backend's
            # fault. Try once more on a fresh connection, within the same deadline.
            self._client._connect_for(self)
            return
        self._end(None, ProbeFailed(f"{self._backend.url}: {reason}"))

    def _end(self, result: ProbeResult | None, error: ProbeError | None, notify: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self._conn = self._conn, None
        if conn is not None and conn.probe is self:
            conn.abort()  # given up mid-answer: the stream is out of step
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if notify:
            try:
                self._callback(result, error)
            except Exception:  # a bug in the caller must not break the connection's callbacks
                logger.exception("probe callback failed")


class ProbeClient:
    """Probe backends for their load over persistent HTTP/1.1 connections.

    Parameters:
        path: the probe path on every backend, after the backend URL's own base path (ASCII).
        timeout_s: budget for one probe, connect and answer included.
        max_idle_per_backend: idle keep-alive connections kept per backend; extra ones are closed.
        keepalive_s: how long an idle connection is kept (the engine's sweep closes it soon after).
        ssl: the TLS context for ``https://`` backends (default: ``ssl.create_default_context()``).
    """

    def __init__(
        self,
        *,
        path: str = DEFAULT_PROBE_PATH,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_idle_per_backend: int = DEFAULT_MAX_IDLE_PER_BACKEND,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if not path.startswith("/") or not path.isascii():
            raise ValueError(f"path must be ASCII and start with '/', got {path!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_idle_per_backend < 0:
            raise ValueError(f"max_idle_per_backend must be >= 0, got {max_idle_per_backend!r}")
        if not keepalive_s > 0:
            raise ValueError(f"keepalive_s must be > 0, got {keepalive_s!r}")
        self.path = path
        self.timeout_s = timeout_s
        self.max_idle_per_backend = max_idle_per_backend
        self.keepalive_s = keepalive_s
        self._path = path.encode("ascii")
        self._pool: H1Pool[_ProbeConnection] = H1Pool(
            _ProbeConnection,
            limit_per_origin=sys.maxsize,  # probes never wait for a slot; the idle stack is bounded
            max_idle_per_origin=max_idle_per_backend,
            keepalive_s=keepalive_s,
            max_headers=MAX_HEAD_BYTES,  # bounded by the head's bytes
            max_header_bytes=MAX_HEAD_BYTES,
            max_head_bytes=MAX_HEAD_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
            ssl=ssl,
            closed_message=CLOSED,
        )
        self._backends = self._pool.origins
        self._open = self._pool.connections  # every live connection, idle or busy
        self._connecting: dict[asyncio.Task[None], _Probe] = {}  # connect tasks and the probe each one is for
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        return self._closed

    @property
    def backends_known(self) -> int:
        """Backends with state here (address, request bytes, idle connections); ``forget`` drops one."""
        return len(self._backends)

    @property
    def open_connections(self) -> int:
        """Probe connections open now, idle or busy."""
        return len(self._open)

    async def probe(self, backend_url: str) -> ProbeResult:
        """Ask ``backend_url`` (``http://host:port[/base]``) for its load; raises a ``ProbeError``."""
        future: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()

        def done(result: ProbeResult | None, error: ProbeError | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(cast(ProbeResult, result))

        handle = self.send(backend_url, done)
        try:
            return await future
        except asyncio.CancelledError:
            if handle is not None:
                handle.cancel()
            raise

    def send(self, backend_url: str, callback: ProbeCallback) -> _Probe | None:
        """Probe ``backend_url`` without waiting: ``callback(result, None)`` or ``callback(None, error)`` follows.

        The callback runs exactly once, from an event-loop callback, within about ``timeout_s``; it runs
        before ``send`` returns when the probe cannot start (closed client, invalid URL), and then
        ``send`` returns None. Otherwise it returns a handle whose ``cancel()`` gives the probe up silently.
        """
        if self._closed:
            callback(None, ProbeFailed(CLOSED))
            return None
        backend = self._backends.get(backend_url)
        if backend is None:
            try:
                backend = self._backend(backend_url)
            except ProbeFailed as exc:
                callback(None, exc)
                return None
        loop = asyncio.get_running_loop()
        now = loop.time()
        probe = _Probe(self, backend, callback, now)
        probe._timer = loop.call_at(now + self.timeout_s, probe.expire)
        conn = self._pool.pop_idle(backend, now)
        if conn is not None:
            probe.start(conn, reused=True)
        else:
            self._connect_for(probe)
        return probe

    def forget(self, backend_url: str) -> None:
        """Drop a backend that left: close its idle connections and its cached request."""
        self._pool.forget(backend_url)

    async def aclose(self) -> None:
        """Close every connection, idle or busy; ``probe`` raises ``ProbeFailed`` afterwards."""
        self._closed = True
        for task, probe in list(self._connecting.items()):
            task.cancel()
            # Reported here, not by the task: a task cancelled before its first step never runs a line
            # of ``_connect``, and its probe would otherwise be reported only at its deadline.
            probe._end(None, ProbeFailed(CLOSED))
        for conn in list(self._open):
            conn.failed(CLOSED)  # its probe, if any, is told
        self._pool.close(lambda: UpstreamConnectError(CLOSED))
        # Transports close their sockets in a callback scheduled by abort(); let it run.
        await asyncio.sleep(0)

    def _backend(self, url: str) -> Origin[_ProbeConnection]:
        try:
            backend = self._pool.origin(url)
        except UpstreamConnectError as exc:
            raise ProbeFailed(str(exc)) from None
        backend.request = b"GET %s%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (backend.base, self._path, backend.host_header)
        return backend

    def _connect_for(self, probe: _Probe) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(probe))
        self._connecting[task] = probe
        task.add_done_callback(self._connected)
        probe._task = task

    def _connected(self, task: asyncio.Task[None]) -> None:
        self._connecting.pop(task, None)

    async def _connect(self, probe: _Probe) -> None:
        if self._closed:
            probe._end(None, ProbeFailed(CLOSED))
            return
        loop = asyncio.get_running_loop()
        try:
            try:
                # The probe's own timer ends it at its deadline (the pool's is a backstop just after).
                conn = await self._pool.connect(probe._backend, loop.time() + self.timeout_s)
            finally:
                probe._task = None  # connecting is over: ending the probe must not cancel this task now
        except asyncio.CancelledError:
            # Given up (deadline, cancel, aclose) while connecting; the pool closed what it had opened.
            if self._closed:
                probe._end(None, ProbeFailed(CLOSED))
            raise
        except UpstreamError as exc:
            probe._end(None, ProbeFailed(CLOSED if self._closed else str(exc)))
            return
        if self._closed:  # aclose() ran while we were connecting
            conn.abort()
            probe._end(None, ProbeFailed(CLOSED))
        elif probe.done:  # given up just as it connected
            conn.abort()
        else:
            probe.start(conn, reused=False)

    @staticmethod
    def _read(conn: _ProbeConnection) -> ProbeResult:
        url = conn.origin.url
        status = conn.status
        if status != 200:
            if status in UNSUPPORTED_STATUSES:
                raise ProbeUnsupported(f"{url}: {status} on the probe path (no LoadReportingMiddleware?)")
            raise ProbeFailed(f"{url}: unexpected status {status}")
        if conn.rif is None:
            # A 200 with no load report: a catch-all route answered, not LoadReportingMiddleware. The
            # backend is fine; counting this as a failure would eject a healthy backend.
            raise ProbeUnsupported(f"{url}: 200 without {RIF_HEADER.decode()} on the probe path")
        if conn.duplicate:
            raise ProbeFailed(f"{url}: invalid load headers (a load header given twice)")
        rif = parse_load_value(conn.rif, MAX_RIF)
        latency_us = 0 if conn.latency_us is None else parse_load_value(conn.latency_us, MAX_LATENCY_US)
        if rif is None or latency_us is None:
            # Quoted at most 40 bytes of each: the log line stays small whatever the backend sent.
            shown = [v if v is None else v[:40] for v in (conn.rif, conn.latency_us)]
            raise ProbeFailed(
                f"{url}: invalid load headers {shown[0]!r}, {shown[1]!r} (decimal integers up to "
                f"{MAX_RIF} and {MAX_LATENCY_US} expected)"
            )
        return ProbeResult(rif, latency_us / 1e6)

"""``ProbeClient``: the gateway's cheap HTTP/1.1 probe client (the client half of Prequal's probing).

A proxied request costs one to three probes, so a probe must cost far less than the request. An
``aiohttp`` GET spends most of its CPU in client layers a probe does not need; this client is an
``asyncio`` protocol that writes one fixed request per backend and parses the answer with ``httptools``
(uvicorn's own parser), over keep-alive connections kept in a small LIFO stack per backend.

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
  its connection is closed, without buffering it; so does a byte after the answer;
- anything else (an exception in the parser's callbacks included) is a ``ProbeFailed``: the policy
  hears of a failed probe and no value reaches its pool.

``https://`` backends are probed over TLS with ``ssl.create_default_context()`` (certificates verified);
a base path in the URL (``http://h:1/svc``) prefixes the probe path. One client belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from prequal_middleware.core.load_report import (
    DEFAULT_PROBE_PATH,
    LATENCY_HEADER,
    MAX_LATENCY_US,
    MAX_RIF,
    RIF_HEADER,
    parse_load_value,
)
from prequal_middleware.exceptions import ProbeError, ProbeFailed, ProbeUnsupported

DEFAULT_TIMEOUT_S = 0.05
DEFAULT_MAX_IDLE_PER_BACKEND = 4
UNSUPPORTED_STATUSES = frozenset({404, 405})
# Bounds on what a backend's answer may be (see the module docstring). LoadReportingMiddleware answers
# with a head of about 120 bytes and no body; an answer far beyond that is not a load report. 8 KiB is
# the largest head common servers send by default, and what the probe path buffers at worst per
# connection (plus one read of at most 256 KiB, asyncio's buffer, before the check runs).
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 4 * 1024

logger = logging.getLogger("prequal_middleware.transports.probe")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing an answer that broke a bound; ``reason`` says which."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One backend's load report: requests in flight and its latency estimate in seconds."""

    rif: int
    latency_s: float


ProbeCallback = Callable[[ProbeResult | None, ProbeError | None], None]
"""Told the outcome of ``ProbeClient.send``: ``(result, None)`` or ``(None, error)``."""


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
        "probe",
        "closed",
        "received",
        "status",
        "framed",
        "reusable",
        "rif",
        "latency_us",
        "duplicate",
        "head_done",
        "head_bytes",
        "head_read",
        "body_bytes",
        "refusal",
        "complete",
    )

    def __init__(self, backend: _Backend, open_connections: set[_ProbeConnection]) -> None:
        self.backend = backend
        self._open = open_connections
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.probe: _Probe | None = None  # the probe this connection is answering
        self.closed = False
        self.received = False
        self.status = 0
        self.framed = False
        self.reusable = False
        self.rif: bytes | None = None
        self.latency_us: bytes | None = None
        self.duplicate = False  # a load header came twice
        self.head_done = False  # the final answer's head is complete
        self.head_bytes = 0  # the head's size as the parser saw it (interim answers included)
        self.head_read = 0  # bytes read while the head was incomplete
        self.body_bytes = 0
        self.refusal: str | None = None  # why a callback stopped the parser
        self.complete = False  # the answer is complete: reported once the read that completed it is parsed

    def begin(self, probe: _Probe) -> None:
        """Send ``probe``'s request; its answer (or the failure) is reported to it."""
        self.probe = probe
        self.received = False
        self.status = 0
        self.framed = self.reusable = False
        self.rif = self.latency_us = None
        self.duplicate = self.head_done = False
        self.head_bytes = self.head_read = self.body_bytes = 0
        self.refusal = None
        self.complete = False
        assert self.transport is not None
        self.transport.write(self.backend.request)

    def abort(self) -> None:
        """Close now, dropping any unsent bytes; the client's bookkeeping forgets it at once."""
        self.probe = None
        self.closed = True
        self._open.discard(self)
        idle = self.backend.idle
        if self in idle:
            idle.remove(self)
        if self.transport is not None:
            self.transport.abort()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._open.add(self)

    def data_received(self, data: bytes) -> None:
        if self.probe is None:
            self.abort()  # bytes nobody asked for: the stream can no longer be trusted
            return
        self.received = True
        head_pending = not self.head_done
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            reason = self.refusal
            if reason is None:
                # An exception of ours inside a callback is a bug, not the backend's answer: say which.
                cause = exc.__context__
                reason = f"malformed response ({exc!r})" if cause is None else f"invalid answer ({cause!r})"
            self._fail(reason)
            return
        except Exception as exc:  # never let an answer's bytes raise out of the event loop's callback
            self._fail(f"invalid answer ({exc!r})")
            return
        if self.complete:
            # Reported only now: a byte after the answer in the same read has failed it above.
            self._answered()
        elif head_pending and not self.head_done and not self.closed:
            # Bytes of a head still incomplete: bounded here, before the parser buffers a field without end.
            self.head_read += len(data)
            if self.head_read > MAX_HEAD_BYTES:
                self._fail(f"response head larger than {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection closed before a full response")

    # httptools callbacks

    def _refuse(self, reason: str) -> None:
        self.refusal = reason
        raise _Refused(reason)

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer in the same read, after the one we asked for: the stream is out of step.
            self._refuse("bytes after the response")

    def on_status(self, status: bytes) -> None:
        # Every status line counts towards the head, interim answers' too (a hundred 100 Continue in
        # one read are a head without end).
        self.head_bytes += len(status) + 15  # "HTTP/1.1 200 " and CRLF
        if self.head_bytes > MAX_HEAD_BYTES:
            self._refuse(f"response head larger than {MAX_HEAD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Exact, whatever the reads: a head past the bound fails even when it arrived in one read (the
        # status line is bounded by the reads: data_received counts a head still pending).
        self.head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self.head_bytes > MAX_HEAD_BYTES:
            self._refuse(f"response head larger than {MAX_HEAD_BYTES} bytes")
        name = name.lower()
        if name == RIF_HEADER:
            self.duplicate |= self.rif is not None
            self.rif = value
        elif name == LATENCY_HEADER:
            self.duplicate |= self.latency_us is not None
            self.latency_us = value
        elif name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            self._refuse(f"response body larger than {MAX_BODY_BYTES} bytes")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # an interim answer; the final one follows
        self.head_done = True
        self.status = status
        self.reusable = self.framed and self._parser.should_keep_alive()
        if not self.framed:
            # The body runs to EOF: take the headers now and close the connection after use.
            self.complete = True

    def on_message_complete(self) -> None:
        if self.status == 0:
            self.framed = False  # end of an interim answer
            self.rif = self.latency_us = None
            self.duplicate = False
            return
        self.complete = True

    def _answered(self) -> None:
        probe = self.probe
        if probe is not None:
            self.probe = None
            probe.answered(self)

    def _fail(self, reason: str) -> None:
        probe = self.probe
        self.abort()
        if probe is not None:
            probe.connection_failed(self, reason)


class _Probe:
    """One probe in flight: its deadline, its connection or connect task, and whom to tell.

    No task of its own: on a kept-alive connection a probe is a write, a timer and parser callbacks.
    Only a probe that needs a new connection runs a (connect) task.
    """

    __slots__ = ("_client", "_backend", "_callback", "_timer", "_conn", "_task", "_reused", "done")

    def __init__(self, client: ProbeClient, backend: _Backend, callback: ProbeCallback) -> None:
        self._client = client
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
        self._client._release(conn)
        self._end(result, None)

    def connection_failed(self, conn: _ProbeConnection, reason: str) -> None:
        self._conn = None
        if self.done:
            return
        if self._reused and not conn.received:
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
        self._connecting: dict[asyncio.Task[None], _Probe] = {}  # connect tasks and the probe each one is for
        self._tls: ssl.SSLContext | None = None
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
            callback(None, ProbeFailed("the probe client is closed"))
            return None
        backend = self._backends.get(backend_url)
        if backend is None:
            try:
                backend = self._backends[backend_url] = self._backend(backend_url)
            except ProbeFailed as exc:
                callback(None, exc)
                return None
        loop = asyncio.get_running_loop()
        probe = _Probe(self, backend, callback)
        probe._timer = loop.call_later(self.timeout_s, probe.expire)
        conn = self._pop_idle(backend)
        if conn is not None:
            probe.start(conn, reused=True)
        else:
            self._connect_for(probe)
        return probe

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
        for task, probe in list(self._connecting.items()):
            task.cancel()
            # Reported here, not by the task: a task cancelled before its first step never runs a line
            # of ``_connect``, and its probe would otherwise be reported only at its deadline.
            probe._end(None, ProbeFailed("the probe client is closed"))
        for conn in list(self._open):
            conn._fail("the probe client is closed")
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

    def _release(self, conn: _ProbeConnection) -> None:
        """After a complete answer: keep the connection for the next probe, or close it."""
        backend = conn.backend
        idle = backend.idle
        if conn.reusable and not conn.closed and len(idle) < self.max_idle_per_backend and not backend.retired:
            idle.append(conn)
        else:
            conn.abort()

    def _connect_for(self, probe: _Probe) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(probe))
        self._connecting[task] = probe
        task.add_done_callback(self._connected)
        probe._task = task

    def _connected(self, task: asyncio.Task[None]) -> None:
        self._connecting.pop(task, None)

    async def _connect(self, probe: _Probe) -> None:
        backend = probe._backend
        if self._closed:
            probe._end(None, ProbeFailed("the probe client is closed"))
            return
        conn = _ProbeConnection(backend, self._open)
        loop = asyncio.get_running_loop()
        try:
            try:
                await loop.create_connection(lambda: conn, backend.host, backend.port, ssl=backend.ssl)
            finally:
                probe._task = None  # connecting is over: ending the probe must not cancel this task now
        except asyncio.CancelledError:
            conn.abort()  # given up (deadline, cancel, aclose) while connecting; it may have connected
            if self._closed:
                probe._end(None, ProbeFailed("the probe client is closed"))
            raise
        except OSError as exc:
            probe._end(None, ProbeFailed(f"{backend.url}: connect failed ({exc})"))
            return
        if self._closed:  # aclose() ran while we were connecting
            conn.abort()
            probe._end(None, ProbeFailed("the probe client is closed"))
        elif probe.done:  # given up just as it connected
            conn.abort()
        else:
            probe.start(conn, reused=False)

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

"""What your own tests need: ``MockTransport``, backends answered in-process, and ``FakeClock``.

``MockTransport`` implements the ``Transport`` seam (``transports/base.py``) without a socket: each
backend URL maps to an ASGI app run in-process, a ``CannedResponse``, or an ``UpstreamError`` to raise
(a backend that is down); every request it is handed is recorded in ``requests``. ``FakeClock`` is the
gateway's ``clock``: monotonic seconds that move only on ``advance()``, so leases, ejections and probe
ages are under the test's control (the core takes the same ``now``)::

    from prequal_middleware.testing import CannedResponse, FakeClock, MockTransport

    transport = MockTransport({
        "http://a.invalid": backend_app,                          # your backend, in-process
        "http://b.invalid": CannedResponse(503, body=b"busy"),    # always this answer
        "http://c.invalid": UpstreamConnectError("refused"),      # down: nothing sent, retried elsewhere
    })
    clock = FakeClock()
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=list(transport.backends))],
                      transport=transport, clock=clock)

Limits: an app's request body is read whole before the app runs (its response streams); the app's
lifespan is not run. Probes do not go through a transport (the gateway sends them itself), so with
backends on unresolvable hosts (``.invalid``) they fail at once and the gateway balances on the load
reports ``LoadReportingMiddleware`` puts on every response, and on its own view. Active health checks
do go through the transport, and are recorded like any request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message

from prequal_middleware.config import Timeouts
from prequal_middleware.exceptions import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from prequal_middleware.transports.base import RawHeaders, UpstreamRequest, UpstreamResponse, upstream_origin

__all__ = ["CannedResponse", "FakeClock", "MockTransport", "SentRequest"]

# The client address an in-process backend sees.
CLIENT = ("127.0.0.1", 40000)
_END = object()


class FakeClock:
    """Monotonic seconds that move only when a test says so: ``Gateway(clock=FakeClock())``.

    Parameters:
        start: the first reading.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (a monotonic clock never goes back)."""
        if not seconds >= 0:
            raise ValueError(f"a monotonic clock only moves forward, got {seconds!r}")
        self.now += seconds


@dataclass(frozen=True, slots=True)
class CannedResponse:
    """The same answer to every request: ``CannedResponse(200, [(b"content-type", b"text/plain")], b"ok")``."""

    status: int = 200
    headers: RawHeaders = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class SentRequest:
    """A request the transport was handed: the body as it was read, headers as raw pairs."""

    backend: str
    method: str
    target: str
    headers: RawHeaders
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as latin-1; ``None`` without one."""
        key = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


Backend = ASGIApp | CannedResponse | UpstreamError


class MockTransport:
    """A ``Transport`` that answers from in-process backends and records what it was sent.

    Parameters:
        backends: backend URL (as in ``UpstreamPool.upstreams`` or a registration) to what answers it:
            an ASGI app, a ``CannedResponse`` or an ``UpstreamError`` instance (raised on every request).
            A backend not in the mapping is unreachable (``UpstreamConnectError``, nothing sent). The body
            of a request answered by an error is not read (``SentRequest.body`` is empty).
            ``backends`` is a plain dict: change it mid-test to take a backend down or bring it back.

    ``requests`` lists every request in the order they were sent, health checks included.
    """

    def __init__(self, backends: Mapping[str, Backend] | None = None) -> None:
        self.backends: dict[str, Backend] = dict(backends or {})
        self.requests: list[SentRequest] = []
        self._running: set[asyncio.Task[None]] = set()

    def sent_to(self, backend: str) -> list[SentRequest]:
        """The requests sent to ``backend``, oldest first."""
        return [r for r in self.requests if r.backend == backend]

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        target = self.backends.get(request.backend)
        if target is None:
            target = UpstreamConnectError(f"{request.backend}: no such backend in this MockTransport")
        if isinstance(target, UpstreamError):
            # The body is left unread: after an error that sent nothing the gateway may send it elsewhere.
            self.requests.append(
                SentRequest(request.backend, request.method, request.target, list(request.headers), b"")
            )
            raise target
        body = b"".join([chunk async for chunk in request.body]) if request.body is not None else b""
        sent = SentRequest(request.backend, request.method, request.target, list(request.headers), body)
        self.requests.append(sent)
        if isinstance(target, CannedResponse):
            return UpstreamResponse(target.status, list(target.headers), _once(target.body))
        return await self._run(target, sent, timeouts)

    async def aclose(self) -> None:
        """Cancel the apps still answering; the transport stays usable (a gateway may start again)."""
        tasks, self._running = list(self._running), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- an ASGI app in-process --------------------------------------------------------------------

    async def _run(self, app: ASGIApp, sent: SentRequest, timeouts: Timeouts) -> UpstreamResponse:
        origin = upstream_origin(sent.backend)
        path, _, query = sent.target.partition("?")
        path = origin.base_path + path
        headers = list(sent.headers)
        if not any(k.lower() == b"host" for k, _ in headers):
            headers.insert(0, (b"host", origin.authority.encode("ascii")))
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": sent.method,
            "scheme": origin.scheme,
            "path": unquote(path),
            "raw_path": path.encode("ascii"),
            "query_string": query.encode("ascii"),
            "root_path": "",
            "headers": headers,
            "client": CLIENT,
            "server": (origin.host, origin.port),
            "state": {},
        }
        loop = asyncio.get_running_loop()
        started: asyncio.Future[tuple[int, RawHeaders]] = loop.create_future()
        chunks: asyncio.Queue[object] = asyncio.Queue()
        closed = asyncio.Event()
        request_read = False

        async def receive() -> Message:
            nonlocal request_read
            if not request_read:
                request_read = True
                return {"type": "http.request", "body": sent.body, "more_body": False}
            await closed.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if started.done():
                    raise RuntimeError("http.response.start sent twice")
                raw = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
                started.set_result((int(message["status"]), raw))
            elif message["type"] == "http.response.body":
                if not started.done():
                    raise RuntimeError("http.response.body before http.response.start")
                chunks.put_nowait(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    chunks.put_nowait(_END)

        async def serve() -> None:
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a crashing backend: the gateway sees a broken exchange
                error = UpstreamProtocolError(f"{sent.backend}: the app raised {exc!r}")
                if not started.done():
                    started.set_exception(error)
                chunks.put_nowait(error)
            finally:
                if not started.done():
                    started.set_exception(UpstreamProtocolError(f"{sent.backend}: the app sent no response"))
                chunks.put_nowait(_END)

        task = loop.create_task(serve())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

        async def close() -> None:
            closed.set()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if started.done() and not started.cancelled():
                started.exception()  # retrieved: no "exception was never retrieved" for an abandoned start

        try:
            status, raw_headers = await asyncio.wait_for(asyncio.shield(started), timeouts.response_headers_s)
        except TimeoutError:
            await close()
            raise UpstreamTimeout(f"{sent.backend}: no response headers", phase="headers") from None
        except BaseException:
            await close()
            raise

        async def body() -> AsyncIterator[bytes]:
            while True:
                try:
                    item = await asyncio.wait_for(chunks.get(), timeouts.read_idle_s)
                except TimeoutError:
                    raise UpstreamTimeout(f"{sent.backend}: the body stalled", phase="body") from None
                if item is _END:
                    return
                if isinstance(item, UpstreamError):
                    raise item
                assert isinstance(item, bytes)
                if item:
                    yield item

        return UpstreamResponse(status, raw_headers, body(), close)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data

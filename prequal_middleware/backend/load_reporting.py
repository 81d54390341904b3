"""``LoadReportingMiddleware``: the server half of Prequal for any Starlette or FastAPI app.

It counts the app's HTTP requests in flight (RIF), records each successful request's latency tagged
with the RIF it found on arrival (``LoadTracker``), and answers the gateway's probes itself:

    app = FastAPI()  # or Starlette(...)
    app.add_middleware(LoadReportingMiddleware)  # probes: GET /_prequal/probe

Add it last so that it is the outermost user middleware: probes then skip any concurrency limiter or
artificial delay added before it (Prequal's spec, section 4), and requests waiting in those still count.

A probe answer (``GET`` or ``HEAD`` on ``probe_path``; the query string is ignored) is ``200`` with
``x-prequal-rif: <int>`` and ``x-prequal-latency-us: <int>`` headers and, for GET, the body
``{"rif": <int>, "latency_s": <float>}``. Probes are never counted, never sampled and never reach the
app; other methods on the probe path go to the app like any request. ``probe_path`` is relative to the
app's ``root_path`` (a ``Mount``, or ``uvicorn --root-path``).

Every counted response also carries the report (the same two headers, a *piggybacked* report), so a
gateway learns this backend's load from the answers it gets anyway and sends fewer probes; the gateway
strips them from what its client sees. Here the RIF counts the requests in flight besides the one being
answered (what the next request finds once this one is done) and the latency is the estimate at that
RIF. ``report_on_responses=False`` turns this off (a backend whose clients must not see its load, when
no gateway is in front).

A request counts from arrival until the app hands its final ``http.response.body`` (``more_body``
false) to the server, so a streamed response counts until its last chunk and background tasks that
run after the response do not count. A client disconnect, a cancellation or an
exception counts it out too; those, 5xx and 429 are never latency samples (fast errors would pull the
median down). WebSocket and lifespan scopes pass through uncounted: a websocket lives for minutes and
would pin RIF without saying anything about the load a new request meets.

Requests on ``excluded_paths`` reach the app but are not load: never in RIF, never latency samples.
The default (``DEFAULT_EXCLUDED_PATHS`` plus ``probe_path``) covers the gateway's health check
(``HealthSettings.path``, ``/healthz``), the usual ``/readyz`` and ``/livez``, and the gateway's admin
routes at their documented ``/_prequal`` mount, in case a backend is also a gateway. Without this, a
few quick health checks on an idle backend outvote its real requests and it reports a latency of
almost 0; slow ones raise its RIF. A gateway checking another path needs it listed here.

Probes and health checks stay out of uvicorn's access log (``quiet_paths``, by default ``probe_path``,
``/healthz``, ``/readyz`` and ``/livez``; ``()`` logs them again): behind a gateway they would be most
of its lines. See ``backend.access_log``.

RIF is per process: with ``uvicorn --workers N`` each worker counts only its own requests and a probe
is answered by whichever worker accepts it, so one address reports a fraction of its load. Run one
process per replica (each registered under its own address) or accept per-worker reports.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prequal_middleware.backend.access_log import quiet_access_log
from prequal_middleware.core.load_report import DEFAULT_PROBE_PATH, encode_report
from prequal_middleware.core.load_tracker import LoadTracker

__all__ = ["DEFAULT_EXCLUDED_PATHS", "DEFAULT_PROBE_PATH", "DEFAULT_QUIET_PATHS", "LoadReportingMiddleware"]
PROBE_METHODS = frozenset({"GET", "HEAD"})
# Not load: health checks (the gateway's default HealthSettings.path is /healthz) and the gateway's
# admin routes at their documented mount (admin.admin_routes under /_prequal).
DEFAULT_EXCLUDED_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/livez",
        "/_prequal",
        "/_prequal/",
        "/_prequal/backends",
        "/_prequal/healthz",
        "/_prequal/readyz",
        "/_prequal/metrics",
        "/_prequal/register",
        "/_prequal/heartbeat",
        "/_prequal/unregister",
    }
)

# Health checks that stay out of the access log by default (with the probe path).
DEFAULT_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/livez"})

# Built once; only the two numbers and the length change per probe.
_PROBE_STATIC_HEADERS = ((b"content-type", b"application/json"), (b"cache-control", b"no-store"))


class LoadReportingMiddleware:
    """Count requests in flight, record latency per RIF and answer Prequal probes on ``probe_path``.

    Parameters:
        app: the ASGI app to wrap.
        probe_path: the path probes are answered on (exact match, after the ``root_path``).
        excluded_paths: paths whose requests go to the app uncounted (any method; exact match on the
            path after the ``root_path``, no prefixes, query string ignored). ``None`` (the default)
            is ``DEFAULT_EXCLUDED_PATHS`` plus ``probe_path``; a collection given replaces it, so
            ``()`` counts every request again. Public as ``self.excluded_paths``, a frozenset.
        tracker: the ``LoadTracker`` to feed; a new one by default. Public as ``self.tracker``.
        report_on_responses: add the load report to every counted response (piggybacked reports).
        quiet_paths: requests on these paths leave no line in uvicorn's access log (``None``: the probe
            path and ``DEFAULT_QUIET_PATHS``; ``()``: log everything).
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        probe_path: str = DEFAULT_PROBE_PATH,
        excluded_paths: Iterable[str] | None = None,
        tracker: LoadTracker | None = None,
        report_on_responses: bool = True,
        quiet_paths: Iterable[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(excluded_paths, str):
            raise TypeError("excluded_paths must be a collection of paths, not a string")
        self.app = app
        self.probe_path = probe_path
        self.excluded_paths = (
            DEFAULT_EXCLUDED_PATHS | {probe_path} if excluded_paths is None else frozenset(excluded_paths)
        )
        self.tracker = LoadTracker() if tracker is None else tracker
        self.report_on_responses = report_on_responses
        self.clock = clock
        if isinstance(quiet_paths, str):
            raise TypeError("quiet_paths must be a collection of paths, not a string")
        quiet = DEFAULT_QUIET_PATHS | {probe_path} if quiet_paths is None else frozenset(quiet_paths)
        if quiet:
            quiet_access_log(quiet)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        # The path may carry the root_path in front (a Mount, or uvicorn --root-path); the probe and
        # excluded paths are relative to it. Unmounted, root_path is "" and this is one falsy test.
        root_path: str | None = scope.get("root_path")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if path == self.probe_path and scope["method"] in PROBE_METHODS:
            await self._answer_probe(scope["method"] == "HEAD", send)
            return
        if path in self.excluded_paths:
            await self.app(scope, receive, send)
            return

        tracker = self.tracker
        clock = self.clock
        report = self.report_on_responses
        ticket = tracker.start(clock())
        status = 500  # a response that never started is an error

        # A plain function returning the server's awaitable: no extra coroutine per message.
        def send_counted(message: Message) -> Awaitable[None]:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                if report:
                    rif, latency_s = tracker.report(clock(), exclude=1)
                    headers = [*message.get("headers", ()), *encode_report(rif, latency_s)]
                    message = {**message, "headers": headers}
            elif (kind == "http.response.body" and not message.get("more_body", False)) or (
                kind == "http.response.pathsend"
            ):
                # Handed back: count out now, not when the app returns (background tasks run after).
                tracker.finish(ticket, clock(), ok=status < 500 and status != 429)
            return send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # No-op when the response completed; otherwise an exception, a cancellation or a client
            # that went away: count it out (no RIF leak) and never sample it.
            tracker.finish(ticket, clock(), ok=False)

    async def _answer_probe(self, head: bool, send: Send) -> None:
        rif, latency_s = self.tracker.report(self.clock())
        # repr of a finite float is valid JSON; no json module round trip on the probe path.
        body = f'{{"rif": {rif}, "latency_s": {latency_s!r}}}'.encode()
        headers = [*_PROBE_STATIC_HEADERS, (b"content-length", str(len(body)).encode()), *encode_report(rif, latency_s)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

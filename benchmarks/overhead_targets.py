"""The processes ``benchmarks.overhead`` measures: the upstream backend and the proxies, one per process.

Each runs one uvicorn worker (uvloop + httptools, no access log, no ``Server``/``Date`` headers, no
proxy-header trust) on ``127.0.0.1``:

    python -m benchmarks.overhead_targets backend --port 9001
    python -m benchmarks.overhead_targets aiohttp_raw --port 9000 --upstreams http://127.0.0.1:9001,http://127.0.0.1:9002
    python -m benchmarks.overhead_targets gateway_prequal --port 9000 --upstreams ...
    python -m benchmarks.overhead_targets gateway_round_robin --port 9000 --upstreams ...

``backend``: a raw ASGI app answering every request with the 2 bytes ``ok``, inside
``LoadReportingMiddleware`` (so Prequal's probes are answered), inside a counter that answers
``GET /_bench/probes`` with ``{"probes": <probes received>, "requests": <other requests>}``.

``aiohttp_raw``: "the Python ceiling", the least a Python proxy can do per request: pure ASGI, one shared
``aiohttp.ClientSession`` configured for proxying, round robin, the response streamed back with raw ASGI
``send`` messages.

``gateway_*``: a Starlette app with ``PrequalMiddleware`` added as a user would, one ``UpstreamPool("/")``
with the given policy (health checks on, every setting at its default). ``gateway_round_robin`` and
``gateway_prequal`` use the gateway's default transport (``H1Transport`` since it became the default);
the ``_aiohttp`` and ``_h1`` suffixes name ``AiohttpTransport()`` and ``H1Transport()`` explicitly. When
it stops it prints ``BENCH_STATS {"probes_sent": .., "probe_failures": .., "probes_skipped": ..}``
(whole process life) to stderr.

``--profile PATH`` runs the server under ``cProfile`` and writes the stats to PATH when it stops
(SIGTERM stops uvicorn gracefully); read them with ``python -m pstats PATH``.

Issue 6 adds more proxies here (``fastapi_proxy_lib``) next to the ones in ``APPS``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn
from starlette.applications import Starlette
from yarl import URL

from prequal_middleware import Gateway, PrequalMiddleware, PrequalSettings, UpstreamPool
from prequal_middleware.backend.load_reporting import DEFAULT_PROBE_PATH, LoadReportingMiddleware
from prequal_middleware.heap import settle_heap
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport
from prequal_middleware.transports.http1 import H1Transport

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HOST = "127.0.0.1"
COUNTER_PATH = "/_bench/probes"
STATS_MARKER = "BENCH_STATS "  # a gateway target prints this and a JSON object to stderr when it stops
BACKEND_BODY = b"ok"
# RFC 9110 section 7.6.1 (and Proxy-Connection): never forwarded by a proxy. Host is set by aiohttp.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {b"host"}
# aiohttp would add these on its own; a proxy sends only what the client sent (as AiohttpTransport).
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


# --- the upstream backend ----------------------------------------------------------------------------

_BACKEND_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BACKEND_BODY)).encode())]


async def tiny_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every HTTP request gets ``200 ok`` (the request body, if any, is not read)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _BACKEND_HEADERS})
    await send({"type": "http.response.body", "body": BACKEND_BODY})


class ProbeCounter:
    """Counts the probes and the other HTTP requests that reach ``app``; answers ``GET /_bench/probes``."""

    def __init__(self, app: ASGIApp, probe_path: str = DEFAULT_PROBE_PATH) -> None:
        self.app = app
        self.probe_path = probe_path
        self.probes = 0
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == COUNTER_PATH:
                body = json.dumps({"probes": self.probes, "requests": self.requests}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            if path == self.probe_path:
                self.probes += 1
            else:
                self.requests += 1
        await self.app(scope, receive, send)


def backend_app(upstreams: list[str]) -> ASGIApp:
    del upstreams  # a backend has none
    return ProbeCounter(LoadReportingMiddleware(tiny_app))


# --- aiohttp_raw: the Python ceiling -----------------------------------------------------------------


class RawAiohttpProxy:
    """A minimal pure-ASGI reverse proxy over one shared ``aiohttp.ClientSession``, round robin.

    Forwards the method, the raw path and query (byte-exact) and the request headers minus hop-by-hop
    ones and ``Host``; sends the upstream status and headers (minus hop-by-hop) and streams the body back
    chunk by chunk, the last chunk of a ``Content-Length`` body carrying ``more_body=False``. An upstream
    failure before the response started is a bare 502. No retries, timeouts, limits or hooks.
    """

    def __init__(self, upstreams: list[str], *, limit_per_host: int = 1024) -> None:
        if not upstreams:
            raise ValueError("aiohttp_raw needs at least one upstream")
        self.upstreams = [u.rstrip("/") for u in upstreams]
        self.limit_per_host = limit_per_host
        self.session: aiohttp.ClientSession | None = None
        self._next = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, limit_per_host=self.limit_per_host),
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                    timeout=aiohttp.ClientTimeout(total=None),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = b"".join(chunks)
                return body or None

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        assert session is not None, "run with lifespan on"
        base = self.upstreams[self._next]
        self._next = (self._next + 1) % len(self.upstreams)
        target: str = scope["raw_path"].decode("latin-1")
        query: bytes = scope["query_string"]
        if query:
            target = target + "?" + query.decode("latin-1")
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _DROPPED_REQUEST_HEADERS
        ]
        body = await self._read_body(receive)
        try:
            response = await session.request(
                scope["method"], URL(base + target, encoded=True), headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError):
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            out = [(name.lower(), value) for name, value in response.raw_headers if name.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            remaining = response.content_length
            if scope["method"] == "HEAD" or remaining == 0:
                await send({"type": "http.response.body", "body": b""})
                return
            content = response.content
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                    if remaining <= 0:
                        await send({"type": "http.response.body", "body": chunk})
                        return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except BaseException:
            response.close()  # cut short (client gone, cancelled): the connection cannot be reused
            raise
        finally:
            response.release()  # a no-op after close(); otherwise gives the connection back


def aiohttp_raw_app(upstreams: list[str]) -> ASGIApp:
    return RawAiohttpProxy(upstreams)


# --- our gateway -------------------------------------------------------------------------------------


class _GcPauses:
    """The garbage collector's collections and pauses per generation, from start-up's end to shutdown."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.longest_s = [0.0, 0.0, 0.0]
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation, took = info["generation"], time.perf_counter() - self._began
        self.count[generation] += 1
        self.total_s[generation] += took
        self.longest_s[generation] = max(self.longest_s[generation], took)

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def report(self) -> dict[str, list[float]]:
        return {
            "collections": list(self.count),
            "total_ms": [round(t * 1e3, 2) for t in self.total_s],
            "longest_ms": [round(t * 1e3, 2) for t in self.longest_s],
        }


def gateway_app(
    upstreams: list[str],
    policy: str,
    transport: Transport | None = None,
    prequal: PrequalSettings | None = None,
    settle: bool = False,
) -> ASGIApp:
    pool = UpstreamPool("/", upstreams=upstreams, policy=policy, prequal=prequal or PrequalSettings())
    gateway = Gateway(pools=[pool], transport=transport)

    pauses = _GcPauses()

    @contextlib.asynccontextmanager
    async def report_probe_stats(app: Starlette) -> AsyncIterator[None]:
        # Runs inside PrequalMiddleware's lifespan, after the gateway started: nothing per request.
        scheduler = getattr(gateway, "_scheduler", None)  # private, read for the report only
        if settle:
            settle_heap()  # as prequal-gateway does once started
        pauses.start()
        yield
        pauses.stop()
        pools = list(gateway.pools.values())
        stats = {
            "probes_sent": getattr(scheduler, "probes_sent", None),
            "probe_failures": getattr(scheduler, "probe_failures", None),
            "probes_skipped": sum(getattr(p, "probes_skipped", 0) for p in pools),
            "gc": pauses.report(),
        }
        print(STATS_MARKER + json.dumps(stats), file=sys.stderr, flush=True)

    app = Starlette(lifespan=report_probe_stats)
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


def gateway_round_robin_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "round_robin")  # the default transport (H1Transport)


def gateway_prequal_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "prequal")


def gateway_round_robin_settled_app(upstreams: list[str]) -> ASGIApp:
    # The heap settled after start-up, as prequal-gateway settles it (prequal_middleware.heap).
    return gateway_app(upstreams, "round_robin", settle=True)


def gateway_prequal_agebound_app(upstreams: list[str]) -> ASGIApp:
    # Reports answer draws by their age alone (report_max_queries=0): the gateway before it had the setting.
    return gateway_app(upstreams, "prequal", prequal=PrequalSettings(report_max_queries=0))


def gateway_prequal_sync_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "prequal", prequal=PrequalSettings(mode="sync"))  # the paper's sync mode


def gateway_round_robin_aiohttp_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "round_robin", AiohttpTransport())


def gateway_prequal_aiohttp_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "prequal", AiohttpTransport())


def gateway_round_robin_h1_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "round_robin", H1Transport())


def gateway_prequal_h1_app(upstreams: list[str]) -> ASGIApp:
    return gateway_app(upstreams, "prequal", H1Transport())


# --- a peer: fastapi-proxy-lib --------------------------------------------------------------------


def fastapi_proxy_lib_app(upstreams: list[str]) -> ASGIApp:
    """fastapi-proxy-lib's reverse proxy (httpx + StreamingResponse + a FastAPI route), as its README shows.

    It proxies to one base URL (no balancing), so it gets the first upstream: a cost comparison only.
    """
    from fastapi_proxy_lib.fastapi.app import reverse_http_app

    app: ASGIApp = reverse_http_app(base_url=upstreams[0].rstrip("/") + "/")
    return app


# Target name -> factory of its ASGI app from the upstream URLs (nginx is not a Python app: it has a
# target in overhead.py only).
APPS: dict[str, Callable[[list[str]], ASGIApp]] = {
    "backend": backend_app,
    "aiohttp_raw": aiohttp_raw_app,
    "gateway_round_robin": gateway_round_robin_app,
    "gateway_prequal": gateway_prequal_app,
    "gateway_round_robin_settled": gateway_round_robin_settled_app,
    "gateway_prequal_sync": gateway_prequal_sync_app,
    "gateway_prequal_agebound": gateway_prequal_agebound_app,
    "gateway_round_robin_aiohttp": gateway_round_robin_aiohttp_app,
    "gateway_prequal_aiohttp": gateway_prequal_aiohttp_app,
    "gateway_round_robin_h1": gateway_round_robin_h1_app,
    "gateway_prequal_h1": gateway_prequal_h1_app,
    "fastapi_proxy_lib": fastapi_proxy_lib_app,
}


def serve(app: ASGIApp, port: int) -> None:
    """One uvicorn worker on loopback, configured alike for every target."""
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead_targets", description="One process measured by benchmarks.overhead."
    )
    parser.add_argument("target", choices=sorted(APPS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstreams", default="", help="comma-separated upstream URLs (proxies only)")
    parser.add_argument("--profile", metavar="PATH", help="run under cProfile and write the stats to PATH")
    args = parser.parse_args(argv)
    upstreams = [u for u in args.upstreams.split(",") if u]
    if args.target != "backend" and not upstreams:
        parser.error(f"{args.target} needs --upstreams")
    app = APPS[args.target](upstreams)
    # uvicorn stops gracefully on SIGTERM, then raises the signal again once its handlers are restored;
    # with this no-op handler that ends uvicorn.run() normally, so the profile below still gets written.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if not args.profile:
        serve(app, args.port)
        return 0
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        serve(app, args.port)
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A backend as a process of its own, so a test can SIGKILL or SIGSTOP it by PID.

    python -m tests.reliability.backend_app --port 8001 --name b1 [--register http://gw/_prequal --ttl 6 --interval 1]

A Starlette app behind ``LoadReportingMiddleware`` (probes answered with its real RIF and latency):

- ``/echo`` (any method): ``{"backend": name}``, header ``x-backend``; ``?ms=N`` sleeps first;
- ``POST|PUT /upload``: reads the body as it streams and answers its length and SHA-256;
- ``GET /bytes?n=N``: N bytes of ``pattern()`` with a Content-Length, streamed in 256 KiB chunks;
- ``GET /stream?chunks=K&ms=M``: K chunks M ms apart (chunked); ``chunks=0`` streams until the client leaves;
- ``GET /hold``: answers only when the client has gone (counts the cancellation);
- ``GET /healthz``.

Outside the middleware (never counted as requests): ``GET /_control/stats`` and ``POST /_control/fail?on=1``,
which turns the backend into a fast failer: every request gets an instant 500 and every probe reports
zero load (RIF 0, latency 0), the worst liar a balancer can meet.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from prequal_middleware import LoadReportingMiddleware
from prequal_middleware.backend.self_registration import SelfRegistration

CHUNK = 256 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)


def pattern(n: int) -> AsyncIterator[bytes]:
    """``n`` bytes of a fixed repeating pattern, in ``CHUNK``-sized pieces."""

    async def gen() -> AsyncIterator[bytes]:
        left = n
        while left > 0:
            piece = _BLOCK if left >= CHUNK else _BLOCK[:left]
            left -= len(piece)
            yield piece

    return gen()


def pattern_digest(n: int) -> str:
    h = hashlib.sha1()
    full, rest = divmod(n, CHUNK)
    for _ in range(full):
        h.update(_BLOCK)
    h.update(_BLOCK[:rest])
    return h.hexdigest()


@dataclass
class Stats:
    name: str
    requests: int = 0
    holding: int = 0
    cancelled: int = 0
    failing: bool = False


def create_app(name: str, registration: SelfRegistration | None = None) -> Any:
    stats = Stats(name)
    headers = {"x-backend": name}

    async def echo(request: Request) -> Response:
        stats.requests += 1
        ms = float(request.query_params.get("ms", "0"))
        if ms > 0:
            await asyncio.sleep(ms / 1000)
        return JSONResponse({"backend": name}, headers=headers)

    async def upload(request: Request) -> Response:
        stats.requests += 1
        h = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            h.update(chunk)
            size += len(chunk)
        return JSONResponse({"backend": name, "len": size, "sha256": h.hexdigest()}, headers=headers)

    async def download(request: Request) -> Response:
        stats.requests += 1
        n = int(request.query_params["n"])
        return StreamingResponse(
            pattern(n), media_type="application/octet-stream", headers={**headers, "content-length": str(n)}
        )

    async def stream(request: Request) -> Response:
        stats.requests += 1
        chunks = int(request.query_params.get("chunks", "5"))
        pause = float(request.query_params.get("ms", "10")) / 1000

        async def gen() -> AsyncIterator[bytes]:
            i = 0
            while chunks == 0 or i < chunks:
                yield f"chunk {i} from {name}\n".encode()
                i += 1
                await asyncio.sleep(pause)

        return StreamingResponse(gen(), media_type="text/plain", headers=headers)

    async def hold(request: Request) -> Response:
        stats.requests += 1
        stats.holding += 1
        try:
            async with asyncio.timeout(60):
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            stats.cancelled += 1
        finally:
            stats.holding -= 1
        return PlainTextResponse("the client is gone")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    app: Any = Starlette(
        routes=[
            Route("/upload", upload, methods=["POST", "PUT"]),
            Route("/bytes", download),
            Route("/stream", stream),
            Route("/hold", hold),
            Route("/healthz", healthz),
            Route("/{path:path}", echo, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        ],
        lifespan=registration.lifespan if registration is not None else None,
    )
    reporting = LoadReportingMiddleware(app)
    probe_zero = [
        (b"content-type", b"application/json"),
        (b"x-prequal-rif", b"0"),
        (b"x-prequal-latency-us", b"0"),
    ]

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/_control/"):
                await control(scope, receive, send)
                return
            if stats.failing:
                if path == "/_prequal/probe":
                    body = b'{"rif": 0, "latency_s": 0.0}'
                    await send({"type": "http.response.start", "status": 200, "headers": probe_zero})
                else:
                    stats.requests += 1
                    body = b"failing fast"
                    start = {"type": "http.response.start", "status": 500, "headers": [(b"x-backend", name.encode())]}
                    await send(start)
                await send({"type": "http.response.body", "body": body})
                return
        await reporting(scope, receive, send)

    async def control(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/_control/fail":
            stats.failing = b"on=1" in scope.get("query_string", b"")
        rif, latency = reporting.tracker.report(reporting.clock())
        body = json.dumps({**asdict(stats), "rif": rif, "latency_s": latency}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return outer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.backend_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--register", help="a gateway's admin URL to register with (SelfRegistration)")
    parser.add_argument("--ttl", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=None, help="heartbeat interval (default ttl / 3)")
    parser.add_argument("--drain", type=float, default=1.0, help="SelfRegistration's pre-stop drain on SIGTERM")
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    registration = (
        SelfRegistration(args.register, url, ttl_s=args.ttl, interval_s=args.interval, drain_s=args.drain)
        if args.register
        else None
    )
    uvicorn.run(
        create_app(args.name, registration),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=3,
    )


if __name__ == "__main__":
    main()

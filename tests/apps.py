"""Backend apps for integration tests: real Starlette apps that report what actually arrived."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from tests.servers import ServerThread, serve


@dataclass
class BackendState:
    """What a test backend saw."""

    name: str
    requests: int = 0
    probes_seen: int = 0
    cancelled: int = 0
    holding: int = 0
    paths: list[str] = field(default_factory=list)
    hold_started: asyncio.Event | None = None


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def make_backend(name: str, *, instrumented: bool = True) -> tuple[Any, BackendState]:
    """A backend app and its state. ``instrumented`` wraps it in ``LoadReportingMiddleware``."""
    state = BackendState(name)

    async def echo(request: Request) -> Response:
        state.requests += 1
        state.paths.append(request.scope["raw_path"].decode("latin-1"))
        body = await request.body()
        return JSONResponse(
            {
                "backend": name,
                "method": request.method,
                "raw_path": request.scope["raw_path"].decode("latin-1"),
                "query": request.scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    async def download(request: Request) -> Response:
        n = int(request.path_params["n"])
        return Response(random_bytes(n, seed=n), media_type="application/octet-stream")

    async def gzipped(request: Request) -> Response:
        body = gzip.compress(b"hello gzip " * 100, mtime=0)
        return Response(body, headers={"content-encoding": "gzip", "content-type": "text/plain"})

    async def cookies(request: Request) -> Response:
        response = PlainTextResponse("cookies")
        response.raw_headers.append((b"set-cookie", b"a=1; Path=/"))
        response.raw_headers.append((b"set-cookie", b"b=2; Path=/"))
        return response

    async def hop(request: Request) -> Response:
        response = PlainTextResponse("hop")
        response.raw_headers.extend(
            [
                (b"connection", b"x-private"),
                (b"x-private", b"secret"),
                (b"keep-alive", b"timeout=5"),
                (b"x-public", b"ok"),
            ]
        )
        return response

    async def huge_header(request: Request) -> Response:
        return PlainTextResponse("huge", headers={"x-huge": "z" * 10_000})

    async def redirect(request: Request) -> Response:
        base = f"{request.url.scheme}://{request.headers['host']}"
        return Response(status_code=302, headers={"location": f"{base}/target?x=1"})

    async def stream(request: Request) -> Response:
        async def gen() -> Any:
            yield b"first chunk\n"
            await asyncio.sleep(float(request.query_params.get("pause", "1.0")))
            yield b"second chunk\n"

        from starlette.responses import StreamingResponse

        return StreamingResponse(gen(), media_type="text/plain")

    async def sleep(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("s", "1")))
        return PlainTextResponse(f"slept {name}")

    async def hold(request: Request) -> Response:
        # Holds the request until the gateway closes the connection (which is how it cancels).
        state.holding += 1
        if state.hold_started is not None:
            state.hold_started.set()
        try:
            async with asyncio.timeout(30):
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            state.cancelled += 1
        finally:
            state.holding -= 1
        return PlainTextResponse("the client is gone")

    async def status(request: Request) -> Response:
        return PlainTextResponse(name, status_code=int(request.path_params["code"]))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def ws_echo(websocket: WebSocket) -> None:
        subprotocols = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=subprotocols[0] if subprotocols else None)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is not None and text.startswith("close:"):
                    await websocket.close(code=int(text.split(":")[1]), reason="bye")
                    return
                if text is not None:
                    await websocket.send_text(f"{name}:{text}")
                else:
                    await websocket.send_bytes(message.get("bytes") or b"")
        except WebSocketDisconnect:
            return

    app: Any = Starlette(
        routes=[
            Route("/download/{n:int}", download),
            Route("/gzip", gzipped),
            Route("/cookies", cookies),
            Route("/hop", hop),
            Route("/redirect", redirect),
            Route("/huge-header", huge_header),
            Route("/raw/redirect", redirect),
            Route("/stream", stream),
            Route("/sleep", sleep),
            Route("/hold", hold),
            Route("/status/{code:int}", status),
            Route("/healthz", healthz),
            WebSocketRoute("/ws", ws_echo),
            Route("/{path:path}", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        ]
    )
    if instrumented:
        app = LoadReportingMiddleware(app)
    inner = app

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/_prequal/probe":
            state.probes_seen += 1
        await inner(scope, receive, send)

    return counting, state


@contextmanager
def two_backends() -> Iterator[tuple[ServerThread, ServerThread]]:
    """Backends ``a`` and ``b`` (``make_backend``) on uvicorn, for a module's gateway tests."""
    app_a, _ = make_backend("a")
    app_b, _ = make_backend("b")
    with serve(app_a) as a, serve(app_b) as b:
        yield a, b

"""``PrequalMiddleware``: requests on a route's prefix go to its pool's backends; everything else to your app.

    app = FastAPI()
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=["http://10.0.0.5:8000"])])
    app.add_middleware(PrequalMiddleware, gateway=gateway)

Pure ASGI. Prefixes match on a path-segment boundary and the longest wins (``/api`` takes ``/api`` and
``/api/x``, never ``/apix``). WebSockets on a route's prefix are proxied when the route allows them.
Adding the middleware is enough: it starts the gateway when the app's lifespan starts and stops it
when it ends (if your app does not speak lifespan, the middleware answers the lifespan protocol
itself). A gateway you started yourself (``async with gateway``) is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from prequal_middleware.exceptions import TargetRefused
from prequal_middleware.gateway.forwarding import Receive, Scope, Send, send_error
from prequal_middleware.gateway.gateway import Gateway
from prequal_middleware.gateway.request_target import check_target, raw_path

logger = logging.getLogger("prequal_middleware.gateway.middleware")

ASGIApp = Any


class PrequalMiddleware:
    """The gateway as ASGI middleware.

    Parameters:
        app: the wrapped ASGI app (receives every request outside the routes).
        gateway: the gateway whose routes this middleware serves.
    """

    def __init__(self, app: ASGIApp, *, gateway: Gateway) -> None:
        if not isinstance(gateway, Gateway):
            raise TypeError(f"PrequalMiddleware(gateway=...) must be a Gateway, got {gateway!r}")
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            raw = scope.get("raw_path")
            if type(raw) is not bytes:
                raw = raw_path(scope)
            query = scope.get("query_string", b"")
            # The common target takes the few C-level tests here; anything else gets check_target's verdict.
            path: str = scope["path"]
            if raw[:1] != b"/" or b"#" in raw or b"#" in query or "/." in path or "\\." in path:
                try:
                    check_target(raw, path, query)
                except TargetRefused as refused:
                    await self._refuse(kind, scope, receive, send, refused)
                    return
            route = self.gateway.match(raw)
            if route is not None:
                if kind == "http":
                    await self.gateway.handle_http(route, scope, receive, send)
                    return
                if route.websockets:
                    await self.gateway.handle_websocket(route, scope, receive, send)
                    return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refuse(self, kind: str, scope: Scope, receive: Receive, send: Send, refused: TargetRefused) -> None:
        """400 for a target no route may see (``request_target``), on HTTP and WebSocket alike."""
        if kind == "http":
            await send_error(send, 400, refused.error, refused.detail, None, close=True)
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):

            async def denial_send(message: dict[str, Any]) -> None:
                await send({**message, "type": "websocket." + message["type"]})

            await send_error(denial_send, 400, refused.error, refused.detail, None)
        else:  # the server cannot send a response of ours: closing before accept is its 403
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        started_here = False
        startup_seen = False
        failed = False

        async def wrapped_receive() -> dict[str, Any]:
            nonlocal started_here, startup_seen, failed
            message: dict[str, Any] = await receive()
            if message["type"] == "lifespan.startup":
                startup_seen = True
                if not gateway.running:
                    try:
                        await gateway.startup()
                    except Exception as exc:
                        # Reported here, not left to the app: an app may let the error escape without
                        # saying startup failed, and a server in lifespan "auto" mode then takes the
                        # app for one without lifespan and serves with the gateway down.
                        logger.exception("gateway startup failed")
                        failed = True
                        await send({"type": "lifespan.startup.failed", "message": f"gateway startup failed: {exc}"})
                        raise _StartupFailed from exc
                    started_here = True
            elif message["type"] == "lifespan.shutdown" and started_here:
                await gateway.shutdown()
                started_here = False
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if failed and message["type"].startswith("lifespan.startup"):
                return  # already answered: startup failed
            await send(message)

        try:
            await self.app(scope, wrapped_receive, guarded_send)
        except Exception:
            if failed:
                return  # reported above; the server stops
            if startup_seen:
                raise
            # The app does not speak lifespan (it raised, as ASGI allows): answer it ourselves.
            logger.debug("the wrapped app does not handle lifespan; PrequalMiddleware answers it")
            await self._own_lifespan(receive, send)
        else:
            if not startup_seen:
                # The app returned without reading the startup message (another way of not
                # supporting lifespan): the gateway must still start, so answer it ourselves.
                logger.debug("the wrapped app ignored lifespan; PrequalMiddleware answers it")
                await self._own_lifespan(receive, send)
        finally:
            if started_here:
                await gateway.shutdown()

    async def _own_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.startup()
                except Exception as exc:
                    logger.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": f"gateway startup failed: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _StartupFailed(Exception):
    """Ends the wrapped app's lifespan once the gateway's startup failed and was reported."""

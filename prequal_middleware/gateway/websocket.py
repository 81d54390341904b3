"""WebSocket proxying: a client WebSocket on a route's prefix is relayed to a backend chosen by the policy.

The upstream handshake happens first, so the client is accepted with the subprotocol the backend
chose, or refused (502 when the server supports the ASGI denial-response extension, else close code
1011) if no backend takes it. Messages are relayed both ways, text as text and bytes as bytes, and
the first side to close passes its close code to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from prequal_middleware.core import Outcome
from prequal_middleware.exceptions import UpstreamError, UpstreamTimeout
from prequal_middleware.gateway.access_log import AccessRecord
from prequal_middleware.gateway.forwarding import (
    Receive,
    Scope,
    Send,
    header_limit_problem,
    send_error,
    upstream_target,
)
from prequal_middleware.gateway.headers import VIA_PSEUDONYM, upstream_request_headers
from prequal_middleware.gateway.observability import Observability
from prequal_middleware.gateway.pool import PoolRuntime
from prequal_middleware.gateway.request_id import set_request_id
from prequal_middleware.gateway.routes import RouteRuntime
from prequal_middleware.transports.base import UpstreamWebSocket, WebSocketTransport, sendable_target

logger = logging.getLogger("prequal_middleware.gateway.websocket")

# The handshake headers the upstream client makes itself (RFC 6455 section 4.1).
_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
# Close codes that must not be sent in a close frame (RFC 6455 section 7.4.1), and what to send instead.
_RESERVED_CLOSE = {1004: 1011, 1005: 1000, 1006: 1011, 1015: 1011}


def _sendable(code: int | None) -> int:
    if code is None:
        return 1000
    code = _RESERVED_CLOSE.get(code, code)
    return code if 1000 <= code <= 4999 else 1011


async def forward_websocket(
    route: RouteRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    transport: WebSocketTransport,
    clock: Callable[[], float],
    *,
    via_pseudonym: bytes = VIA_PSEUDONYM,
    observe: Observability | None = None,
) -> None:
    """Relay one client WebSocket on ``route`` to a backend of its pool (``via_pseudonym``, ``observe``:
    see ``Forwarder``).

    Admission first, as for HTTP: the route's header limits (431), the pool's ``max_in_flight`` (503), then the
    pool's ``max_websockets`` (503). The handshake counts as a request in flight; the open socket
    counts only against ``max_websockets``, so long-lived sockets never hold the slots HTTP needs.
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    observe = observe if observe is not None else _NOTHING_OBSERVED
    arrived = clock()
    send, request_id, record = observe.begin(scope, send, "websocket", route.pool.name, "GET", route.prefix)
    status = 0
    try:
        status = await _admit(route, scope, receive, send, transport, clock, via_pseudonym, observe, request_id, record)
    finally:
        if record is not None:
            record.status, record.total_s = status or record.status, clock() - arrived
            observe.finish(record)


_NOTHING_OBSERVED = Observability()


async def _admit(
    route: RouteRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    transport: WebSocketTransport,
    clock: Callable[[], float],
    via_pseudonym: bytes,
    observe: Observability,
    request_id: str | None,
    record: AccessRecord | None,
) -> int:
    """Admission, then the relay; returns the status the handshake got (101 once accepted)."""
    pool = route.pool
    cfg = pool.config
    too_large = header_limit_problem(route.limits, scope["headers"])
    if too_large is not None:
        return await _deny(scope, send, 431, "headers_too_large", too_large, pool)
    if pool.full():
        return await _deny(scope, send, 503, "pool_overloaded", "the pool is at its concurrency limit", pool)
    open_now = _open_websockets.get(pool, 0)
    if open_now >= cfg.max_websockets:
        detail = f"the pool has max_websockets ({cfg.max_websockets}) WebSockets open"
        return await _deny(scope, send, 503, "too_many_websockets", detail, pool)
    _open_websockets[pool] = open_now + 1  # taken before the first await: no check-then-act race
    try:
        return await _forward(route, scope, receive, send, transport, clock, via_pseudonym, observe, request_id, record)
    finally:
        _open_websockets[pool] -= 1


def open_websockets(pool: PoolRuntime) -> int:
    """The WebSockets open (or being opened) through ``pool`` in this process."""
    return _open_websockets.get(pool, 0)


# Per pool, weakly: a pool's count goes with its gateway.
_open_websockets: weakref.WeakKeyDictionary[PoolRuntime, int] = weakref.WeakKeyDictionary()


async def _forward(
    route: RouteRuntime,
    scope: Scope,
    receive: Receive,
    send: Send,
    transport: WebSocketTransport,
    clock: Callable[[], float],
    via_pseudonym: bytes,
    observe: Observability,
    request_id: str | None,
    record: AccessRecord | None,
) -> int:
    pool = route.pool
    client = scope.get("client")
    prepared = upstream_request_headers(
        scope["headers"],
        client_ip=client[0] if client else None,
        scheme=scope.get("scheme", "ws"),
        preserve_host=route.preserve_host,
        via=via_pseudonym,
        http_version=scope.get("http_version", "1.1"),
    )
    if prepared.looped:
        detail = "the request already passed through this gateway (its Via header names it)"
        return await _deny(scope, send, 508, "loop_detected", detail, pool)
    headers = [(k, v) for k, v in prepared.headers if k not in _HANDSHAKE]
    if request_id is not None and observe.request_id is not None:
        set_request_id(headers, observe.request_id, request_id)
    if record is not None and record.span is not None and observe.tracing is not None:
        observe.tracing.inject(record, headers)
    target = upstream_target(route, scope)
    if route.rewrite_path is not None:
        try:
            rewritten = route.rewrite_path(target)
            target = await rewritten if inspect.isawaitable(rewritten) else rewritten
            if not isinstance(target, str):
                raise TypeError(f"rewrite_path returned {type(target).__name__}, not a str")
        except Exception:
            logger.exception("pool %s: the rewrite_path hook failed", pool.name)
            return await _deny(scope, send, 502, "hook_error", "the gateway's rewrite_path hook failed", pool)
        if not sendable_target(target):
            detail = "the gateway's path rewrite produced an invalid request target"
            return await _deny(scope, send, 500, "invalid_upstream_target", detail, pool)
    policy = pool.next_client()
    now = clock()
    selection = pool.select(now, policy=policy)  # its probes go to the pool's sink
    if selection is None:
        return await _deny(scope, send, 503, "no_backend", "no backend is available in this pool", pool)
    backend = selection.backend
    if record is not None:
        record.backend, record.reason, record.attempts = backend, selection.reason, 1
    # The handshake is the attempt; the open socket is counted by max_websockets alone.
    with pool.attempt(backend, policy, now) as handle:
        outcome = Outcome.CANCELLED
        started = clock()
        latency = 0.0
        try:
            try:
                upstream = await transport.connect_websocket(
                    backend,
                    target,
                    headers,
                    list(scope.get("subprotocols", [])),
                    route.timeouts,
                    tls=pool.ssl_context,
                )
            except UpstreamError as exc:
                latency = clock() - started
                status = handshake_status(exc)
                if status is not None and 400 <= status < 500:
                    # The backend answered and said no (auth, origin, a missing route): the client's
                    # doing, not the backend's failure; counted like the same status on HTTP (429
                    # alone is one).
                    outcome = Outcome.from_status(status)
                    return await _deny(
                        scope, send, status, "upstream_refused", "the backend refused the WebSocket", pool
                    )
                outcome = Outcome.TIMEOUT if isinstance(exc, UpstreamTimeout) else Outcome.CONNECT_ERROR
                return await _deny(scope, send, 502, "upstream_unreachable", "the backend refused the WebSocket", pool)
            latency = clock() - started
            outcome = Outcome.SUCCESS
        finally:
            now = clock()
            handle.finish(outcome, latency, now)
            if record is not None:
                record.upstream_s = latency
            if outcome.is_failure and observe.events is not None:
                observe.events.after_failure(pool.name, handle.policy, backend, now)
    accept_headers = [] if request_id is None else [(observe.request_id, request_id.encode("ascii"))]
    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": accept_headers})
        if record is not None:
            record.status = 101
        await _relay(receive, send, upstream, record)
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()
    return 101


def handshake_status(exc: BaseException) -> int | None:
    """The HTTP status a backend answered a WebSocket handshake with, when that is why ``exc`` was raised.

    A transport may set ``status`` on its ``UpstreamError``; otherwise the client library's own error
    it was raised from is asked (aiohttp's ``WSServerHandshakeError`` carries the status).
    """
    seen: BaseException | None = exc
    for _ in range(3):  # ours, the library's, at most one more
        if seen is None:
            return None
        status = getattr(seen, "status", None)
        if isinstance(status, int) and 100 <= status <= 599:
            return status
        seen = seen.__cause__ or seen.__context__
    return None


async def _relay(receive: Receive, send: Send, upstream: UpstreamWebSocket, record: AccessRecord | None) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data = text if text is not None else message.get("bytes") or b""
                if record is not None:
                    record.bytes_in += len(data.encode("utf-8") if isinstance(data, str) else data)
                await upstream.send(data)
            elif kind == "websocket.disconnect":
                await upstream.close(code=_sendable(message.get("code", 1000)), reason=message.get("reason") or "")
                return

    async def upstream_to_client() -> None:
        while True:
            data = await upstream.receive()
            if data is None:
                await send(
                    {"type": "websocket.close", "code": _sendable(upstream.close_code), "reason": upstream.close_reason}
                )
                return
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})

    tasks: list[asyncio.Task[Any]] = [
        asyncio.ensure_future(client_to_upstream()),
        asyncio.ensure_future(upstream_to_client()),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await upstream.close()


async def _deny(scope: Scope, send: Send, status: int, error: str, detail: str, pool: PoolRuntime) -> int:
    """Refuse the handshake: our JSON error when the server supports denial responses, else a close
    before accept (the server answers it with 403): 1013 "try again later" for a 503, 1008 for a 4xx.
    Returns ``status``."""
    if "websocket.http.response" in scope.get("extensions", {}):
        wrapped_send = _as_denial(send)
        await send_error(wrapped_send, status, error, detail, pool)
    else:
        code = 1013 if status == 503 else 1008 if 400 <= status < 500 else 1011
        await send({"type": "websocket.close", "code": code})
    return status


def _as_denial(send: Send) -> Send:
    async def denial_send(message: dict[str, Any]) -> None:
        await send({**message, "type": "websocket." + message["type"]})

    return denial_send

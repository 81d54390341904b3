"""``Forwarder``: an ASGI HTTP request to a backend and back, streamed both ways with raw ASGI messages.

This is the one place where upstream errors become status codes:

=========================================================  ======  =======================
what happened                                              status  ``error`` in the body
=========================================================  ======  =======================
request refused as ambiguous (CL + TE, conflicting CL)     400     ``bad_request``
more than ``max_headers`` headers or ``max_header_bytes``  431     ``headers_too_large``
a body larger than ``max_body_bytes``                      413     ``body_too_large``
no eligible backend, or every backend at its limit         503     ``no_backend``
the pool at its concurrency limit                          503     ``pool_overloaded``
connect failed on every attempt                            502     ``upstream_unreachable``
the last attempt's TLS handshake failed (``UpstreamTLS``)  502     ``upstream_tls_error``
sent, then the exchange failed before a response           502     ``upstream_error``
connect, response-header or body-read timeout              504     ``upstream_timeout``
the gateway not running                                    503     ``gateway_not_running``
the request's ``Via`` names this gateway (a loop)          508     ``loop_detected``
=========================================================  ======  =======================

Every gateway-made error has a small JSON body and an ``x-prequal-pool`` header, 503s a
``Retry-After``; no exception text ever reaches the client. Once response bytes went out, a failure
can only cut the connection (the client sees a truncated response, never a hang).

A failed attempt is retried on a different backend when that is safe (``RetrySettings``), and so is a
backend's answer with a status in ``RetrySettings.retry_on_status`` (closed unread). A client
that disconnects cancels the upstream request: its connection is closed, so the backend sees the
disconnect too.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from prequal_middleware.config import RequestLimits
from prequal_middleware.core import Outcome, Selection
from prequal_middleware.core.load_report import read_report
from prequal_middleware.exceptions import (
    ClientDisconnected,
    RequestBodyTimeout,
    RequestBodyTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from prequal_middleware.gateway.access_log import AccessRecord
from prequal_middleware.gateway.headers import (
    VIA_PSEUDONYM,
    downstream_response_headers,
    rewrite_location,
    upstream_request_headers,
)
from prequal_middleware.gateway.metrics import PrequalMetrics, code_class
from prequal_middleware.gateway.observability import Observability
from prequal_middleware.gateway.pool import Attempt, PoolRuntime
from prequal_middleware.gateway.request_id import set_request_id
from prequal_middleware.gateway.request_target import NOT_ORIGIN_FORM, raw_path
from prequal_middleware.gateway.routes import RouteRuntime
from prequal_middleware.transports.base import Transport, UpstreamRequest, UpstreamResponse, WholeBody, sendable_target
from prequal_middleware.transports.deadlines import Deadlines

logger = logging.getLogger("prequal_middleware.gateway.forwarding")

# A request still running after this long gets a watcher for the client's disconnect. Shorter ones
# never pay for the extra task.
DISCONNECT_WATCH_DELAY_S = 0.05
POOL_HEADER = b"x-prequal-pool"

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class _ClientBody:
    """The client's request body as an async iterator over ASGI ``http.request`` messages.

    ``buffer(n)`` reads up to ``n`` bytes ahead (before a backend is chosen); iterating yields those
    chunks (the same objects, no copy), then streams the rest. A body read whole by ``buffer`` can be
    iterated again (a retry); a streamed one only once. Every read is bounded by the body's deadline:
    ``timeout_s`` after the start plus a second per ``min_rate`` bytes received.
    """

    __slots__ = (
        "_receive",
        "started",
        "done",
        "_on_done",
        "_remaining",
        "_chunks",
        "received",
        "_deadline",
        "_timeout_s",
        "_min_rate",
        "waiting",
    )

    def __init__(
        self,
        receive: Receive,
        on_done: Callable[[], None],
        limit: int | None,
        timeout_s: float,
        min_rate: float | None,
    ) -> None:
        self._receive = receive
        self.started = False  # part of a streamed body was handed out: it cannot be replayed
        self.done = False
        self._on_done = on_done
        self._remaining = limit
        self._chunks: list[bytes] = []
        self.received = 0
        self._timeout_s = timeout_s
        self._min_rate = min_rate
        self._deadline = 0.0  # set on the first read
        self.waiting = False  # awaiting the client: a timeout now is the client's, not the backend's

    async def buffer(self, up_to: int) -> None:
        """Read ahead until the body is done or ``up_to`` bytes are in."""
        buffered = 0
        while not self.done and buffered < up_to:
            chunk = await self._next()
            if chunk:
                self._chunks.append(chunk)
                buffered += len(chunk)

    async def _next(self) -> bytes:
        if not self._deadline:
            self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        deadline = self._deadline
        if self._min_rate is not None:
            deadline += self.received / self._min_rate
        self.waiting = True
        try:
            async with asyncio.timeout_at(deadline):
                message = await self._receive()
        except TimeoutError:
            raise RequestBodyTimeout() from None
        self.waiting = False
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if self._remaining is not None:
            self._remaining -= len(chunk)
            if self._remaining < 0:
                raise RequestBodyTooLarge()
        if not message.get("more_body", False):
            self.done = True
            self._on_done()
        return chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self.started:
            raise RuntimeError("the request body can be read only once")
        for chunk in self._chunks:
            yield chunk
        if self.done:
            return  # read whole before the attempt: replayable
        self.started = True
        while not self.done:
            chunk = await self._next()
            if chunk:
                yield chunk


class _DisconnectWatch:
    """Cancels the request's task when the client disconnects; costs nothing for short requests."""

    __slots__ = ("_receive", "_task", "_starter", "_armed", "_watcher", "fired", "finished")

    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None, starter: Deadlines[_DisconnectWatch]) -> None:
        self._receive = receive
        self._task = task
        self._starter = starter
        self._armed = False
        self._watcher: asyncio.Task[None] | None = None
        self.fired = False
        self.finished = False  # set before the final body message: receive() then says disconnect

    def arm(self) -> None:
        """Start watching soon; call once nothing else reads ``receive`` (the body is all read)."""
        if self._task is not None and not self._armed and not self.finished:
            self._armed = True
            self._starter.arm(self, DISCONNECT_WATCH_DELAY_S)

    def start(self) -> None:
        """The request outlived ``DISCONNECT_WATCH_DELAY_S``: watch ``receive`` for the disconnect."""
        if not self.finished:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self.finished and self._task is not None:
                    self.fired = True
                    self._task.cancel()
                return

    def stop(self) -> None:
        self.finished = True
        if self._armed:
            self._starter.disarm(self)
        if self._watcher is not None:
            self._watcher.cancel()


class _Exchange:
    """One client request on its way through the gateway."""

    __slots__ = (
        "route",
        "pool",
        "scope",
        "send",
        "headers",
        "content_length",
        "target",
        "body",
        "watch",
        "status",
        "attempt",
        "record",
    )

    def __init__(
        self,
        route: RouteRuntime,
        scope: Scope,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        target: str,
        body: _ClientBody | None,
        watch: _DisconnectWatch,
        record: AccessRecord | None,
    ) -> None:
        self.route = route
        self.pool = route.pool
        self.attempt = 0  # 1 for the first try
        self.scope = scope
        self.send = send
        self.headers = headers
        self.content_length = content_length
        self.target = target
        self.body = body
        self.watch = watch
        self.status = 0  # the status sent to the client; 0 while none was
        self.record = record  # what the access log and the span hear of, when either is on


class Forwarder:
    """Forwards HTTP requests for the pools of one gateway.

    Parameters:
        transport: sends upstream requests.
        metrics: where requests, attempts and selections are counted.
        clock: monotonic seconds.
        via_pseudonym: this gateway's name in the ``Via`` header of upstream requests; a request whose
            ``Via`` already carries it came back through a loop and is refused (508). Default: the
            process's random ``headers.VIA_PSEUDONYM``.
        observe: access log, request ids, tracing and event logs (``Observability``); default: none.
    """

    def __init__(
        self,
        transport: Transport,
        metrics: PrequalMetrics,
        clock: Callable[[], float],
        *,
        via_pseudonym: bytes = VIA_PSEUDONYM,
        observe: Observability | None = None,
    ) -> None:
        self.via_pseudonym = via_pseudonym
        self._observe = observe if observe is not None else Observability()
        self._transport = transport
        self._metrics = metrics
        self._clock = clock
        # Each request's disconnect watch starts DISCONNECT_WATCH_DELAY_S after it was armed, on one timer.
        self._watches: Deadlines[_DisconnectWatch] = Deadlines(_DisconnectWatch.start)

    async def http(self, route: RouteRuntime, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request on ``route`` to a backend of its pool (counted under the pool's name)."""
        metrics = self._metrics
        name = route.pool.name
        arrived = self._clock()
        status = 0
        observe = self._observe
        send, request_id, record = observe.begin(scope, send, "http", name, scope["method"], route.prefix)
        try:
            status = await self._http(route, scope, receive, send, request_id, record)
        finally:
            elapsed = self._clock() - arrived
            code = code_class(status) if status else "cancelled"
            metrics.count(metrics.requests, name, code)
            metrics.observe(metrics.request_duration, elapsed, name)
            if record is not None:
                record.status, record.total_s = status, elapsed
                observe.finish(record)

    async def _http(
        self,
        route: RouteRuntime,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str | None,
        record: AccessRecord | None,
    ) -> int:
        pool = route.pool
        if pool.full():
            return await self._error(send, 503, "pool_overloaded", "the pool is at its concurrency limit", pool)
        limits = route.limits
        raw_headers = scope["headers"]
        too_large = header_limit_problem(limits, raw_headers)
        if too_large is not None:
            return await self._error(send, 431, "headers_too_large", too_large, pool)
        client = scope.get("client")
        prepared = upstream_request_headers(
            raw_headers,
            client_ip=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            preserve_host=route.preserve_host,
            via=self.via_pseudonym,
            http_version=scope.get("http_version", "1.1"),
        )
        if prepared.looped:
            # Our own Via came back: a gateway registered as its own backend (or two pointing at each
            # other). Refused here, so the loop costs one extra request, not a fan-out to exhaustion.
            detail = "the request already passed through this gateway (its Via header names it)"
            return await self._error(send, 508, "loop_detected", detail, pool)
        if prepared.problem is not None:
            # Close the connection too: with ambiguous framing, whatever follows on it cannot be trusted
            # to be the next request (a smuggling attempt hides one there).
            return await self._error(send, 400, "bad_request", prepared.problem, pool, close=True)
        if request_id is not None:
            set_request_id(prepared.headers, self._observe.request_id or b"", request_id)
        if record is not None and record.span is not None:
            self._observe.tracing.inject(record, prepared.headers)  # type: ignore[union-attr]
        if limits.max_body_bytes is not None and (prepared.content_length or 0) > limits.max_body_bytes:
            return await self._error(send, 413, "body_too_large", _too_large(limits.max_body_bytes), pool)
        target = upstream_target(route, scope)
        if route.rewrite_path is not None:
            try:
                target = await _rewritten(route.rewrite_path, target)
            except Exception:
                return await self._hook_failed(send, "rewrite_path", pool)
        watch = _DisconnectWatch(receive, asyncio.current_task(), self._watches)
        has_body = prepared.chunked or prepared.content_length
        body: _ClientBody | None = None
        if has_body:
            body = _ClientBody(
                receive, watch.arm, limits.max_body_bytes, limits.body_timeout_s, limits.body_min_rate_bytes_per_s
            )
        else:
            watch.arm()
        exchange = _Exchange(route, scope, send, prepared.headers, prepared.content_length, target, body, watch, record)
        try:
            if body is not None and limits.buffer_body_bytes:
                # Before a backend is chosen: a slow client holds no upstream connection while it dribbles.
                await body.buffer(limits.buffer_body_bytes)
            await self._attempts(exchange)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not watch.fired or task is None or task.uncancel() > 0:
                raise  # a real cancellation (shutdown), not our client-disconnect signal
        except ClientDisconnected:
            pass
        except RequestBodyTooLarge:
            if exchange.status == 0:
                detail = _too_large(limits.max_body_bytes)
                exchange.status = await self._error(send, 413, "body_too_large", detail, pool)
        except RequestBodyTimeout:
            if exchange.status == 0:
                rate = limits.body_min_rate_bytes_per_s
                detail = f"the request body arrived too slowly (limits.body_timeout_s={limits.body_timeout_s:g}" + (
                    f" plus 1 s per limits.body_min_rate_bytes_per_s={rate:g} bytes)" if rate is not None else ")"
                )
                exchange.status = await self._error(send, 408, "body_timeout", detail, pool, close=True)
        finally:
            watch.stop()
            if record is not None and body is not None:
                record.bytes_in = body.received
        return exchange.status

    async def _error(
        self, send: Send, status: int, error: str, detail: str, pool: PoolRuntime, *, close: bool = False
    ) -> int:
        self._metrics.child(self._metrics.gateway_errors, pool.name, error).inc()
        await send_error(send, status, error, detail, pool, close=close)
        return status

    async def _hook_failed(self, send: Send, hook: str, pool: PoolRuntime) -> int:
        logger.exception("pool %s: the %s hook failed", pool.name, hook)  # the traceback for the operator
        return await self._error(send, 502, "hook_error", f"the gateway's {hook} hook failed", pool)

    async def _attempts(self, exchange: _Exchange) -> None:
        route = exchange.route
        pool = exchange.pool
        cfg = pool.config
        metrics = self._metrics
        method: str = exchange.scope["method"]
        policy = pool.next_client()
        now = self._clock()
        pool.retry_budget.record_request(now)
        exclude: set[str] = set()
        failed: UpstreamError | None = None  # the last attempt's error, when retrying
        chosen: Selection | None = None  # the next backend, chosen while a 5xx answer was still held
        for attempt in range(cfg.retry.attempts):
            exchange.attempt = attempt + 1
            selection: Selection | None
            if chosen is not None:  # chosen while the last answer was held open (``_retry_answer_on``)
                selection, chosen = chosen, None
            elif pool.sync:  # sync mode: the request waits for its probes' answers
                selection = await pool.select_sync(now, exclude, policy)
                now = self._clock()  # the wait is not the backend's latency
            else:
                selection = pool.select(now, exclude, policy)  # its probes go to the pool's sink
            if selection is None:
                if failed is not None:  # every other backend was tried: the real cause, not a 503
                    status, error, detail = _UPSTREAM_ERRORS[_error_kind(failed)]
                    exchange.status = await self._error(exchange.send, status, error, detail, pool)
                    return
                exchange.status = await self._error(
                    exchange.send, 503, "no_backend", "no backend is available in this pool", pool
                )
                return
            metrics.count(metrics.selections, pool.name, selection.reason)
            request = UpstreamRequest(
                method, selection.backend, exchange.target, exchange.headers, exchange.body, exchange.content_length
            )
            if route.on_request is not None:
                try:
                    request = await _apply_hook(route.on_request, request)
                except Exception:
                    exchange.status = await self._hook_failed(exchange.send, "on_request", pool)
                    return
            request.tls = pool.ssl_context  # the pool's, set after the hook: a replacement cannot drop it
            if not sendable_target(request.target):
                # Only a path rewrite or a request hook can get here (the middleware admitted the
                # client's target): the gateway's own bug, not a backend's failure, and never sent.
                detail = "the gateway's path rewrite produced an invalid request target"
                exchange.status = await self._error(exchange.send, 500, "invalid_upstream_target", detail, pool)
                return
            record = exchange.record
            if record is not None:
                record.backend, record.reason, record.attempts = request.backend, selection.reason, attempt + 1
            try:
                with pool.attempt(request.backend, policy, now) as handle:
                    await self._attempt(exchange, handle, request, exclude)
                return
            except _RetryAnswer as retry_answer:  # a listed 5xx, closed unread; the retry is paid for
                now = self._clock()
                metrics.child(metrics.retries, pool.name).inc()
                exclude.add(request.backend)
                chosen = retry_answer.selection
                continue
            except UpstreamError as exc:
                now = self._clock()
                retry = attempt + 1 < cfg.retry.attempts and _retryable(
                    exc, method, exchange.body, cfg.retry.idempotent_methods
                )
                if retry and pool.retry_budget.try_withdraw(now):
                    metrics.child(metrics.retries, pool.name).inc()
                    exclude.add(request.backend)
                    failed = exc
                    continue
                status, error, detail = _UPSTREAM_ERRORS[_error_kind(exc)]
                exchange.status = await self._error(exchange.send, status, error, detail, pool)
                return

    async def _attempt(self, exchange: _Exchange, handle: Attempt, request: UpstreamRequest, tried: set[str]) -> None:
        """One upstream attempt, counted in flight by ``handle``; raises ``UpstreamError`` only before
        any response byte went out, and ``_RetryAnswer`` for an answer to retry elsewhere (``tried``:
        the backends of the earlier attempts)."""
        route = exchange.route
        pool = exchange.pool
        backend = request.backend
        started = self._clock()
        outcome = Outcome.CANCELLED
        latency = 0.0
        response: UpstreamResponse | None = None
        try:
            try:
                response = await self._transport.send(request, route.timeouts)
                if not 200 <= response.status <= 599:
                    # Only a final status is relayed: a 101 here (plain requests never ask for an
                    # upgrade) would open a raw tunnel behind a front proxy's WebSocket recipe, and a
                    # status above 599 means nothing. A 502 and a failure of the backend, as a
                    # malformed response.
                    raise UpstreamProtocolError(f"{backend}: status {response.status} is not a final answer")
            except UpstreamError as exc:
                latency = self._clock() - started
                body = exchange.body
                if body is not None and body.waiting and not body.done:
                    # The transport's idle timer fired while the client was the one not sending: the
                    # client's timeout (408), not the backend's failure (the outcome stays CANCELLED).
                    raise RequestBodyTimeout() from None
                outcome = _outcome_of(exc)
                raise
            latency = self._clock() - started
            outcome = Outcome.from_status(response.status)
            self._metrics.observe(self._metrics.upstream_latency, latency, pool.name)
            if handle.reads_reports:
                # The backend's piggybacked load report: it answers a later probe of this backend
                # (core.prequal), and never reaches the client (downstream_response_headers).
                report = read_report(response.headers)
                if report is not None:
                    handle.report(report[0], report[1], started + latency)
            if response.status in pool.config.retry.retry_on_status:
                selection = await self._retry_answer_on(exchange, handle, tried)
                if selection is not None:
                    raise _RetryAnswer(selection)  # the finally closes the answer: a failure for the policy
            if route.on_response is not None:
                response.backend, response.attempt = backend, exchange.attempt
                response.latency_s, response.outcome = latency, outcome.value
                try:
                    response = await _apply_hook(route.on_response, response)
                except Exception:
                    # The backend answered: its outcome stands; the client gets the hook's failure.
                    exchange.status = await self._hook_failed(exchange.send, "on_response", pool)
                    return
            try:
                await self._stream(exchange, request, response)
            except UpstreamError as exc:
                outcome = _outcome_of(exc)
                logger.warning("upstream %s failed mid-response: %s", backend, exc)
        finally:
            try:
                if response is not None:
                    await response.aclose()
            except Exception as exc:
                # Cleanup only: the client already has its answer (or the error above), and an error
                # raised from here would be retried or answered after the response went out.
                logger.warning("upstream %s: closing the response failed: %r", backend, exc)
            finally:
                # Always, even when closing raises or is cancelled: else the counts leak for good.
                now = self._clock()
                handle.finish(outcome, latency, now)
                self._metrics.count(self._metrics.upstream_requests, pool.name, backend, outcome.value)
                if exchange.record is not None:
                    exchange.record.upstream_s = latency
                if outcome.is_failure and self._observe.events is not None:
                    self._observe.events.after_failure(pool.name, handle.policy, backend, now)

    async def _retry_answer_on(self, exchange: _Exchange, handle: Attempt, tried: set[str]) -> Selection | None:
        """The backend to retry a listed 5xx answer on, with the retry paid from the budget; or None:
        relay the answer.

        Decided while the answer is still open: the free checks, the budget (not yet spent: a selection
        may send probes), a selection as the attempts loop makes it, and only then the withdrawal. So
        once the answer is closed there is always a backend to go to and a paid retry: never a
        gateway-made 503 where a backend's own answer was at hand.
        """
        pool = exchange.pool
        retry = pool.config.retry
        body = exchange.body
        if exchange.status or exchange.attempt >= retry.attempts:
            return None
        if exchange.scope["method"] not in retry.idempotent_methods:
            return None
        if body is not None and body.started:
            return None  # part of a streamed body went upstream and cannot be replayed (as ``_retryable``)
        now = self._clock()
        if pool.retry_budget.available(now) < 1.0:
            return None
        exclude = tried | {handle.backend}
        if pool.sync:  # the answer stays open during the wait (at most ``sync_wait_s``)
            selection = await pool.select_sync(now, exclude, handle.policy)
            now = self._clock()
        else:
            selection = pool.select(now, exclude, handle.policy)
        if selection is None or not pool.retry_budget.try_withdraw(now):
            return None  # (in sync mode, another request may have spent the budget during the wait)
        return selection

    async def _stream(self, exchange: _Exchange, request: UpstreamRequest, response: UpstreamResponse) -> None:
        scope, send, watch = exchange.scope, exchange.send, exchange.watch
        rewrite = _location_rewriter(exchange.route, request.backend)
        headers = downstream_response_headers(response.headers, rewrite)
        if response.status == 204 or response.status == 304:
            # No body, so no framing either: a Content-Length kept from a hostile or broken backend would
            # make a client wait for bytes that never come, or read the next response as this one's body.
            headers = [(k, v) for k, v in headers if k != b"content-length" and k != b"transfer-encoding"]
        exchange.status = response.status
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        remaining = _content_length(headers)
        if scope["method"] == "HEAD" or response.status in (204, 304):
            remaining = 0
        body = response.body
        if remaining == 0:
            async for _ in body:
                pass  # nothing to send; reading to the end gives the connection back
            watch.stop()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if type(body) is WholeBody and (remaining is None or remaining == len(body.data)):
            # The transport had it all with the head: one message, nothing to iterate or wait for.
            watch.stop()
            await send({"type": "http.response.body", "body": body.take(), "more_body": False})
            return
        async for chunk in body:
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    # The declared length is complete: this is the last message (one send fewer).
                    watch.stop()
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    async for _ in body:
                        pass
                    return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if remaining is not None and remaining > 0:
            raise UpstreamProtocolError(f"upstream {request.backend} closed {remaining} bytes short")
        watch.stop()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def header_limit_problem(limits: RequestLimits, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why the request's headers break ``limits`` (a 431, HTTP and WebSocket alike), or None."""
    if len(headers) > limits.max_headers:
        return f"more than {limits.max_headers} request headers"
    if sum(len(k) + len(v) for k, v in headers) > limits.max_header_bytes:
        return f"request headers larger than {limits.max_header_bytes} bytes"
    return None


def _too_large(limit: int | None) -> str:
    return f"the request body is larger than {limit} bytes"


def upstream_target(route: RouteRuntime, scope: Scope) -> str:
    """The path and query to send upstream: the raw path the client sent, less the route's prefix.

    The middleware routed the request on its raw path (``request_target``), so the prefix is
    stripped byte for byte and the rest goes upstream exactly as it came.
    """
    raw = scope.get("raw_path")
    if type(raw) is not bytes:
        raw = raw_path(scope)
    if route.strips:
        prefix = route.prefix_bytes
        if raw.startswith(prefix):
            raw = raw[len(prefix) :] or b"/"
    if raw[:1] != b"/":  # the middleware refuses these; joined to a backend URL they would name another host
        raise NOT_ORIGIN_FORM
    rest = raw.decode("latin-1")
    query: bytes = scope.get("query_string", b"")
    return rest + "?" + query.decode("latin-1") if query else rest


def _location_rewriter(route: RouteRuntime, backend: str) -> Callable[[bytes], bytes]:
    """A ``Location`` at the backend becomes a relative reference under the route's prefix.

    Nothing from the request goes into it: not the client's ``Host`` (which any client may forge),
    not its scheme. The client resolves the path against the URL it used (``headers.rewrite_location``).
    """

    def rewrite(value: bytes) -> bytes:
        prefix = route.prefix_bytes if route.strips else b""
        return rewrite_location(value, backend.encode("latin-1"), prefix)

    return rewrite


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class _RetryAnswer(Exception):
    """A backend's answer is retried on ``selection`` (not an ``UpstreamError``: it answered)."""

    def __init__(self, selection: Selection) -> None:
        super().__init__(selection.backend)
        self.selection = selection


def _outcome_of(exc: UpstreamError) -> Outcome:
    if isinstance(exc, UpstreamTimeout):
        return Outcome.TIMEOUT
    if isinstance(exc, UpstreamConnectError):
        return Outcome.CONNECT_ERROR
    return Outcome.FAILURE


def _retryable(exc: UpstreamError, method: str, body: _ClientBody | None, idempotent: frozenset[str]) -> bool:
    if body is not None and body.started:
        return False  # part of the body went upstream and cannot be replayed
    if not exc.sent:
        return True
    return isinstance(exc, UpstreamProtocolError) and method in idempotent


async def _rewritten(hook: Callable[[str], Any], target: str) -> str:
    result = hook(target)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, str):
        raise TypeError(f"rewrite_path returned {type(result).__name__}, not a str")
    return result


async def _apply_hook(hook: Callable[[Any], Any], value: Any) -> Any:
    result = hook(value)
    if inspect.isawaitable(result):
        result = await result
    return value if result is None else result


_UPSTREAM_ERRORS = {
    "timeout": (504, "upstream_timeout", "the backend did not answer in time"),
    "connect": (502, "upstream_unreachable", "no backend could be reached"),
    "tls": (502, "upstream_tls_error", "the TLS handshake with the backend failed"),
    "protocol": (502, "upstream_error", "the backend failed to answer"),
}


def _error_kind(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamTLSError):
        return "tls"
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    return "protocol"


async def send_error(
    send: Send, status: int, error: str, detail: str, pool: PoolRuntime | None, *, close: bool = False
) -> None:
    """A gateway-made error: a small JSON body, the pool's name in a header, ``Retry-After`` on 503.

    The pool is named by its name (a pool declared by prefix is named by it), not by the route.

    ``close`` asks the server to close the connection after it (``Connection: close``).
    """
    name = pool.name if pool is not None else None
    body = json.dumps({"error": error, "detail": detail, "pool": name}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if name is not None:
        headers.append((POOL_HEADER, name.encode("utf-8")))
    if status == 503:
        retry_after = pool.config.retry_after_s if pool is not None else 1
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})

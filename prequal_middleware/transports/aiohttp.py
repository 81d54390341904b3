"""``AiohttpTransport``: the opt-in upstream transport, an ``aiohttp`` session configured for proxying.

``Gateway(transport=AiohttpTransport())`` or ``PREQUAL_TRANSPORT=aiohttp`` (the default is ``H1Transport``,
which runs upstream WebSockets on one of these).

What a proxy needs that a client library does not do by default:

- a cookie jar that keeps nothing (the default one would replay one user's cookies to others);
- no automatic decompression (gzip passes byte-exact with its headers) and no invented headers
  (``User-Agent``, ``Accept``, ``Accept-Encoding``, ``Content-Type``);
- the target passed already encoded, so the query stays byte-exact (aiohttp would requote ``%2F``);
- redirects never followed;
- a connection limit per backend, not one shared limit (requests queued at a slow backend would hold
  the connections the fast ones need);
- "never sent" told apart from "sent, then failed", so only safe requests are retried;
- a connection protocol that trusts no byte the backend sends out of turn (``_ProxyResponseHandler``):
  bytes on an idle connection, or after the final response, close the connection (aiohttp would parse
  them into a response, queue it, and hand it to the next request on that connection as its answer,
  ``Set-Cookie`` included); a second response in one segment is dropped with the connection; an
  interim answer other than 100 and 103 fails the exchange (a 101 is the forwarder's to refuse: the
  same protocol carries WebSocket handshakes).

Measured on this project's machines: raw ASGI + aiohttp ~132 us of CPU per proxied request, against
1,000-3,400 us for a stock ``httpx.AsyncClient`` (docs: benchmark-method.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.streams import StreamReader
from yarl import URL

from prequal_middleware.exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from prequal_middleware.transports.base import (
    RawHeaders,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamWebSocket,
    upstream_origin,
)

if TYPE_CHECKING:
    from prequal_middleware.config import Timeouts

logger = logging.getLogger("prequal_middleware.transports.aiohttp")

# Headers aiohttp would add on its own; a proxy forwards only what the client sent.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
# Interim answers let through: 100 Continue, 103 Early Hints, and 101 (a WebSocket handshake's final
# answer to aiohttp; the forwarder refuses it on plain HTTP requests, which never ask for an upgrade).
INTERIM_OK = frozenset({100, 101, 103})


class _ProxyResponseHandler(ResponseHandler):
    """aiohttp's connection protocol, with no byte from the backend taken out of turn.

    An exchange opens when aiohttp sets the response parameters for a request (before it is written)
    and ends when the final response's body is complete. A byte outside an exchange closes the
    connection instead of being parsed (and queued for whoever uses the connection next); a second
    final response inside one is dropped and the connection closed after the first; an interim status
    other than 100/101/103 fails the exchange.
    """

    _expecting = False  # an exchange is open: its response may still arrive
    _final: StreamReader | None = None  # the body of the exchange's final response, once it began
    _refused = False  # the exchange broke a rule: nothing more is queued

    def set_response_params(self, *args: Any, **kwargs: Any) -> None:
        self._expecting = True
        self._final = None
        self._refused = False
        super().set_response_params(*args, **kwargs)

    def feed_data(self, data: Any, size: int = 0) -> None:
        message, payload = data
        if self._refused or self._final is not None:
            self.force_close()  # a response after the final one: nobody asked for it
            return
        code = message.code
        if code < 200 and code not in INTERIM_OK:
            self._refused = True
            self.set_exception(BadHttpMessage(f"unexpected interim status {code}"))
            return
        if code >= 200 or code == 101:
            self._final = payload
        super().feed_data(data, size)

    def data_received(self, data: bytes) -> None:
        if not self._expecting and data and self._payload_parser is None and not self._upgraded:
            self.force_close()  # bytes nobody asked for: close, never parse them as the next answer
            transport = self.transport
            if transport is not None:
                transport.close()
            return
        super().data_received(data)
        final = self._final
        if final is not None and final.is_eof():
            self._expecting = False


class AiohttpTransport:
    """The default transport.

    Parameters:
        limit_per_backend: connections per backend (host and port); requests beyond it wait for one.
        keepalive_s: how long an idle upstream connection is kept.
        max_response_header_bytes: the longest upstream response header line accepted.
        max_response_headers: the most upstream response headers accepted.
        ssl: passed to aiohttp for https backends (an ``ssl.SSLContext``, or False to skip verification).
            A request's own context (``UpstreamRequest.tls``, a pool's ``UpstreamTLS``) wins; aiohttp
            keys its connections by context, so one made for a pool is never lent to another.
    """

    def __init__(
        self,
        *,
        limit_per_backend: int = 1024,
        keepalive_s: float = 30.0,
        max_response_header_bytes: int = 8190,
        max_response_headers: int = 128,
        ssl: object = True,
    ) -> None:
        self.limit_per_backend = limit_per_backend
        self.keepalive_s = keepalive_s
        self.max_response_header_bytes = max_response_header_bytes
        self.max_response_headers = max_response_headers
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop (aiohttp binds a session to its loop).
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self.limit_per_backend,
            keepalive_timeout=self.keepalive_s,
            ssl=self._ssl,  # type: ignore[arg-type]
            ttl_dns_cache=10,
        )
        # aiohttp has no public hook for the connection protocol; ``_factory`` has named it since 3.0.
        if isinstance(getattr(connector, "_factory", None), functools.partial):
            factory = functools.partial(_ProxyResponseHandler, loop=asyncio.get_running_loop())
            connector._factory = cast("functools.partial[ResponseHandler]", factory)
        else:  # pragma: no cover - a future aiohttp
            logger.warning("aiohttp %s: cannot install the strict connection protocol", aiohttp.__version__)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            requote_redirect_url=False,
            max_field_size=self.max_response_header_bytes,
            max_line_size=self.max_response_header_bytes,
            max_headers=self.max_response_headers,
        )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        session = self._session or self._open()
        loop = asyncio.get_running_loop()
        url = _url(request.backend, request.target, websocket=False)
        headers = _pinned_headers(request.backend, request.headers)
        server_hostname = _server_hostname(request.backend)
        tls = True if request.tls is None else request.tls  # True: the session's own
        # aiohttp starts sock_read once the request is fully written and re-arms it on every read:
        # exactly the response-headers timeout. The upload's idle timeout is ours (the deadline).
        limits = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect_s,
            sock_connect=timeouts.connect_s,
            sock_read=timeouts.response_headers_s,
        )
        body: _BodyStream | None = None
        deadline: asyncio.Timeout | None = None
        if request.body is not None:
            deadline = asyncio.timeout(None)
            body = _BodyStream(request.body, deadline, timeouts.read_idle_s, loop)
        try:
            if deadline is None:
                response = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    allow_redirects=False,
                    timeout=limits,
                    server_hostname=server_hostname,
                    ssl=tls,
                )
            else:
                async with deadline:
                    deadline.reschedule(loop.time() + timeouts.connect_s + timeouts.read_idle_s)
                    response = await session.request(
                        request.method,
                        url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                        timeout=limits,
                        server_hostname=server_hostname,
                        ssl=tls,
                    )
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ClientError):  # aiohttp's own timeouts are TimeoutErrors too
                raise _upstream_error(exc, repr(request)) from None
            raise UpstreamTimeout(f"{request!r}: the request body stalled", phase="body") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if body is not None and body.failed is not None:
                raise body.failed from None  # the client side of the upload broke, not the backend
            raise _upstream_error(exc, repr(request)) from None
        if body is not None:
            body.answered = response.status >= 400 or response.headers.get("connection", "").lower() == "close"
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            # From here on sock_read is the body's idle timeout: aiohttp re-arms it on every read.
            connection.protocol.read_timeout = timeouts.read_idle_s
            connection.protocol.start_timeout()

        async def close() -> None:
            # After a complete body, release() already gave the connection back to the pool and
            # this is a no-op; otherwise the connection is closed, which cancels the request upstream.
            response.close()

        return UpstreamResponse(response.status, list(response.raw_headers), _read_body(response), close)

    async def connect_websocket(
        self,
        backend: str,
        target: str,
        headers: RawHeaders,
        subprotocols: list[str],
        timeouts: Timeouts,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> UpstreamWebSocket:
        session = self._session or self._open()
        url = _url(backend, target, websocket=True)
        try:
            async with asyncio.timeout(timeouts.connect_s + timeouts.response_headers_s):
                ws = await session.ws_connect(
                    url,
                    headers=_pinned_headers(backend, headers),
                    server_hostname=_server_hostname(backend),
                    ssl=True if tls is None else tls,
                    protocols=subprotocols,
                    autoclose=False,
                    autoping=True,
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=timeouts.connect_s),
                )
        except TimeoutError:
            raise UpstreamTimeout(f"websocket {url}: no handshake in time", phase="headers") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise _upstream_error(exc, f"websocket {url}") from None
        return _AiohttpWebSocket(ws)


def _pinned_headers(backend: str, headers: RawHeaders) -> list[tuple[str, str]]:
    """The request's headers for aiohttp; a DNS-pinned member gets ``Host`` the name it stands for
    (aiohttp would write the address it connects to) unless the request carries one."""
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
    origin = upstream_origin(backend)
    if origin.pinned and not any(k == b"host" for k, _ in headers):
        pairs.insert(0, ("Host", origin.authority))
    return pairs


def _server_hostname(backend: str) -> str | None:
    """The TLS name of a DNS-pinned https member (its address is what the URL names)."""
    origin = upstream_origin(backend)
    return origin.host if origin.pinned and origin.scheme == "https" else None


def _url(backend: str, target: str, *, websocket: bool) -> URL:
    """The URL from parsed parts: the backend's scheme, host, port and base path, the target's path and query."""
    origin = upstream_origin(backend)
    # The forwarder checked the target (sendable_target); a path that does not start with "/" (one
    # handed to the transport directly) cannot name another host either: URL.build refuses it.
    path, _, query = target.partition("?")
    try:
        return URL.build(
            scheme=origin.websocket_scheme if websocket else origin.scheme,
            host=origin.address,
            port=origin.port,
            path=origin.base_path + path,
            query_string=query,
            encoded=True,
        )
    except ValueError as exc:
        raise UpstreamConnectError(f"{backend} {target!r}: {exc}") from None


def _upstream_error(exc: BaseException, what: str) -> UpstreamError:
    """aiohttp's exception as ours: never sent (connect), a timeout by phase, or sent-then-failed."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"{what}: connect timed out", phase="connect")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return UpstreamTimeout(f"{what}: no response headers in time", phase="headers")
    if isinstance(exc, aiohttp.ClientSSLError):  # the certificate or the handshake: nothing was sent
        return UpstreamTLSError(f"{what}: TLS handshake failed: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"{what}: cannot connect: {exc}")
    return UpstreamProtocolError(f"{what}: {type(exc).__name__}: {exc}")


class _BodyStream:
    """The client's request body, as aiohttp pulls it; re-arms the upload deadline per chunk.

    aiohttp returns the response as soon as its head arrives and keeps sending the body meanwhile.
    After an error answer (4xx/5xx, or one that closes the connection: an early 413) the upload stops
    (RFC 9112 9.3): no more of the client's body is read or sent, and aiohttp closes the connection when
    the response ends (its writer is cancelled then), so a cut-short body is never taken for complete.
    After an early 2xx/3xx (a backend streaming while it reads) the upload goes on, bounded by the
    response's life.
    """

    __slots__ = ("_chunks", "_deadline", "_idle_s", "_loop", "failed", "answered")

    def __init__(
        self, chunks: AsyncIterable[bytes], deadline: asyncio.Timeout, idle_s: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._chunks = chunks
        self._deadline = deadline
        self._idle_s = idle_s
        self._loop = loop
        self.failed: BaseException | None = None
        self.answered: bool | None = None  # None: no answer yet; True: stop the upload; False: go on

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        deadline = self._deadline
        try:
            async for chunk in self._chunks:
                answered = self.answered
                if answered is None:
                    deadline.reschedule(self._loop.time() + self._idle_s)
                elif answered:
                    await self._loop.create_future()  # never done: the writer is cancelled with the response
                yield chunk
        except BaseException as exc:
            self.failed = exc
            raise
        if self.answered is None:
            deadline.reschedule(None)  # all sent: aiohttp's sock_read now times the response headers


async def _read_body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    content = response.content
    try:
        while chunk := await content.readany():
            yield chunk
    except aiohttp.SocketTimeoutError:
        response.close()
        raise UpstreamTimeout("upstream body: no data in time", phase="body") from None
    except (aiohttp.ClientError, OSError) as exc:
        response.close()
        raise UpstreamProtocolError(f"upstream body: {type(exc).__name__}: {exc}") from None
    response.release()


class _AiohttpWebSocket:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.subprotocol: str | None = ws.protocol
        self._reason = ""

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            await self._ws.send_str(data)
        else:
            await self._ws.send_bytes(data)

    async def receive(self) -> str | bytes | None:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                return str(msg.data)
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                self._reason = str(msg.extra or "")
                return None
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return None

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str:
        return self._reason

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code=code, message=reason.encode())

"""The upstream transport seam: our own small request and response types and the ``Transport`` protocol.

The forwarder hands an ``UpstreamRequest`` (method, target, raw headers, body stream) to a
``Transport`` and gets back an ``UpstreamResponse`` (status, raw headers, raw byte stream). Hooks see
these same types. Three transports ship: ``H1Transport`` (the default: our lean HTTP/1.1 client on
asyncio protocols, about half the CPU per request of aiohttp; upstream WebSockets through an
``AiohttpTransport`` it owns), ``AiohttpTransport`` (opt-in, aiohttp configured for proxying) and
``HttpxTransport`` (opt-in, wraps an ``httpx.AsyncClient`` you pass: HTTP/2, mTLS, custom auth).

A transport raises only ``UpstreamError`` subclasses, and says whether the request may have reached
the backend (``UpstreamError.sent``); the forwarder alone turns them into status codes.

Every transport builds the URL it sends to from parsed parts, never by joining strings: the backend's
scheme, host, port and base path (``upstream_origin``, parsed once per backend) and the request's path
and query (checked by ``sendable_target``). Whatever a target holds, it cannot change the host a request goes to.
"""

from __future__ import annotations

import functools
import re
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from prequal_middleware.core.member_url import pinned_address
from prequal_middleware.exceptions import UpstreamConnectError

if TYPE_CHECKING:
    from prequal_middleware.config import Timeouts

RawHeaders = list[tuple[bytes, bytes]]


# Never in a request line: controls, space (they end or split it) and "#" (a fragment is not sent).
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f#]")


@dataclass(frozen=True, slots=True)
class UpstreamOrigin:
    """A backend URL's parts: where requests go (``scheme``, ``host``, ``port``) and the ``base_path`` they start with.

    ``host`` is a name or an IP literal without brackets; ``base_path`` is percent-encoded with no
    trailing ``/`` (``""`` for none); ``authority`` is the ``Host`` header's value. ``address`` is where
    to connect: ``host``, or for a member DNS discovery pinned to one address (``core.member_url``)
    that address, while ``host`` stays the name for ``Host``, SNI and certificate checks.
    """

    scheme: str
    host: str
    port: int
    base_path: str
    authority: str
    address: str

    @property
    def pinned(self) -> bool:
        return self.address != self.host

    @property
    def websocket_scheme(self) -> str:
        return "wss" if self.scheme == "https" else "ws"


@functools.lru_cache(maxsize=4096)
def upstream_origin(backend: str) -> UpstreamOrigin:
    """Parse a member's URL once (``http://10.0.0.5:8000/base``); ``UpstreamConnectError`` if it is not one."""
    try:
        split = urlsplit(backend)
        port = split.port
    except ValueError as exc:
        raise UpstreamConnectError(f"{backend!r}: {exc}") from None
    if split.scheme not in ("http", "https") or not split.hostname or split.username is not None:
        raise UpstreamConnectError(f"{backend!r}: not an http:// or https:// URL with a host")
    if split.query:
        raise UpstreamConnectError(f"{backend!r}: a backend URL has no query")
    try:
        address = pinned_address(split.fragment)
    except ValueError:
        raise UpstreamConnectError(f"{backend!r}: a backend URL's fragment can only pin an IP address") from None
    default = 443 if split.scheme == "https" else 80
    return UpstreamOrigin(
        scheme=split.scheme,
        host=split.hostname,
        port=port if port is not None else default,
        base_path=split.path.rstrip("/"),
        authority=split.netloc,
        address=split.hostname if address is None else address,
    )


def sendable_target(target: str) -> bool:
    """Whether ``target`` can go on a request line: origin-form, no controls, spaces or ``#``."""
    return target[:1] == "/" and _NOT_IN_TARGET.search(target) is None


class UpstreamRequest:
    """A request about to go to a backend.

    Parameters:
        method: ``GET``, ``POST``, ...
        backend: the backend's URL (``http://10.0.0.5:8000``, maybe with a base path).
        target: the percent-encoded path and query to send (``/users?id=1``), byte-exact.
        headers: raw header pairs, names lower-case, duplicates kept, hop-by-hop ones already removed.
        body: the body as a stream of chunks, or ``None`` for none.
        content_length: the body's length when the client declared it, else ``None`` (chunked).
        tls: the pool's TLS context for an ``https://`` backend (``UpstreamPool.tls``, built once per
            pool); ``None``: the transport's own (the system's CAs). The gateway sets it, after hooks.
    """

    __slots__ = ("method", "backend", "target", "headers", "body", "content_length", "tls")

    def __init__(
        self,
        method: str,
        backend: str,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | None = None,
        content_length: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.method = method
        self.backend = backend
        self.target = target
        self.headers = headers
        self.body = body
        self.content_length = content_length
        self.tls = tls

    def __repr__(self) -> str:
        return f"UpstreamRequest({self.method} {self.backend} {self.target})"


class UpstreamResponse:
    """A backend's response: status and raw headers now, the body as it arrives.

    ``aclose()`` releases the connection: back to the pool after a complete body, closed otherwise
    (which is how a cancelled request is cancelled upstream).

    What the gateway knows of the attempt, for a ``ResponseHook`` (an access log, say), is set before
    the hook runs: ``backend`` (the member's URL), ``attempt`` (1 for the first try, 2 for the first
    retry, ...), ``latency_s`` (request sent to response headers) and ``outcome`` (``success``,
    ``server_error``, ... as the policies count it; the body may still fail while it streams).
    """

    __slots__ = ("status", "headers", "body", "_close", "backend", "attempt", "latency_s", "outcome")

    def __init__(
        self,
        status: int,
        headers: RawHeaders,
        body: AsyncIterator[bytes],
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self._close = close
        self.backend = ""
        self.attempt = 0
        self.latency_s = 0.0
        self.outcome = ""

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()

    def __repr__(self) -> str:
        return f"UpstreamResponse({self.status})"


class WholeBody:
    """A response body that arrived whole with its head: an async iterator of one chunk (none if empty).

    A transport that has the entire body when the headers are in (the HTTP/1.1 engine, for a small
    answer read in one go) hands it over as this, its connection already free; the forwarder then sends
    it in one ASGI message, without iterating. ``take()`` returns what is left and consumes it.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def take(self) -> bytes:
        data, self.data = self.data, b""
        return data

    def __aiter__(self) -> WholeBody:
        return self

    async def __anext__(self) -> bytes:
        if not self.data:
            raise StopAsyncIteration
        return self.take()


class UpstreamWebSocket(Protocol):
    """An open WebSocket to a backend."""

    subprotocol: str | None

    async def send(self, data: str | bytes) -> None: ...

    async def receive(self) -> str | bytes | None:
        """The next message; ``None`` once the backend closed (see ``close_code``)."""

    @property
    def close_code(self) -> int | None: ...

    @property
    def close_reason(self) -> str: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class Transport(Protocol):
    """Sends upstream requests. Implementations raise only ``UpstreamError`` subclasses.

    Every byte a backend sends belongs to one exchange: a transport never hands a response, or header
    fields, that arrived outside the exchange they answer (on an idle connection, after the response's
    end, in its trailers) to a request; it closes that connection instead. The forwarder relays only
    final statuses from 200 to 599. A request's ``tls`` context, when set, is the one its TLS
    connection is made with, and a connection made with one context never serves another's request
    (two pools may trust different CAs or present different client certificates to one backend).
    """

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        """Send ``request``; return once the status and headers arrived (the body streams after)."""

    async def aclose(self) -> None:
        """Close every connection."""


class WebSocketTransport(Transport, Protocol):
    """A transport that can also open WebSockets upstream."""

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
        """Open a WebSocket to ``target`` on ``backend`` (``ws://`` for ``http://``, ``wss://`` for ``https://``),
        over the pool's TLS context ``tls`` when it has one (as ``UpstreamRequest.tls``)."""


PathRewriteHook = Callable[[str], str | Awaitable[str]]
"""Gets the upstream target (path and query, percent-encoded, prefix already stripped); returns the one to send.

Every hook may be a plain function or a coroutine function. A hook that raises gives the client a JSON
502 ``hook_error`` (counted in ``gateway_errors_total{error="hook_error"}``), never a backend's failure."""
RequestHook = Callable[[UpstreamRequest], UpstreamRequest | None | Awaitable[UpstreamRequest | None]]
"""Gets the upstream request before it is sent; may change it in place or return a replacement."""
ResponseHook = Callable[[UpstreamResponse], UpstreamResponse | None | Awaitable[UpstreamResponse | None]]
"""Gets the upstream response before it is streamed back; may change status or headers in place. The
attempt's ``backend``, ``attempt``, ``latency_s`` and ``outcome`` are on the response."""

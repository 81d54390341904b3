"""The upstream transport seam: our own small request and response types and the ``Transport`` protocol.

The forwarder hands an ``UpstreamRequest`` (method, target, raw headers, body stream) to a
``Transport`` and gets back an ``UpstreamResponse`` (status, raw headers, raw byte stream). Hooks see
these same types. Three transports ship: ``AiohttpTransport`` (the default, configured for proxying),
``H1Transport`` (a lean HTTP/1.1 client on asyncio protocols, about half the CPU per request) and
``HttpxTransport`` (wraps an ``httpx.AsyncClient`` you pass: HTTP/2, mTLS, custom auth).

A transport raises only ``UpstreamError`` subclasses, and says whether the request may have reached
the backend (``UpstreamError.sent``); the forwarder alone turns them into status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import Timeouts

RawHeaders = list[tuple[bytes, bytes]]


class UpstreamRequest:
    """A request about to go to a backend.

    Parameters:
        method: ``GET``, ``POST``, ...
        backend: the backend's URL (``http://10.0.0.5:8000``, maybe with a base path).
        target: the percent-encoded path and query to send (``/users?id=1``), byte-exact.
        headers: raw header pairs, names lower-case, duplicates kept, hop-by-hop ones already removed.
        body: the body as a stream of chunks, or ``None`` for none.
        content_length: the body's length when the client declared it, else ``None`` (chunked).
    """

    __slots__ = ("method", "backend", "target", "headers", "body", "content_length")

    def __init__(
        self,
        method: str,
        backend: str,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.method = method
        self.backend = backend
        self.target = target
        self.headers = headers
        self.body = body
        self.content_length = content_length

    @property
    def url(self) -> str:
        return self.backend + self.target

    def __repr__(self) -> str:
        return f"UpstreamRequest({self.method} {self.url})"


class UpstreamResponse:
    """A backend's response: status and raw headers now, the body as it arrives.

    ``aclose()`` releases the connection: back to the pool after a complete body, closed otherwise
    (which is how a cancelled request is cancelled upstream).
    """

    __slots__ = ("status", "headers", "body", "_close")

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

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()

    def __repr__(self) -> str:
        return f"UpstreamResponse({self.status})"


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
    final statuses from 200 to 599.
    """

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        """Send ``request``; return once the status and headers arrived (the body streams after)."""

    async def aclose(self) -> None:
        """Close every connection."""


class WebSocketTransport(Transport, Protocol):
    """A transport that can also open WebSockets upstream."""

    async def connect_websocket(
        self, url: str, headers: RawHeaders, subprotocols: list[str], timeouts: Timeouts
    ) -> UpstreamWebSocket:
        """Open a WebSocket to ``url`` (``ws://`` or ``wss://``)."""


PathRewriteHook = Callable[[str], str]
"""Gets the upstream target (path and query, percent-encoded, prefix already stripped); returns the one to send."""
RequestHook = Callable[[UpstreamRequest], UpstreamRequest | None | Awaitable[UpstreamRequest | None]]
"""Gets the upstream request before it is sent; may change it in place or return a replacement."""
ResponseHook = Callable[[UpstreamResponse], UpstreamResponse | None | Awaitable[UpstreamResponse | None]]
"""Gets the upstream response before it is streamed back; may change status or headers in place."""

"""``HttpxTransport``: the opt-in transport over an ``httpx.AsyncClient`` you configure (HTTP/2, mTLS, auth).

It is the slower path (httpx's own objects cost ~100-200 us per request more than aiohttp here) and
exists for what only httpx offers. The client is used for proxying: its default headers are not sent
(no ``User-Agent``, ``Accept``, ``Accept-Encoding``), its cookie jar keeps nothing, redirects are not
followed and bodies are not decompressed.

    transport = HttpxTransport(httpx.AsyncClient(http2=True, verify="/etc/ca.pem"))
    gateway = Gateway(pools=[...], transport=transport)

Against hostile HTTP/1.1 backends it is the weakest of the three: httpcore drops a connection that
turns readable while idle (a late stray response), and the forwarder refuses a 101 or a status above
599, but a second response sent in the same segment as the first stays in h11's buffer and is served
to the next request on that connection (reaching it takes httpcore's private attributes,
encode/httpcore#872); interim answers other than 100/103 are skipped rather than refused, and an
early error answer arrives only once the whole request body was sent. Use it with backends you trust.

An httpx client has one TLS configuration, so a request with a context of its own (``UpstreamRequest.tls``,
a pool's ``UpstreamTLS``) goes through a client made for that context (``tls_client(context)``, by
default ``httpx.AsyncClient(verify=context)``), one per context, owned and closed by this transport.
Requests without one use your client.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING

import httpx

from prequal_middleware.exceptions import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout, UpstreamTLSError
from prequal_middleware.transports.base import UpstreamRequest, UpstreamResponse, sendable_target, upstream_origin

if TYPE_CHECKING:
    from prequal_middleware.config import Timeouts


class _RejectAll(http.cookiejar.DefaultCookiePolicy):
    """A cookie policy that stores nothing: a gateway must not replay one user's cookies to another."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


class HttpxTransport:
    """Sends upstream requests with an ``httpx.AsyncClient``.

    Parameters:
        client: the client to use. Its base headers, cookies and redirect setting are ignored.
        close_client: close the client in ``aclose()`` (default False: you own it).
        tls_client: makes the client for the requests of a pool with its own TLS context (see the
            module docstring); give one for HTTP/2, limits or proxies on those. Such clients are
            closed by ``aclose()``.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        close_client: bool = False,
        tls_client: Callable[[ssl.SSLContext], httpx.AsyncClient] | None = None,
    ) -> None:
        self.client = client
        self._close_client = close_client
        self._tls_client = tls_client if tls_client is not None else _client_for
        self._tls_clients: dict[ssl.SSLContext, httpx.AsyncClient] = {}
        client.cookies.jar.set_policy(_RejectAll())

    async def aclose(self) -> None:
        clients, self._tls_clients = list(self._tls_clients.values()), {}
        for client in clients:
            await client.aclose()
        if self._close_client:
            await self.client.aclose()

    def _client(self, tls: ssl.SSLContext | None) -> httpx.AsyncClient:
        if tls is None:
            return self.client
        client = self._tls_clients.get(tls)
        if client is None:
            client = self._tls_clients[tls] = self._tls_client(tls)
            client.cookies.jar.set_policy(_RejectAll())
        return client

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        # httpx itself sends a body of unknown length chunked, and one with Content-Length as declared.
        headers = request.headers
        first_wait = timeouts.read_idle_s if request.body is not None else timeouts.response_headers_s
        limits = httpx.Timeout(
            connect=timeouts.connect_s, read=timeouts.read_idle_s, write=timeouts.read_idle_s, pool=timeouts.connect_s
        )
        origin = upstream_origin(request.backend)
        extensions: dict[str, object] = {"timeout": limits.as_dict()}
        if origin.pinned:
            # Connect to the pinned address, present the name: Host (unless the request carries one)
            # and, over TLS, SNI and certificate checks.
            if not any(k == b"host" for k, _ in headers):
                headers = [(b"host", origin.authority.encode("ascii")), *headers]
            extensions["sni_hostname"] = origin.host
        built = httpx.Request(
            request.method,
            _url(request.backend, request.target),
            headers=headers,
            content=_stream(request.body) if request.body is not None else None,
            extensions=extensions,
        )
        try:
            async with asyncio.timeout_at(loop.time() + timeouts.connect_s + first_wait):
                response = await self._client(request.tls).send(built, stream=True, follow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout(f"{request!r}: no response headers in time", phase="headers") from None
        except (httpx.ConnectTimeout, httpx.PoolTimeout):
            raise UpstreamTimeout(f"{request!r}: connect timed out", phase="connect") from None
        except httpx.ConnectError as exc:
            if _tls_failure(exc):
                raise UpstreamTLSError(f"{request!r}: TLS handshake failed: {exc}") from None
            raise UpstreamConnectError(f"{request!r}: cannot connect: {exc}") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"{request!r}: timed out", phase="headers") from None
        except (httpx.HTTPError, OSError) as exc:
            raise UpstreamProtocolError(f"{request!r}: {type(exc).__name__}: {exc}") from None
        return UpstreamResponse(response.status_code, list(response.headers.raw), _body(response), response.aclose)


def _client_for(tls: ssl.SSLContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=tls)


def _tls_failure(exc: BaseException) -> bool:
    """Whether an ssl error is among the causes httpx chained under its ``ConnectError``."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> ssl: a few links, never a loop
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _url(backend: str, target: str) -> httpx.URL:
    """The URL from parsed parts: the backend's scheme, host, port and base path, the target's path and query."""
    origin = upstream_origin(backend)
    if not sendable_target(target):
        raise UpstreamConnectError(f"{backend} {target!r}: not an origin-form request target")
    raw = (origin.base_path + target).encode("latin-1")
    return httpx.URL(scheme=origin.scheme, host=origin.address, port=origin.port, raw_path=raw)


async def _stream(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk


async def _body(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():  # raw: never decompressed
            yield chunk
    except httpx.ReadTimeout:
        raise UpstreamTimeout("upstream body: no data in time", phase="body") from None
    except (httpx.HTTPError, OSError) as exc:
        raise UpstreamProtocolError(f"upstream body: {type(exc).__name__}: {exc}") from None

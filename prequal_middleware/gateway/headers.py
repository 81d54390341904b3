"""Header handling for a proxy: hop-by-hop removal, ``X-Forwarded-*``, request hygiene, ``Location`` rewrite.

Pure functions over raw ASGI header lists (lower-case byte names, duplicates kept in order).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import NamedTuple

from prequal_middleware.core.load_report import REPORT_HEADERS

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the non-standard Proxy-Connection: these describe one connection and
# never travel through a proxy. Headers named in Connection join them per message.
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
# Replaced by the gateway rather than passed on: the upstream Host is the backend's (unless
# preserved), X-Forwarded-For is appended to, Proto and Host are set; Expect was already answered
# by the server in front of us.
_REPLACED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"expect"})
_SCHEME_OF = {"http": b"http", "https": b"https", "ws": b"http", "wss": b"https"}
_PROTOCOL_OF = {"1.1": b"1.1", "1.0": b"1.0", "2": b"2", "3": b"3"}

VIA_PSEUDONYM: bytes = b"prequal-" + secrets.token_hex(6).encode("ascii")
"""This process's name in ``Via`` (RFC 9110 section 7.6.3): random, made when the module is imported
(a gateway worker's start), so it says nothing about the host. A request whose ``Via`` already names it
has been through this gateway: a loop (``RequestHeaders.looped``)."""


class RequestHeaders(NamedTuple):
    """What ``upstream_request_headers`` found and built."""

    headers: RawHeaders
    content_length: int | None  # declared body length; None when absent
    chunked: bool  # the client sent Transfer-Encoding (a body of unknown length)
    problem: str | None  # why the request must be refused (400), or None
    looped: bool = False  # the request's Via names ``via``: it already passed through this gateway


def connection_tokens(headers: RawHeaders) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (lower-case)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def upstream_request_headers(
    headers: RawHeaders,
    *,
    client_ip: str | None,
    scheme: str,
    preserve_host: bool,
    keep: frozenset[bytes] = frozenset(),
    via: bytes | None = None,
    http_version: str = "1.1",
) -> RequestHeaders:
    """The headers to send upstream for a client request.

    Hop-by-hop headers and those named in ``Connection`` are dropped (except names in ``keep``, used
    for WebSocket upgrades); ``X-Forwarded-For`` gets the client's address appended; ``X-Forwarded-Proto``
    and ``X-Forwarded-Host`` are set; ``Host`` is kept only with ``preserve_host``. A request with both
    ``Content-Length`` and ``Transfer-Encoding``, or with conflicting ``Content-Length`` values, is
    reported as a problem rather than forwarded ambiguously (request smuggling).

    With ``via`` (a pseudonym, see ``VIA_PSEUDONYM``), ``Via: <http_version> <via>`` is appended to the
    ``Via`` entries the request came with, and ``looped`` says whether one of them was already ours.
    """
    named = connection_tokens(headers) - keep
    out: RawHeaders = []
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    lengths: set[bytes] = set()
    chunked = False
    looped = False
    for name, value in headers:
        if name in _REPLACED:
            if name == b"host":
                host = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        if name == b"content-length":
            lengths.add(value.strip())
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"via" and via is not None and via in value:
            looped = looped or names_in_via(value, via)
        if (name in HOP_BY_HOP and name not in keep) or name in named:
            continue
        out.append((name, value))
    problem: str | None = None
    content_length: int | None = None
    if len(lengths) > 1:
        problem = "conflicting Content-Length headers"
    elif lengths:
        raw = next(iter(lengths))
        if not raw.isdigit():
            problem = "invalid Content-Length header"
        else:
            content_length = int(raw)
        if chunked:
            problem = "both Content-Length and Transfer-Encoding"
    if preserve_host and host is not None:
        out.append((b"host", host))
    if client_ip:
        forwarded_for.append(client_ip.encode("latin-1"))
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", _SCHEME_OF.get(scheme, b"http")))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    if via is not None:
        out.append((b"via", _PROTOCOL_OF.get(http_version, b"1.1") + b" " + via))
    return RequestHeaders(out, content_length, chunked, problem, looped)


def names_in_via(value: bytes, pseudonym: bytes) -> bool:
    """Whether an entry of a ``Via`` value (``1.1 name (comment), HTTP/2 other``) was received by ``pseudonym``."""
    for entry in value.split(b","):
        parts = entry.split(None, 2)
        if len(parts) >= 2 and parts[1] == pseudonym:
            return True
    return False


# Hop-by-hop, and the backend's load report: it is for the gateway (``core.load_report``), not the client.
_NOT_DOWNSTREAM = HOP_BY_HOP | REPORT_HEADERS


def downstream_response_headers(headers: RawHeaders, location: Callable[[bytes], bytes] | None = None) -> RawHeaders:
    """The upstream response's headers minus hop-by-hop ones and the load report, ``Location`` through ``location``."""
    named = connection_tokens(headers)
    out: RawHeaders = []
    for name, value in headers:
        name = name.lower()
        if name in _NOT_DOWNSTREAM or name in named:
            continue
        if name == b"location" and location is not None:
            value = location(value)
        out.append((name, value))
    return out


def rewrite_location(value: bytes, backend: bytes, prefix: bytes = b"") -> bytes:
    """``backend/rest`` -> ``prefix/rest``, a relative reference (RFC 9110 section 10.2.2); anything else unchanged.

    As NGINX's ``proxy_redirect default``, an absolute ``Location`` pointing at the backend (scheme and
    host matched case-insensitively) is turned into the same place under the gateway's prefix, but
    without a scheme or host: the client resolves it against the URL it asked for, so no part of the
    result comes from the request (a client's ``Host`` is never echoed into a redirect, which would
    otherwise let a forged ``Host`` poison cached redirects). ``prefix`` is the raw prefix the pool
    strips (``b""`` when none), without a trailing slash; so is ``backend``.

    A result that would read as a network-path reference (``//host`` or ``/\\host``, which browsers
    resolve to another host) is not produced: such a ``Location`` is left as the backend sent it.
    """
    n = len(backend)
    if len(value) < n or value[:n].lower() != backend.lower():
        return value
    rest = value[n:]
    if rest and rest[:1] not in (b"/", b"?", b"#"):
        return value  # http://backend:80001 is not under http://backend:8000
    if prefix:
        return prefix + rest
    if rest[:1] != b"/":
        return b"/" + rest
    if rest[1:2] in (b"/", b"\\"):
        return value
    return rest

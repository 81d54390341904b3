"""Configuration: frozen keyword-only dataclasses, validated on construction.

A wrong value raises ``ConfigurationError`` (a ``ValueError``) whose message names the setting::

    UpstreamPool("/api", upstreams=["http://10.0.0.5:8000"], timeouts=Timeouts(connect_s=0.5))
    UpstreamPool("api")   # ConfigurationError: UpstreamPool.prefix must start with '/', got 'api'

Pools and routes are separate things, as Envoy's clusters and routes are. A *pool* (``UpstreamPool``)
is a set of backends with its policy and its signal: membership, Prequal's probe state, outliers,
health, concurrency limits, retry budget. A *route* (``Route``) is a path prefix and how requests
under it are sent (prefix stripping, path rewrite, ``Host``, timeouts, hooks, request limits,
WebSockets on or off); it names the pool that serves it. Several routes may name one pool, and then
share everything the pool owns: ``/v1`` and ``/v2`` served by one fleet are one membership, one
Prequal state, one in-flight count::

    Gateway(
        pools=[UpstreamPool(name="users", upstreams=["http://10.0.0.5:8000"])],
        routes=[Route("/v1", pool="users"), Route("/v2", pool="users", strip_prefix=False)],
    )

``UpstreamPool("/api", ...)`` is the short spelling of a pool named ``"/api"`` plus one route ``/api``
to it: the pool's route-level settings are that route's. They are also the defaults of every other
route naming the pool; a route setting left at ``None`` takes the pool's.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from os import PathLike
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prequal_middleware.core import OutlierSettings, Policy, PrequalSettings
from prequal_middleware.core.load_report import DEFAULT_PROBE_PATH
from prequal_middleware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from prequal_middleware.transports.base import PathRewriteHook, RequestHook, ResponseHook

PolicySpec = str | Callable[[], Policy]
"""A built-in policy name (``"prequal"``), or a zero-argument callable (a class) returning a fresh policy."""

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_ON_STATUS = frozenset({502, 503, 504})


def _check(owner: object, checks: Sequence[tuple[str, bool, str]]) -> None:
    cls = type(owner).__name__
    for name, ok, expected in checks:
        if not ok:
            raise ConfigurationError(f"{cls}.{name} must be {expected}, got {getattr(owner, name)!r}")


def _positive(x: float) -> bool:
    return isinstance(x, (int, float)) and 0 < x < math.inf


def _statuses_5xx(statuses: object) -> bool:
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, (frozenset, set, list, tuple)):
        return False
    return all(type(s) is int and 500 <= s <= 599 for s in statuses)


def _optional_count(x: int | None) -> bool:
    return x is None or (isinstance(x, int) and x >= 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeouts:
    """Upstream timeouts, in seconds.

    Parameters:
        connect_s: to open a connection (a timeout here means nothing was sent: retried elsewhere).
        response_headers_s: from sending the request to the response's status and headers.
        read_idle_s: the longest gap between two body chunks, either way (a stream may last longer).
    """

    connect_s: float = 2.0
    response_headers_s: float = 60.0
    read_idle_s: float = 60.0

    def __post_init__(self) -> None:
        _check(
            self,
            [
                ("connect_s", _positive(self.connect_s), "a finite number > 0"),
                ("response_headers_s", _positive(self.response_headers_s), "a finite number > 0"),
                ("read_idle_s", _positive(self.read_idle_s), "a finite number > 0"),
            ],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeSettings:
    """How the gateway sends Prequal probes.

    Parameters:
        path: the backend path ``LoadReportingMiddleware`` answers probes on.
        timeout_s: a probe that takes longer is dropped (and counts as a failure). Loopback probes take
            well under a millisecond; 50 ms leaves room for a busy Python event loop.
        max_in_flight: probes in flight per pool; beyond it a probe is skipped, not queued (a queued
            probe is stale on arrival).
    """

    path: str = DEFAULT_PROBE_PATH
    timeout_s: float = 0.05
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        _check(
            self,
            [
                ("path", isinstance(self.path, str) and self.path.startswith("/"), "a path starting with '/'"),
                ("timeout_s", _positive(self.timeout_s), "a finite number > 0"),
                ("max_in_flight", isinstance(self.max_in_flight, int) and self.max_in_flight >= 1, "an integer >= 1"),
            ],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthSettings:
    """Active health checks: ``GET path`` on every member every ``interval_s``.

    A member turns unhealthy after ``fall`` failed checks in a row (a non-2xx status, an error, or no
    answer within ``timeout_s``) and healthy again after ``rise`` good ones. ``path=None`` disables
    active checks (passive outlier detection still applies). The backends' ``LoadReportingMiddleware``
    leaves ``/healthz`` out of their load by default; a gateway checking another path must list it in
    their ``excluded_paths``, or its checks count as requests in flight and latency samples.
    """

    path: str | None = "/healthz"
    interval_s: float = 5.0
    timeout_s: float = 2.0
    rise: int = 2
    fall: int = 3

    def __post_init__(self) -> None:
        _check(
            self,
            [
                (
                    "path",
                    self.path is None or (isinstance(self.path, str) and self.path.startswith("/")),
                    "None or a path starting with '/'",
                ),
                ("interval_s", _positive(self.interval_s), "a finite number > 0"),
                ("timeout_s", _positive(self.timeout_s), "a finite number > 0"),
                ("rise", isinstance(self.rise, int) and self.rise >= 1, "an integer >= 1"),
                ("fall", isinstance(self.fall, int) and self.fall >= 1, "an integer >= 1"),
            ],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrySettings:
    """When a failed upstream attempt is tried again, always on a different backend.

    A request that never reached its backend (connection refused, connect timeout) is retried for any
    method. One that was sent and then failed before any response byte is retried only for
    ``idempotent_methods``. Nothing is retried once a response byte went to the client, or when the
    request body was already partly streamed upstream. Retries draw on a budget: ``budget_ratio`` of
    recent requests plus ``budget_min_per_s`` per second (Linkerd's retry budget), so a failing fleet
    is not hit with a retry storm.

    A backend's *answer* with a status in ``retry_on_status`` is retried too, under the same rules as a
    sent request (an idempotent method, a replayable body, nothing relayed yet, attempts and budget
    left) and only when another backend can be chosen; its answer is then closed unread. Otherwise the
    client gets the last backend's answer as it came. The default, 502/503/504, differs from NGINX and
    Envoy (opt-in): in a pool of replicas these say "this replica cannot serve it now", and a replica
    failing fast looks idle to load-aware policies (a sinkhole); 500 is left out (usually the request's
    own fault, the same on every replica). ``frozenset()`` relays every answer.

    Parameters:
        attempts: the most attempts per request, the first included (1 disables retries).
        idempotent_methods: methods safe to resend after they may have reached a backend.
        budget_ratio: retries allowed per request, on average over ``budget_window_s``.
        budget_min_per_s: retries always allowed per second, whatever the traffic.
        budget_window_s: the window the budget is counted over.
        retry_on_status: backend answers (500-599) retried on another backend; see above.
    """

    attempts: int = 3
    idempotent_methods: frozenset[str] = IDEMPOTENT_METHODS
    budget_ratio: float = 0.2
    budget_min_per_s: float = 10.0
    budget_window_s: float = 10.0
    retry_on_status: frozenset[int] = RETRY_ON_STATUS

    def __post_init__(self) -> None:
        _check(
            self,
            [
                ("attempts", isinstance(self.attempts, int) and self.attempts >= 1, "an integer >= 1"),
                ("budget_ratio", 0 <= self.budget_ratio < math.inf, "a finite number >= 0"),
                ("budget_min_per_s", 0 <= self.budget_min_per_s < math.inf, "a finite number >= 0"),
                ("budget_window_s", _positive(self.budget_window_s), "a finite number > 0"),
                ("retry_on_status", _statuses_5xx(self.retry_on_status), "a set of 5xx statuses (500-599)"),
            ],
        )
        # A list or set given in Python is kept as a frozenset: hashable, as the dataclass is frozen.
        object.__setattr__(self, "retry_on_status", frozenset(self.retry_on_status))


@dataclass(frozen=True, kw_only=True, slots=True)
class AdminSettings:
    """The admin routes: who may register, what, and how long a lease lasts.

    Admin writes (register, heartbeat, unregister) need the bearer ``token``. Without one they are
    refused, unless ``trust_loopback`` lets loopback clients write without it: for one host with no
    proxy in front of the gateway. Loopback trust cannot tell a local client from an outside one that
    a same-host proxy forwards without saying so, which is why it is not the default (docs/security.md).

    Parameters:
        token: the bearer token admin writes need (at least 8 characters).
        trust_loopback: without a token, accept writes from loopback clients, and only those that
            carry no proxy header (``X-Forwarded-For``, ``Forwarded``, ...), no ``Origin`` (browsers
            send it; CSRF) and a ``Host`` that is ``localhost``, a loopback address or one of
            ``allowed_hosts`` (DNS rebinding).
        allowed_hosts: ``Host`` names admin writes may carry under loopback trust, besides
            ``localhost`` and loopback addresses.
        allowed_upstreams: hosts registered URLs may point at (names, ``*.suffix``, IP networks such as
            ``10.0.0.0/8``); empty allows any host.
        max_body_bytes: the largest admin request body (413 beyond).
        default_ttl_s: a registration's lease when it names none; heartbeats renew it.
        max_ttl_s: the longest lease a registration may ask for.
        max_metadata_bytes: the largest ``metadata`` object, JSON-encoded.
        max_members_per_pool: registrations beyond this many members in a pool are refused (409).
        max_writes_per_s: admin writes accepted per second on average, in bursts of up to twice as
            many (429 with ``Retry-After`` beyond), so a registration storm cannot churn the pools.
        ready_while_stale_s: ``/readyz`` stays ready while a shared registry has been unreachable for
            less than this (the gateway serves its last snapshot meanwhile); staleness shows in
            ``/backends`` and ``prequal_registry_stale_seconds`` at once.
    """

    token: str | None = None
    trust_loopback: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_upstreams: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024
    default_ttl_s: float = 30.0
    max_ttl_s: float = 3600.0
    max_metadata_bytes: int = 4096
    max_members_per_pool: int = 1000
    max_writes_per_s: float = 50.0
    ready_while_stale_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.allowed_upstreams, str):
            raise ConfigurationError(
                "AdminSettings.allowed_upstreams must be a list of hosts or networks, not a string"
            )
        if isinstance(self.allowed_hosts, str):
            raise ConfigurationError("AdminSettings.allowed_hosts must be a list of host names, not a string")
        object.__setattr__(self, "allowed_upstreams", tuple(self.allowed_upstreams))
        object.__setattr__(
            self, "allowed_hosts", tuple(h.lower() if isinstance(h, str) else h for h in self.allowed_hosts)
        )
        _check(
            self,
            [
                (
                    "token",
                    self.token is None or (isinstance(self.token, str) and len(self.token) >= 8),
                    "None or a string of at least 8 characters",
                ),
                ("trust_loopback", isinstance(self.trust_loopback, bool), "True or False"),
                (
                    "allowed_hosts",
                    all(isinstance(h, str) and h and _HOST_NAME.fullmatch(h) for h in self.allowed_hosts),
                    "host names (letters, digits, '-' and '.')",
                ),
                (
                    "max_body_bytes",
                    isinstance(self.max_body_bytes, int) and self.max_body_bytes >= 256,
                    "an integer >= 256",
                ),
                ("default_ttl_s", _positive(self.default_ttl_s), "a finite number > 0"),
                (
                    "max_ttl_s",
                    _positive(self.max_ttl_s) and self.max_ttl_s >= self.default_ttl_s,
                    "finite and >= default_ttl_s",
                ),
                (
                    "max_metadata_bytes",
                    isinstance(self.max_metadata_bytes, int) and self.max_metadata_bytes >= 2,
                    "an integer >= 2",
                ),
                (
                    "max_members_per_pool",
                    isinstance(self.max_members_per_pool, int) and self.max_members_per_pool >= 1,
                    "an integer >= 1",
                ),
                ("max_writes_per_s", _positive(self.max_writes_per_s), "a finite number > 0"),
                (
                    "ready_while_stale_s",
                    not isinstance(self.ready_while_stale_s, bool)
                    and isinstance(self.ready_while_stale_s, (int, float))
                    and 0 <= self.ready_while_stale_s < math.inf,
                    "a finite number >= 0",
                ),
            ],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestLimits:
    """Limits on client requests, checked before anything goes upstream.

    A slow client must not hold a backend's connection: up to ``buffer_body_bytes`` of every request
    body is read before a backend is chosen (NGINX's request buffering), so a body that fits, declared
    or chunked, reaches the backend whole and at once; only what goes beyond is streamed. The whole
    body must arrive within ``body_timeout_s`` plus one second per ``body_min_rate_bytes_per_s`` bytes
    received (Apache's ``RequestReadTimeout body=20,MinRate=500``), buffered or streamed; a slower
    client gets 408 ``body_timeout``, and an upstream attempt it was feeding is cancelled (not counted
    against the backend).

    Parameters:
        max_headers: the most request headers (431 beyond).
        max_header_bytes: the most bytes of header names and values together (431 beyond).
        max_body_bytes: the largest request body, declared or streamed (413 beyond); None: no limit.
        buffer_body_bytes: read this much of a body before choosing a backend (0: stream at once, for
            clients that wait for an answer before sending the rest).
        body_timeout_s: the time a body has to arrive, before its rate allowance.
        body_min_rate_bytes_per_s: each this many bytes received extends the body's time by a second
            (None: no rate floor, ``body_timeout_s`` is the whole body's deadline).
    """

    max_headers: int = 100
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int | None = None
    buffer_body_bytes: int = 64 * 1024
    body_timeout_s: float = 20.0
    body_min_rate_bytes_per_s: float | None = 500.0

    def __post_init__(self) -> None:
        _check(
            self,
            [
                ("max_headers", isinstance(self.max_headers, int) and self.max_headers >= 1, "an integer >= 1"),
                (
                    "max_header_bytes",
                    isinstance(self.max_header_bytes, int) and self.max_header_bytes >= 256,
                    "an integer >= 256",
                ),
                (
                    "max_body_bytes",
                    self.max_body_bytes is None or (isinstance(self.max_body_bytes, int) and self.max_body_bytes >= 0),
                    "None or an integer >= 0",
                ),
                (
                    "buffer_body_bytes",
                    isinstance(self.buffer_body_bytes, int) and 0 <= self.buffer_body_bytes <= 64 * 1024 * 1024,
                    "an integer from 0 to 64 MiB",
                ),
                ("body_timeout_s", _positive(self.body_timeout_s), "a finite number > 0"),
                (
                    "body_min_rate_bytes_per_s",
                    self.body_min_rate_bytes_per_s is None or _positive(self.body_min_rate_bytes_per_s),
                    "None or a finite number > 0",
                ),
            ],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class AccessLogSettings:
    """The gateway's access log: one line per proxied request (HTTP and WebSocket), off unless given.

    Written at INFO through the stdlib logger named ``logger``, so the operator routes it (a handler and
    a ``%(message)s`` formatter). The fields and their order are in ``gateway.access_log``.

    Parameters:
        format: ``"json"`` (one object per line) or ``"plain"`` (space-separated, a fixed field order).
        logger: the logger's name.
        max_path_chars: the path is cut beyond this many characters (after escaping), so a hostile
            client's 64 KiB target costs the log a bounded line.
    """

    format: str = "json"
    logger: str = "prequal_middleware.access"
    max_path_chars: int = 1024

    def __post_init__(self) -> None:
        _check(
            self,
            [
                ("format", self.format in ("json", "plain"), '"json" or "plain"'),
                ("logger", isinstance(self.logger, str) and bool(self.logger), "a logger name"),
                (
                    "max_path_chars",
                    isinstance(self.max_path_chars, int) and self.max_path_chars >= 16,
                    "an integer >= 16",
                ),
            ],
        )


TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True, kw_only=True, slots=True)
class UpstreamTLS:
    """How a pool's ``https://`` members are reached over TLS: whom to trust, what to present.

    One ``ssl.SSLContext`` is built from it per pool (``transports.tls``) and used for that pool's
    requests, probes, health checks and WebSockets, whatever the transport. Files are read here, so a
    missing or unreadable file, a bad PEM or a key that does not match its certificate fails when the
    settings are made, naming the field, not at the first request. ``http://`` members ignore it.

    Parameters:
        ca_file: a PEM bundle of the CAs to trust *instead of* the system's (a private CA). None: the
            system's CA store.
        cert_file: a PEM client certificate (chain) to present, for backends that require one (mTLS).
        key_file: its private key (PEM, unencrypted); None when ``cert_file`` holds the key too.
        server_name: the name sent in SNI and checked against the backend's certificate, instead of
            the member's host (or, for a DNS-pinned member, the name it was resolved from).
        verify: check the backend's certificate and name (the default). ``False`` accepts *any*
            certificate: anyone on the path can then read and change the traffic, credentials
            included. Only for a test bench; never in production.
        min_version: the lowest TLS version accepted, ``"TLSv1.2"`` or ``"TLSv1.3"`` (None: Python's
            default, TLS 1.2).
    """

    ca_file: str | PathLike[str] | None = None
    cert_file: str | PathLike[str] | None = None
    key_file: str | PathLike[str] | None = None
    server_name: str | None = None
    verify: bool = True
    min_version: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (str, PathLike)) or not os.fspath(value):
                raise ConfigurationError(f"UpstreamTLS.{name} must be a file path, got {value!r}")
            if not os.path.isfile(value):
                raise ConfigurationError(f"UpstreamTLS.{name} must name an existing file, got {os.fspath(value)!r}")
        server_name = self.server_name
        if server_name is not None:
            if isinstance(server_name, str):
                server_name = server_name.lower().removesuffix(".")
                object.__setattr__(self, "server_name", server_name)
            _check(
                self,
                [
                    (
                        "server_name",
                        isinstance(server_name, str) and _HOST_NAME.fullmatch(server_name) is not None,
                        "None or a host name (letters, digits, '-' and '.')",
                    )
                ],
            )
        _check(
            self,
            [
                ("verify", isinstance(self.verify, bool), "True or False"),
                (
                    "min_version",
                    self.min_version is None or self.min_version in TLS_VERSIONS,
                    "None, " + " or ".join(repr(v) for v in TLS_VERSIONS),
                ),
                ("key_file", self.key_file is None or self.cert_file is not None, "None unless cert_file is set"),
                # A CA file with verification off would look configured and protect nothing.
                ("ca_file", self.ca_file is None or self.verify, "None when verify is False"),
            ],
        )
        # Loaded once now, by the one builder the gateway uses at startup: what passes here loads there.
        from prequal_middleware.transports.tls import client_context

        client_context(self)


def valid_prefix(prefix: object) -> bool:
    """A route prefix: a path starting with ``/``, not ending with ``/`` (unless it is ``/``), no ``?``."""
    return (
        isinstance(prefix, str)
        and prefix.startswith("/")
        and (prefix == "/" or not prefix.endswith("/"))
        and "?" not in prefix
    )


# A pool name: a word (letters, digits, ``.``, ``_``, ``~``, ``-``), or a route prefix for a pool named by
# its prefix. Names go into metric labels, response headers, registry keys and admin query strings.
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,63}")


def valid_pool_name(name: object) -> bool:
    """A pool name: a word of up to 64 letters, digits, ``.``, ``_``, ``~``, ``-``, or a route prefix."""
    if not isinstance(name, str):
        return False
    if name.startswith("/"):
        return valid_prefix(name)
    return _POOL_NAME.fullmatch(name) is not None


_NOT_IN_URLS = frozenset('<>"{}|\\^`')
_SRV_SERVICE = re.compile(r"_[a-z0-9-]{1,63}\._[a-z0-9-]{1,63}\.")
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def validate_upstream_url(url: str, *, field_name: str = "url", allow_srv: bool = False) -> str:
    """Check an upstream URL and return its one canonical spelling.

    http or https, a host, no userinfo, no query or fragment (not even an empty ``?`` or ``#``); an
    optional base path is kept, without a trailing slash and without ``.``/``..`` segments. The
    canonical form has a lower-case scheme and host name, an IPv4 address as four decimal numbers (the
    ``2130706433``, ``0x7f.1`` and ``127.1`` spellings the C resolver also accepts are refused), an IPv6
    address in its compressed form (an IPv4-mapped one is refused: use the IPv4 address), and the
    port as a plain number: two spellings of one backend are one member. With ``allow_srv`` (a pool's
    configured upstreams) the host may be an SRV name, ``_service._proto.name``, with no port.
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"{field_name} must be a non-empty string, got {url!r}")
    if any(ch <= " " or ch >= "\x7f" or ch in _NOT_IN_URLS for ch in url):
        raise ConfigurationError(f"{field_name} must be a plain ASCII URL without spaces or quotes, got {url!r}")
    if "?" in url or "#" in url:
        raise ConfigurationError(f"{field_name} must not have a query or fragment, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{field_name} is not a valid URL ({exc}): {url!r}") from None
    if parts.scheme not in ("http", "https") or not url[: len(parts.scheme) + 3].lower().endswith("://"):
        raise ConfigurationError(f"{field_name} must be an http or https URL, got {url!r}")
    if not parts.hostname:
        raise ConfigurationError(f"{field_name} must name a host, got {url!r}")
    if "@" in parts.netloc:
        raise ConfigurationError(f"{field_name} must not contain credentials (user:password@), got {url!r}")
    if port == 0:
        raise ConfigurationError(f"{field_name} must not use port 0, got {url!r}")
    srv = _SRV_SERVICE.match(parts.hostname.lower())
    if srv is not None and allow_srv:
        # An SRV name (``_http._tcp.api.internal``): DNS gives the ports, so the URL names none.
        if port is not None:
            raise ConfigurationError(
                f"{field_name} is an SRV name (_service._proto.name): it takes no port, got {url!r}"
            )
        host = srv.group(0) + _canonical_host(parts.hostname[srv.end() :], parts.netloc, url, field_name)
    else:
        host = _canonical_host(parts.hostname, parts.netloc, url, field_name)
    path = parts.path.rstrip("/")
    if path and any(segment in (".", "..") for segment in path.split("/")):
        raise ConfigurationError(f"{field_name} must not have '.' or '..' segments in its path, got {url!r}")
    if "%" in path:
        raise ConfigurationError(f"{field_name} must not percent-encode its path, got {url!r}")
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{path}"


def _canonical_host(hostname: str, netloc: str, url: str, field_name: str) -> str:
    """The host as it goes into a canonical URL (``[v6]`` in brackets), or ``ConfigurationError``."""
    if netloc.rpartition("@")[2].startswith("["):
        if "%" in hostname:
            raise ConfigurationError(f"{field_name} must not name an IPv6 zone, got {url!r}")
        try:
            address = ipaddress.IPv6Address(hostname)
        except ValueError:
            raise ConfigurationError(f"{field_name} has an invalid IPv6 address, got {url!r}") from None
        if address.ipv4_mapped is not None:
            raise ConfigurationError(f"{field_name} must write an IPv4-mapped address as IPv4, got {url!r}")
        return f"[{address.compressed}]"
    name = hostname.lower().removesuffix(".")
    if not _HOST_NAME.fullmatch(name) or ".." in name:
        raise ConfigurationError(f"{field_name} must have a host name of letters, digits, '-' and '.', got {url!r}")
    last = name.rpartition(".")[2]
    if last.isdigit() or last.startswith("0x"):
        # No top-level domain is numeric: this is an IPv4 address, and only one spelling of it is accepted.
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ConfigurationError(
                f"{field_name} must write an IPv4 address as four decimal numbers, got {url!r}"
            ) from None
    return name


_ROUTE_HOOKS = ("rewrite_path", "on_request", "on_response")
_ROUTE_SETTINGS = (("timeouts", Timeouts), ("limits", RequestLimits))


@dataclass(frozen=True)
class UpstreamPool:
    """A pool: a set of backends with its policy and its signal, shared by every route to it.

    ``UpstreamPool("/api", upstreams=[...])`` is the short spelling: a pool named ``"/api"`` and one
    route ``/api`` to it. A pool given only a ``name`` serves the ``Route`` objects that name it (see the
    module docstring); it may have both a prefix and a name, and then routes besides its own.

    What the pool owns, shared by all its routes: the members (static ``upstreams`` and registrations,
    which name the pool by ``name``), the policy and its state (Prequal's probe pool, outliers, health),
    ``max_in_flight`` and ``max_in_flight_per_backend``, slow start, ``clients_per_pool``, ``retry``
    (attempts, safe methods and the retry budget: the budget protects the fleet, so it is one per
    fleet, and a route may not retry harder than that budget was sized for), ``max_websockets`` and
    ``retry_after_s``. What a route owns: ``strip_prefix``, ``preserve_host``, ``timeouts``, ``limits``,
    ``websockets`` and the hooks; set here, they are the pool's own route's and the defaults of the
    routes that name the pool.

    Parameters:
        prefix: requests whose path is ``prefix`` or starts with ``prefix + "/"`` go to this pool; the
            longest matching prefix (over every route) wins. ``"/"`` matches everything. ``None``: no
            route of its own; ``Route`` objects name the pool.
        name: what registrations, metrics (the ``pool`` label), error responses (``x-prequal-pool``)
            and the status page call the pool. Default: the prefix, so ``UpstreamPool("/api")`` is the
            pool ``"/api"``. A word of letters, digits, ``.``, ``_``, ``~`` and ``-`` (at most 64), or a
            path prefix. (``dataclasses.replace(pool, prefix=...)`` keeps the name: pass ``name`` too.)
        upstreams: static members (URLs such as ``http://10.0.0.5:8000``, optionally with a base path);
            more can register at run time.
        policy: a built-in name (``prequal``, ``round_robin``, ``random``, ``least_request``,
            ``peak_ewma``, ``least_latency``) or a zero-argument callable returning a fresh ``Policy``.
        strip_prefix: (route) send ``/api/users`` upstream as ``/users`` (true) or unchanged (false).
        preserve_host: (route) send the client's ``Host`` header upstream instead of the backend's.
        timeouts: (route) upstream connect / response headers / idle read timeouts.
        max_in_flight: requests in flight through this pool (per gateway process); beyond it, 503.
        max_in_flight_per_backend: requests in flight to one backend; a backend at its limit is not
            chosen, and when every backend is, 503.
        prequal: Prequal's parameters (for the ``prequal`` policy).
        outliers: passive health (ejection, panic, error aversion).
        probes: how probes are sent.
        health: active health checks.
        retry: when failed attempts are retried, and the pool's retry budget.
        limits: (route) request header and body limits (431 / 413).
        slow_start_s: a member that joins or returns from ejection or ill health ramps up from 10% to a
            full share of the requests chosen for it over this window (0: off).
        clients_per_pool: independent policy instances, each with its own state, taking requests in
            turn: emulates a fleet of clients in one process, as Prequal assumes many clients.
        websockets: (route) proxy WebSocket upgrades on this prefix (else they go to the wrapped app).
        max_websockets: WebSockets open through this pool (per gateway process); one more handshake
            gets 503. An open socket counts only here, not in ``max_in_flight`` or
            ``max_in_flight_per_backend`` (its handshake does), so sockets cannot starve HTTP.
        retry_after_s: the ``Retry-After`` value of the pool's 503 responses.
        rewrite_path / on_request / on_response: (route) hooks (see ``PathRewriteHook`` and friends).
        required_for_ready: whether ``/readyz`` waits for this pool to have a healthy member. ``None``
            (the default): a pool with ``upstreams`` (static or named by DNS) is required, a pool filled
            only by registration is not, since its backends register through a gateway that is ready
            (a readiness-gated load balancer in front of the gateway would otherwise keep them out).
            ``True`` on such a pool makes the gateway wait for its first registration.
        tls: how the pool's ``https://`` members are reached: trusted CAs, a client certificate, the
            name to verify (``UpstreamTLS``). None: the system's CAs and each member's own name.
    """

    prefix: str | None = None
    _: KW_ONLY
    name: str = ""
    upstreams: Sequence[str] = ()
    policy: PolicySpec = "prequal"
    strip_prefix: bool = True
    preserve_host: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_in_flight: int | None = None
    max_in_flight_per_backend: int | None = None
    prequal: PrequalSettings = field(default_factory=PrequalSettings)
    outliers: OutlierSettings = field(default_factory=OutlierSettings)
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    limits: RequestLimits = field(default_factory=RequestLimits)
    slow_start_s: float = 0.0
    clients_per_pool: int = 1
    websockets: bool = True
    max_websockets: int = 1000
    retry_after_s: int = 1
    rewrite_path: PathRewriteHook | None = None
    on_request: RequestHook | None = None
    on_response: ResponseHook | None = None
    required_for_ready: bool | None = None
    tls: UpstreamTLS | None = None

    def __post_init__(self) -> None:
        p = self.prefix
        if p is None and not self.name:
            raise ConfigurationError(
                "UpstreamPool needs a prefix (its own route) or a name (for Route(..., pool=name)), got neither"
            )
        _check(
            self,
            [
                (
                    "prefix",
                    p is None or valid_prefix(p),
                    "a path starting with '/' and not ending with '/' (or '/' itself)",
                ),
            ],
        )
        if not self.name:
            object.__setattr__(self, "name", p)
        _check(
            self,
            [
                (
                    "name",
                    valid_pool_name(self.name),
                    "a word of letters, digits, '.', '_', '~' and '-' (at most 64) or a path prefix",
                ),
                (
                    "policy",
                    isinstance(self.policy, str) or callable(self.policy),
                    "a policy name or a callable returning a Policy",
                ),
                ("max_in_flight", _optional_count(self.max_in_flight), "None or an integer >= 1"),
                (
                    "max_in_flight_per_backend",
                    _optional_count(self.max_in_flight_per_backend),
                    "None or an integer >= 1",
                ),
                (
                    "clients_per_pool",
                    isinstance(self.clients_per_pool, int) and self.clients_per_pool >= 1,
                    "an integer >= 1",
                ),
                ("retry_after_s", isinstance(self.retry_after_s, int) and self.retry_after_s >= 0, "an integer >= 0"),
                (
                    "max_websockets",
                    isinstance(self.max_websockets, int) and self.max_websockets >= 1,
                    "an integer >= 1 (websockets=False turns them off)",
                ),
                (
                    "slow_start_s",
                    isinstance(self.slow_start_s, (int, float)) and 0 <= self.slow_start_s < math.inf,
                    "a finite number >= 0",
                ),
                (
                    "required_for_ready",
                    self.required_for_ready is None or isinstance(self.required_for_ready, bool),
                    "None or a bool",
                ),
            ],
        )
        if isinstance(self.upstreams, str):
            raise ConfigurationError(
                f"UpstreamPool.upstreams must be a list of URLs, got the string {self.upstreams!r}"
            )
        urls = tuple(
            validate_upstream_url(u, field_name=f"UpstreamPool({self.name!r}).upstreams[{i}]", allow_srv=True)
            for i, u in enumerate(self.upstreams)
        )
        object.__setattr__(self, "upstreams", urls)
        if isinstance(self.policy, str):
            from prequal_middleware.core import POLICY_CLASSES

            if self.policy not in POLICY_CLASSES:
                raise ConfigurationError(
                    f"UpstreamPool.policy must be one of {', '.join(sorted(POLICY_CLASSES))} or a callable,"
                    f" got {self.policy!r}"
                )
        for hook in _ROUTE_HOOKS:
            value = getattr(self, hook)
            if value is not None and not callable(value):
                raise ConfigurationError(f"UpstreamPool.{hook} must be a callable or None, got {value!r}")
        for name, cls in (
            ("timeouts", Timeouts),
            ("prequal", PrequalSettings),
            ("outliers", OutlierSettings),
            ("probes", ProbeSettings),
            ("health", HealthSettings),
            ("retry", RetrySettings),
            ("limits", RequestLimits),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ConfigurationError(f"UpstreamPool.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        if self.tls is not None and not isinstance(self.tls, UpstreamTLS):
            raise ConfigurationError(f"UpstreamPool.tls must be None or an UpstreamTLS, got {self.tls!r}")

    def matches(self, path: str) -> bool:
        """True when ``path`` falls under this pool's own prefix (on a path-segment boundary)."""
        return self.prefix is not None and prefix_matches(self.prefix, path)

    def own_route(self) -> Route | None:
        """The route the short spelling declares (the pool's prefix, every setting the pool's), or None."""
        return None if self.prefix is None else Route(self.prefix, pool=self.name)


@dataclass(frozen=True)
class Route:
    """A path prefix and how requests under it are sent to the pool it names.

    Several routes may name one pool: they share its members, its policy's state (Prequal's probes and
    reports from one route's traffic inform selection for the others), its in-flight counts and its
    retry budget. A setting left at ``None`` takes the pool's (``UpstreamPool`` lists them as
    "route" settings); a hook cannot be turned off per route, only replaced.

    Parameters:
        prefix: requests whose path is ``prefix`` or starts with ``prefix + "/"`` take this route; the
            longest matching prefix wins, over every route and every pool's own prefix.
        pool: the name of the ``UpstreamPool`` that serves it.
        strip_prefix: send ``/v1/users`` upstream as ``/users`` (true) or unchanged (false).
        preserve_host: send the client's ``Host`` header upstream instead of the backend's.
        timeouts: upstream connect / response headers / idle read timeouts.
        limits: request header and body limits (431 / 413).
        websockets: proxy WebSocket upgrades on this prefix (else they go to the wrapped app).
        rewrite_path / on_request / on_response: hooks (see ``PathRewriteHook`` and friends).
    """

    prefix: str
    _: KW_ONLY
    pool: str
    strip_prefix: bool | None = None
    preserve_host: bool | None = None
    timeouts: Timeouts | None = None
    limits: RequestLimits | None = None
    websockets: bool | None = None
    rewrite_path: PathRewriteHook | None = None
    on_request: RequestHook | None = None
    on_response: ResponseHook | None = None

    def __post_init__(self) -> None:
        _check(
            self,
            [
                (
                    "prefix",
                    valid_prefix(self.prefix),
                    "a path starting with '/' and not ending with '/' (or '/' itself)",
                ),
                ("pool", valid_pool_name(self.pool), "the name of an UpstreamPool"),
                ("strip_prefix", self.strip_prefix is None or isinstance(self.strip_prefix, bool), "None or a bool"),
                ("preserve_host", self.preserve_host is None or isinstance(self.preserve_host, bool), "None or a bool"),
                ("websockets", self.websockets is None or isinstance(self.websockets, bool), "None or a bool"),
            ],
        )
        for hook in _ROUTE_HOOKS:
            value = getattr(self, hook)
            if value is not None and not callable(value):
                raise ConfigurationError(f"Route.{hook} must be a callable or None, got {value!r}")
        for name, cls in _ROUTE_SETTINGS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ConfigurationError(f"Route.{name} must be None or a {cls.__name__}, got {value!r}")

    def matches(self, path: str) -> bool:
        """True when ``path`` falls under this route's prefix (on a path-segment boundary)."""
        return prefix_matches(self.prefix, path)


def prefix_matches(prefix: str, path: str) -> bool:
    """True when ``path`` is ``prefix`` or continues it with ``/`` (``/`` matches every path)."""
    return prefix == "/" or path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")

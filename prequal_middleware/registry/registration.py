"""Who may register what: authentication and validation of registration requests.

Registration is a gateway's most dangerous surface: whoever registers a URL receives traffic, and the
gateway will call whatever URL it is given. So:

- every admin write needs ``Authorization: Bearer <token>`` (compared in constant time) and a JSON
  body; without a token, writes are refused unless ``AdminSettings.trust_loopback`` accepts them from
  loopback clients, and then a request that carries proxy headers (``X-Forwarded-For``, ``Forwarded``,
  ``X-Real-IP``), an ``Origin`` or a ``Host`` naming another machine is refused (``authorize``);
- URLs must be http or https with a host and an explicit port, no credentials, no query; with an
  allow-list, the host must be listed (a name, a ``*.suffix`` wildcard, or an IP network in CIDR form);
- bodies are checked by the pydantic models of ``schemas`` (strict JSON types, no unknown field);
- every refusal is a ``RegistrationError`` with a status, an error code and the offending field.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prequal_middleware.config import AdminSettings
from prequal_middleware.exceptions import ConfigurationError, RegistrationError

_PROXY_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-forwarded-host"})


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """A validated register / heartbeat / unregister request."""

    pool: str
    url: str
    weight: float = 1.0
    metadata: dict[str, Any] | None = None
    ttl_s: float | None = None


# --- how often -----------------------------------------------------------------------------------


class WriteRate:
    """A token bucket for admin writes: ``rate`` per second on average, bursts of ``2 * rate``. Sans-IO."""

    __slots__ = ("_rate", "_burst", "_tokens", "_at")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._burst = max(1.0, 2.0 * rate)
        self._tokens = self._burst
        self._at: float | None = None

    def take(self, now: float) -> float:
        """Spend one write; return 0.0 when allowed, else the seconds until one will be."""
        if self._at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate


# --- who ----------------------------------------------------------------------------------------


def authorize(settings: AdminSettings, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> None:
    """Raise ``RegistrationError`` (401 / 403 / 415) unless this caller may change the registry.

    A write is a JSON body (``Content-Type: application/json``): a browser cannot send one across
    origins without a CORS preflight we never answer, so a page cannot forge one (CSRF). With a token,
    the bearer token is the whole proof. Without one, writes are refused unless loopback trust is on,
    and then only a loopback client's, carrying no proxy header (a same-host proxy that says so is not
    a loopback client), no ``Origin`` (a browser's request) and a ``Host`` that names this machine (a
    DNS-rebound name is a browser's request too).
    """
    if settings.token is not None:
        expected = b"Bearer " + settings.token.encode("utf-8")
        given = next((v for k, v in headers if k == b"authorization"), b"")
        if not hmac.compare_digest(given, expected):
            raise RegistrationError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")
        _require_json(headers)
        return
    if not settings.trust_loopback:
        raise RegistrationError(
            403,
            "forbidden",
            "admin writes need a bearer token (AdminSettings.token, PREQUAL_REGISTRATION_TOKEN), or loopback "
            "trust (AdminSettings.trust_loopback, PREQUAL_ADMIN_TRUST_LOOPBACK=1) for a gateway no proxy fronts",
        )
    if any(k in _PROXY_HEADERS for k, _ in headers):
        raise RegistrationError(
            403, "forbidden", "registration without a token is accepted only from loopback clients, not through a proxy"
        )
    if client is None or not _is_loopback(client[0]):
        raise RegistrationError(403, "forbidden", "registration without a token is accepted only from loopback clients")
    host: bytes | None = None
    for name, value in headers:
        if name == b"origin":
            raise RegistrationError(
                403, "forbidden", "a request with an Origin header (a browser's) cannot write without a token", "origin"
            )
        if name == b"host":
            if host is not None:
                raise RegistrationError(400, "invalid_header", "more than one Host header", field="host")
            host = value
    if host is None or not _names_this_host(host, settings.allowed_hosts):
        raise RegistrationError(
            403, "forbidden", "without a token, Host must be localhost, a loopback address or an allowed host", "host"
        )
    _require_json(headers)


def _require_json(headers: list[tuple[bytes, bytes]]) -> None:
    values = [v for k, v in headers if k == b"content-type"]
    media = values[0].split(b";", 1)[0].strip().lower() if len(values) == 1 else b""
    if media != b"application/json":
        raise RegistrationError(415, "unsupported_media_type", "Content-Type must be application/json", "content-type")


def _names_this_host(value: bytes, allowed: tuple[str, ...]) -> bool:
    """True when a ``Host`` value (``name[:port]``, ``[v6]:port``) is localhost, a loopback address or allowed."""
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = text.partition(":")
        if colon and not port.isdigit():
            return False
    if name == "localhost" or name in allowed:
        return True
    return _is_loopback(name)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


# --- what ---------------------------------------------------------------------------------------


class AllowList:
    """Hosts a registered URL may point at: names, ``*.suffix`` wildcards and IP networks."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    self.suffixes.append(entry[1:])
                elif "/" in entry or " " in entry:
                    raise ConfigurationError(
                        f"allowed_upstreams entry {entry!r} is neither a host nor a network"
                    ) from None
                else:
                    self.names.add(entry)

    def __bool__(self) -> bool:
        return bool(self.networks or self.names or self.suffixes)

    def names_network_of(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, within: str) -> bool:
        """True when a listed network holds ``address`` and lies inside the network ``within`` itself."""
        special = ipaddress.ip_network(within)
        return any(
            n.version == address.version and address in n and n.subnet_of(special)  # type: ignore[arg-type]
            for n in self.networks
        )

    def allows(self, host: str) -> bool:
        host = host.lower().strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self.names or any(host.endswith(s) for s in self.suffixes)
        return any(address in network for network in self.networks)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RegistrationError(400, "invalid_json", "the body must be a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RegistrationError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise RegistrationError(400, "invalid_json", "the body is nested too deeply") from None
    except ValueError:  # NaN or Infinity: not JSON, and unsafe to store or echo back
        raise RegistrationError(400, "invalid_json", "the body holds a non-finite number") from None
    if not isinstance(body, dict):
        raise RegistrationError(400, "invalid_json", "the body must be a JSON object")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def validate(
    body: dict[str, Any],
    *,
    kind: str,
    pools: list[str],
    settings: AdminSettings,
    allow: AllowList,
    routes: Mapping[str, str] | None = None,
) -> RegistrationRequest:
    """Check a register / heartbeat / unregister body (``schemas``); raise ``RegistrationError`` naming the field.

    ``pool`` names a pool by its name (one of ``pools``); ``routes`` (prefix -> pool name) only makes
    the error for a route's prefix say which pool to name instead.
    """
    # Imported here, not at the top: the gateway imports this module, and pydantic is for admin time.
    from pydantic import ValidationError

    from prequal_middleware.registry.schemas import BODIES, Context, refusal

    context = Context(pools=pools, settings=settings, allow=allow, routes=routes or {})
    try:
        parsed = BODIES[kind].model_validate(body, context=context)
    except ValidationError as exc:
        raise refusal(exc) from None
    fields = parsed.model_dump()
    return RegistrationRequest(
        pool=fields["pool"],
        url=fields["url"],
        weight=fields.get("weight", 1.0),
        metadata=fields.get("metadata"),
        ttl_s=fields.get("ttl_s"),
    )

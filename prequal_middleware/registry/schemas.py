"""The admin API's request bodies as pydantic models: register, heartbeat, unregister.

Strict: JSON types as they are (``"weight": "2"`` and ``"weight": true`` are refused, not converted),
no unknown field, no NaN or Infinity. What depends on the gateway (its pools, the allow-list, the
lease bounds) is checked with the ``context`` ``registration.validate`` passes; without one (a schema
for documentation) only the types are. ``refusal`` turns the first error into the ``RegistrationError``
the client sees: its own words naming the field, never pydantic's text or the input echoed whole.
Admin time only: ``registration.validate`` imports this module when the first body arrives.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

from prequal_middleware.config import AdminSettings, validate_upstream_url
from prequal_middleware.exceptions import ConfigurationError, PrequalError, RegistrationError

if TYPE_CHECKING:
    from prequal_middleware.registry.registration import AllowList

MAX_WEIGHT = 1000.0
MAX_URL_LENGTH = 2048


class _Refused(PrequalError, ValueError):
    """A refusal decided in a validator (a ``ValueError``, so pydantic carries it): its status, error code
    and detail reach the client as they are."""

    def __init__(self, detail: str, *, status: int = 400, error: str = "invalid_field") -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Context:
    """What the checks of a body need to know about the gateway."""

    pools: list[str]
    settings: AdminSettings
    allow: AllowList
    routes: Mapping[str, str]


def _context(info: ValidationInfo) -> Context | None:
    return info.context if isinstance(info.context, Context) else None


# --- the fields -----------------------------------------------------------------------------------


def _url(value: str, info: ValidationInfo) -> str:
    try:
        url = validate_upstream_url(value)
    except ConfigurationError as exc:
        raise _Refused(str(exc)) from None
    parts = urlsplit(url)
    if parts.port is None:
        raise _Refused("url must include a port (http://host:port)")
    context = _context(info)
    if context is None:
        return url
    host = parts.hostname or ""
    if context.allow and not context.allow.allows(host):
        raise _Refused(f"the host {host!r} is not in the allow-list", status=403, error="forbidden_upstream")
    _refuse_special_address(host, context.allow)
    return url


# Addresses a registration may not name unless the allow-list lists a network inside the range itself:
# link-local (cloud metadata services live at 169.254.169.254), unspecified (0.0.0.0 and :: reach this
# host's every interface), multicast and broadcast.
_SPECIAL_RANGES = (
    ("169.254.0.0/16", "a link-local address"),
    ("fe80::/10", "a link-local address"),
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("224.0.0.0/4", "a multicast address"),
    ("ff00::/8", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
)


def _refuse_special_address(host: str, allow: AllowList) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the allow-list is where names are restricted
    for network, what in _SPECIAL_RANGES:
        special = ipaddress.ip_network(network)
        if address.version == special.version and address in special and not allow.names_network_of(address, network):
            raise _Refused(
                f"the host {host!r} is {what}; allow it by listing {network} (or a network inside it) "
                "in allowed_upstreams",
                status=403,
                error="forbidden_upstream",
            )


def _pool(value: str | None, info: ValidationInfo) -> str | None:
    context = _context(info)
    if context is None:
        return value
    pools = context.pools
    if value is None:
        if len(pools) == 1:
            return pools[0]
        raise _Refused(f"pool is required: the gateway has the pools {', '.join(pools)}")
    if value not in pools and value in context.routes:
        raise _Refused(
            f"pool must name a pool, not a route: {value!r} is a route of the pool {context.routes[value]!r}"
        )
    if value not in pools:
        raise _Refused(f"pool must be one of {', '.join(pools) or '(none)'}, got {value!r}")
    return value


def _ttl(value: float | None, info: ValidationInfo) -> float | None:
    context = _context(info)
    if context is None:
        return value
    if value is None:
        return context.settings.default_ttl_s
    if value > context.settings.max_ttl_s:
        raise _Refused(f"ttl_s must be in (0, {context.settings.max_ttl_s:g}], got {value:g}")
    return value


def _metadata(value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    context = _context(info)
    if value is None:
        return {} if context is not None else None
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise _Refused("metadata must be plain, finite JSON") from None
    if context is not None and len(encoded) > context.settings.max_metadata_bytes:
        raise _Refused(f"metadata is larger than {context.settings.max_metadata_bytes} bytes")
    return value


Url = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="the backend: http or https, a host and an explicit port, an optional base path",
        examples=["http://10.0.0.5:8001"],
    ),
    AfterValidator(_url),
]
PoolName = Annotated[
    str | None,
    Field(description="the pool's name (UpstreamPool.name); optional when the gateway has one pool"),
    AfterValidator(_pool),
]
Ttl = Annotated[
    Annotated[float, Field(gt=0)] | None,
    Field(description="the lease in seconds (default AdminSettings.default_ttl_s, at most max_ttl_s)"),
    AfterValidator(_ttl),
]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class UnregisterBody(_Body):
    """``POST /unregister``: the backend drains (no new requests; those in flight finish)."""

    url: Url
    pool: PoolName = Field(default=None, validate_default=True)


class HeartbeatBody(_Body):
    """``POST /heartbeat``: renews the lease of a registered backend."""

    url: Url
    pool: PoolName = Field(default=None, validate_default=True)
    ttl_s: Ttl = Field(default=None, validate_default=True)


class RegisterBody(_Body):
    """``POST /register``: adds a backend to a pool, or updates it in place."""

    url: Url
    pool: PoolName = Field(default=None, validate_default=True)
    weight: Annotated[float, Field(gt=0, le=MAX_WEIGHT, description="its share relative to the others")] = 1.0
    metadata: Annotated[
        dict[str, Any] | None,
        Field(description="a JSON object shown on the status page (AdminSettings.max_metadata_bytes)"),
        AfterValidator(_metadata),
    ] = Field(default=None, validate_default=True)
    ttl_s: Ttl = Field(default=None, validate_default=True)


BODIES: dict[str, type[_Body]] = {"register": RegisterBody, "heartbeat": HeartbeatBody, "unregister": UnregisterBody}

# What a type error says, by pydantic's error type; anything else is "is invalid".
_SAYS = {
    "missing": "is required",
    "string_type": "must be a string",
    "string_too_short": "must be a non-empty string",
    "string_too_long": f"is too long ({MAX_URL_LENGTH} characters at most)",
    "float_type": "must be a finite number",
    "finite_number": "must be a finite number",
    "dict_type": "must be a JSON object",
}


def refusal(exc: ValidationError) -> RegistrationError:
    """The first problem of ``exc`` as the client's ``RegistrationError``; an unknown field comes first."""
    errors = exc.errors(include_url=False, include_input=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    field = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        return RegistrationError(400, "unknown_field", f"unknown field {field!r}", field=field)
    refused = (error.get("ctx") or {}).get("error")
    if error["type"] == "value_error" and isinstance(refused, _Refused):
        return RegistrationError(refused.status, refused.error, refused.detail, field=field)
    ctx = error.get("ctx") or {}
    if error["type"] == "greater_than":
        return RegistrationError(400, "invalid_field", f"{field} must be > {ctx['gt']:g}", field=field)
    if error["type"] == "less_than_equal":
        return RegistrationError(400, "invalid_field", f"{field} must be at most {ctx['le']:g}", field=field)
    return RegistrationError(400, "invalid_field", f"{field} {_SAYS.get(error['type'], 'is invalid')}", field=field)

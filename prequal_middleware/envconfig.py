"""Configuration from ``PREQUAL_*`` environment variables (the seed project's workflow).

- ``PREQUAL_POOLS``: JSON mapping each pool to a list of upstream URLs, or to an object with
  ``upstreams`` and any other ``UpstreamPool`` setting; nested settings (``timeouts``, ``prequal``,
  ``outliers``, ``probes``, ``health``, ``retry``, ``limits``) are objects of their own fields::

      {"/api": ["http://127.0.0.1:8001"], "/search": {"upstreams": [], "policy": "round_robin",
       "timeouts": {"connect_s": 0.5}}}

  A key starting with ``/`` is a prefix: the pool is named by it and serves it (``UpstreamPool(prefix)``).
  Any other key is a pool's name (``UpstreamPool(name=...)``), served by the routes it lists. Either
  may list ``routes``: more prefixes served by the same pool, sharing its members and Prequal state,
  each a prefix or an object of ``Route`` settings (``prefix``, ``strip_prefix``, ``preserve_host``,
  ``websockets``, ``timeouts``, ``limits``; a setting left out is the pool's)::

      {"users": {"upstreams": ["http://127.0.0.1:8001"],
                 "routes": ["/v1", {"prefix": "/v2", "strip_prefix": false}]}}

  Backends register under the pool's name (the key). Unset, the gateway has one pool, ``/api``,
  filled by registration.
- ``PREQUAL_POLICY``: the default policy of every pool: a built-in name or ``module:Class``.
- ``PREQUAL_HEALTH_PATH`` (default ``/healthz``; empty turns active checks off) and ``PREQUAL_PROBE_PATH``
  (default ``/_prequal/probe``): defaults for every pool.
- ``PREQUAL_REGISTRY``: ``memory`` (default), a ``redis://`` or ``rediss://`` URL, or ``module:Class``
  (called with no arguments).
- ``PREQUAL_REGISTRATION_TOKEN``: the bearer token registration needs (none: loopback clients only).
- ``PREQUAL_ALLOWED_UPSTREAMS``: comma-separated hosts, ``*.suffix`` wildcards or networks
  (``10.0.0.0/8``) registered URLs may point at.
- ``PREQUAL_LEASE_TTL_S``: the lease of a registration that names none (default 30).
- ``PREQUAL_DNS`` (on by default), ``PREQUAL_DNS_NAMESERVERS``, ``PREQUAL_DNS_REFRESH_S``: how upstreams
  named by DNS are expanded into one member per address (``DnsSettings``, ``gateway.discovery``).
- ``PREQUAL_TRANSPORT``: ``h1`` (default, ``H1Transport``, our HTTP/1.1 client) or ``aiohttp``
  (``AiohttpTransport``). ``HttpxTransport`` is not offered here: it wraps an ``httpx.AsyncClient`` you
  build yourself, so pass it to ``Gateway(transport=...)`` in code.
- ``PREQUAL_ACCESS_LOG``: ``off`` (default), ``json`` or ``plain`` (``AccessLogSettings(format=...)``).
- ``PREQUAL_REQUEST_ID_HEADER``: the request id header (default ``x-request-id``); empty or ``off``: none.
- ``PREQUAL_TRACING``: a span per proxied request (``Gateway(tracing=True)``, the ``otel`` extra).
- ``PREQUAL_HISTORY_WINDOW_S``, ``PREQUAL_HISTORY_STEP_S``, ``PREQUAL_HISTORY_MAX_BACKENDS``: the status
  page's charts (``HistorySettings``).
- A pool's ``tls`` object in ``PREQUAL_POOLS``: the ``UpstreamTLS`` settings (``ca_file``, ``cert_file``,
  ``key_file``, ``server_name``, ``verify``, ``min_version``); its files are read at validation.
- Hooks, each ``module:function``: ``PREQUAL_REGISTER_HOOK``, ``PREQUAL_UNREGISTER_HOOK`` (called with
  the registry record), ``PREQUAL_PATH_REWRITE_HOOK``, ``PREQUAL_REQUEST_HOOK``, ``PREQUAL_RESPONSE_HOOK``
  (every pool's, unless a pool sets its own).

A bad value raises ``ConfigurationError`` naming the variable and what was expected. The variables are
read by pydantic-settings into ``config_schema.EnvSettings`` and ``PREQUAL_POOLS`` is validated by
``config_schema.PoolSpec``; this module builds the ``config`` dataclasses from them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from prequal_middleware.config import (
    AccessLogSettings,
    AdminSettings,
    HealthSettings,
    ProbeSettings,
    Route,
    UpstreamPool,
)
from prequal_middleware.config_schema import (
    DEFAULT_POOLS,
    OFF,
    POOLS_SCHEMA,
    EnvSettings,
    PoolSpec,
    config_error,
    import_object,
    pools_where,
    variable,
)
from prequal_middleware.core.history import HistorySettings
from prequal_middleware.exceptions import ConfigurationError

__all__ = [
    "DEFAULT_POOLS",
    "dns_from_env",
    "gateway_kwargs_from_env",
    "load_object",
    "policy_from_spec",
    "pools_and_routes_from_env",
    "pools_from_env",
    "registry_from_env",
]

_POOLS = TypeAdapter(POOLS_SCHEMA)


def load_object(spec: str, *, variable: str) -> Any:
    """Import ``module:attribute``; the error names ``variable``."""
    try:
        return import_object(spec)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{variable}: {exc}") from None


def policy_from_spec(spec: str, *, variable: str) -> str | Callable[[], Any]:
    """A built-in policy name stays a name; ``module:Class`` becomes the class."""
    from prequal_middleware.config_schema import Policy

    try:
        policy: str | Callable[[], Any] | None = TypeAdapter(Policy).validate_python(spec)
    except ValidationError as exc:
        raise config_error(exc, lambda loc: variable) from None
    assert policy is not None  # a string is never "no policy"
    return policy


def _read(environ: Mapping[str, str] | None) -> EnvSettings:
    return EnvSettings.read(os.environ if environ is None else environ)


def pools_from_env(environ: Mapping[str, str] | None = None) -> list[UpstreamPool]:
    """The pools described by ``PREQUAL_POOLS`` and the defaults from the other variables."""
    return _pools_and_routes(_read(environ))[0]


def pools_and_routes_from_env(environ: Mapping[str, str] | None = None) -> tuple[list[UpstreamPool], list[Route]]:
    """The pools described by ``PREQUAL_POOLS`` and the routes they list (``routes``), the pools with
    the defaults from the other variables."""
    return _pools_and_routes(_read(environ))


def _pools_and_routes(settings: EnvSettings) -> tuple[list[UpstreamPool], list[Route]]:
    try:
        described = json.loads(settings.pools)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"PREQUAL_POOLS is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(described, dict):
        raise ConfigurationError("PREQUAL_POOLS must be a JSON object mapping prefixes or pool names to pools")
    try:
        specs = _POOLS.validate_python(described)
    except ValidationError as exc:
        raise config_error(exc, pools_where) from None
    defaults: dict[str, Any] = {}
    if settings.policy is not None:
        defaults["policy"] = settings.policy
    for setting, hook in (
        ("rewrite_path", settings.path_rewrite_hook),
        ("on_request", settings.request_hook),
        ("on_response", settings.response_hook),
    ):
        if hook is not None:
            defaults[setting] = hook
    if settings.health_path is not None:
        defaults["health"] = HealthSettings(path=settings.health_path or None)
    if settings.probe_path is not None:
        try:
            defaults["probes"] = ProbeSettings(path=settings.probe_path)
        except ConfigurationError as exc:
            raise ConfigurationError(f"PREQUAL_PROBE_PATH: {exc}") from None
    pools: list[UpstreamPool] = []
    routes: list[Route] = []
    taken = {key: pools_where((key,)) for key in specs if key.startswith("/")}  # so a clash names both places
    for key, spec in specs.items():
        pool, own = _build(key, spec, defaults)
        for i, route in enumerate(own):
            here = pools_where((key, "routes", i))
            if route.prefix in taken:
                raise ConfigurationError(f"{here}: the prefix {route.prefix!r} is taken by {taken[route.prefix]}")
            taken[route.prefix] = here
        pools.append(pool)
        routes.extend(own)
    return pools, routes


def _build(key: str, spec: PoolSpec, defaults: dict[str, Any]) -> tuple[UpstreamPool, list[Route]]:
    """One ``PREQUAL_POOLS`` entry as its pool and the routes it lists."""
    where = pools_where((key,))
    kwargs = {**defaults, **spec.given("routes")}
    if spec.tls is not None:
        kwargs["tls"] = spec.tls.settings()
    try:
        pool = UpstreamPool(key, **kwargs) if key.startswith("/") else UpstreamPool(name=key, **kwargs)
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    routes = []
    for i, route in enumerate(spec.routes):
        try:
            routes.append(Route(route.prefix, pool=pool.name, **route.given("prefix")))
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{pools_where((key, 'routes', i))}: {exc}") from None
    if pool.prefix is None and not routes:
        raise ConfigurationError(
            f"{where}: a prefix must be a path starting with '/'; a key that is not one names a pool,"
            " which then needs routes (a list of prefixes)"
        )
    return pool, routes


# Which variable an AdminSettings or DnsSettings check is about, by the setting its message names.
_ADMIN_VARIABLES = {
    "token": "PREQUAL_REGISTRATION_TOKEN",
    "trust_loopback": "PREQUAL_ADMIN_TRUST_LOOPBACK",
    "allowed_hosts": "PREQUAL_ADMIN_ALLOWED_HOSTS",
    "allowed_upstreams": "PREQUAL_ALLOWED_UPSTREAMS",
    "ready_while_stale_s": "PREQUAL_READY_WHILE_STALE_S",
    "default_ttl_s": "PREQUAL_LEASE_TTL_S",
    "max_ttl_s": "PREQUAL_LEASE_TTL_S",
}
_DNS_VARIABLES = {
    "enabled": "PREQUAL_DNS",
    "nameservers": "PREQUAL_DNS_NAMESERVERS",
    "min_refresh_s": "PREQUAL_DNS_REFRESH_S",
    "max_refresh_s": "PREQUAL_DNS_REFRESH_S",
}


def _named(exc: ValueError, owner: str, variables: dict[str, str]) -> ConfigurationError:
    """``exc`` (a dataclass's check) prefixed with the variable behind the setting it names."""
    found = re.search(rf"{owner}\.(\w+)", str(exc))
    name = variables.get(found.group(1), "") if found else ""
    return ConfigurationError(f"{name or ', '.join(sorted(set(variables.values())))}: {exc}")


def gateway_kwargs_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything ``Gateway(**kwargs)`` needs, from the environment (``Gateway.from_env`` uses it)."""
    env = os.environ if environ is None else environ
    settings = EnvSettings.read(env)
    pools, routes = _pools_and_routes(settings)
    kwargs: dict[str, Any] = {"pools": pools, "routes": routes}
    kwargs["registry"] = _registry(settings, env)
    admin: dict[str, Any] = {
        setting: value
        for setting, value in (
            ("token", settings.registration_token),
            ("trust_loopback", settings.admin_trust_loopback),
            ("allowed_hosts", settings.admin_allowed_hosts),
            ("allowed_upstreams", settings.allowed_upstreams),
            ("ready_while_stale_s", settings.ready_while_stale_s),
            ("default_ttl_s", settings.lease_ttl_s),
        )
        if value is not None
    }
    try:
        kwargs["admin"] = AdminSettings(**admin)
    except ConfigurationError as exc:
        raise _named(exc, "AdminSettings", _ADMIN_VARIABLES) from None
    from prequal_middleware.registry.registration import AllowList

    try:
        AllowList(kwargs["admin"].allowed_upstreams)
    except ConfigurationError as exc:
        raise ConfigurationError(f"PREQUAL_ALLOWED_UPSTREAMS: {exc}") from None
    kwargs["dns"] = _dns(settings)
    if settings.via_pseudonym is not None:
        kwargs["via_pseudonym"] = settings.via_pseudonym
    if settings.transport == "h1":
        from prequal_middleware.transports.http1 import H1Transport

        kwargs["transport"] = H1Transport()
    elif settings.transport == "aiohttp":
        from prequal_middleware.transports.aiohttp import AiohttpTransport

        kwargs["transport"] = AiohttpTransport()
    kwargs.update(_observability(settings))
    history = _history(settings)
    if history is not None:
        kwargs["history"] = history
    if settings.register_hook is not None:
        kwargs["on_register"] = settings.register_hook
    if settings.unregister_hook is not None:
        kwargs["on_unregister"] = settings.unregister_hook
    return kwargs


def _observability(settings: EnvSettings) -> dict[str, Any]:
    """The access log, request id header and tracing the variables ask for (unset: the defaults)."""
    kwargs: dict[str, Any] = {}
    if settings.access_log not in (None, OFF):
        kwargs["access_log"] = AccessLogSettings(format=settings.access_log)
    if settings.request_id_header is not None:
        kwargs["request_id_header"] = None if settings.request_id_header == OFF else settings.request_id_header
    if settings.tracing:
        try:  # what gateway.tracing imports: found missing before serving, not in each worker's startup
            importlib.import_module("opentelemetry.trace")
            importlib.import_module("opentelemetry.propagate")
        except ImportError:
            raise ConfigurationError(
                "PREQUAL_TRACING is on but OpenTelemetry is not installed: pip install 'prequal-middleware[otel]'"
            ) from None
        kwargs["tracing"] = True
    return kwargs


_HISTORY_VARIABLES = {
    "window_s": "PREQUAL_HISTORY_WINDOW_S",
    "step_s": "PREQUAL_HISTORY_STEP_S",
    "max_backends": "PREQUAL_HISTORY_MAX_BACKENDS",
}


def _history(settings: EnvSettings) -> HistorySettings | None:
    """The status page's charts (``PREQUAL_HISTORY_*``); None when no variable is set."""
    given: dict[str, Any] = {
        setting: value
        for setting, value in (
            ("window_s", settings.history_window_s),
            ("step_s", settings.history_step_s),
            ("max_backends", settings.history_max_backends),
        )
        if value is not None
    }
    if not given:
        return None
    try:
        return HistorySettings(**given)
    except ValueError as exc:
        raise _named(exc, "HistorySettings", _HISTORY_VARIABLES) from None


def dns_from_env(env: Mapping[str, str]) -> Any:
    """``DnsSettings`` from ``PREQUAL_DNS`` (on/off), ``PREQUAL_DNS_NAMESERVERS`` (comma-separated
    ``ip`` or ``ip:port``) and ``PREQUAL_DNS_REFRESH_S`` (the longest a DNS answer is kept)."""
    return _dns(EnvSettings.read(env))


def _dns(settings: EnvSettings) -> Any:
    from prequal_middleware.registry.dns import DnsSettings

    given: dict[str, Any] = {}
    if settings.dns is not None:
        given["enabled"] = settings.dns
    if settings.dns_nameservers is not None:
        given["nameservers"] = settings.dns_nameservers
    if settings.dns_refresh_s is not None:
        given["max_refresh_s"] = settings.dns_refresh_s
        given["min_refresh_s"] = min(1.0, settings.dns_refresh_s)
    try:
        return DnsSettings(**given)
    except ConfigurationError as exc:
        raise _named(exc, "DnsSettings", _DNS_VARIABLES) from None


def registry_from_env(env: Mapping[str, str]) -> Any:
    """The registry ``PREQUAL_REGISTRY`` names (unset: ``registry.default`` picks one for the workers)."""
    return _registry(EnvSettings.read(env), env)


def _registry(settings: EnvSettings, env: Mapping[str, str]) -> Any:
    spec = settings.registry
    if spec is None:
        from prequal_middleware.registry.default import default_registry

        return default_registry(env)  # memory for one worker, a shared SQLite file for several
    if spec == "memory":
        from prequal_middleware.registry import MemoryRegistry

        return MemoryRegistry()
    if spec.startswith("sqlite:"):
        from prequal_middleware.registry import SqliteRegistry

        return SqliteRegistry(spec.removeprefix("sqlite:"))
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            from prequal_middleware.registry.redis import RedisRegistry
        except ImportError:
            raise ConfigurationError(
                "PREQUAL_REGISTRY is a Redis URL but redis is not installed: pip install 'prequal-middleware[redis]'"
            ) from None
        return RedisRegistry(spec)
    factory = load_object(spec, variable=variable("registry"))  # module:Class, the schema checked the form
    if not callable(factory):
        raise ConfigurationError(f"PREQUAL_REGISTRY: {spec!r} is not a class or factory")
    return factory()

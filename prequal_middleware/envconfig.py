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
- Hooks, each ``module:function``: ``PREQUAL_REGISTER_HOOK``, ``PREQUAL_UNREGISTER_HOOK`` (called with
  the registry record), ``PREQUAL_PATH_REWRITE_HOOK``, ``PREQUAL_REQUEST_HOOK``, ``PREQUAL_RESPONSE_HOOK``
  (every pool's, unless a pool sets its own).

A bad value raises ``ConfigurationError`` naming the variable and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from prequal_middleware.config import (
    AdminSettings,
    HealthSettings,
    ProbeSettings,
    RequestLimits,
    RetrySettings,
    Route,
    Timeouts,
    UpstreamPool,
)
from prequal_middleware.core import OutlierSettings, PrequalSettings
from prequal_middleware.core.policies import POLICY_CLASSES
from prequal_middleware.exceptions import ConfigurationError

DEFAULT_POOLS = '{"/api": []}'
_NESTED: dict[str, type[Any]] = {
    "timeouts": Timeouts,
    "prequal": PrequalSettings,
    "outliers": OutlierSettings,
    "probes": ProbeSettings,
    "health": HealthSettings,
    "retry": RetrySettings,
    "limits": RequestLimits,
}
_SCALARS = frozenset(
    {
        "policy",
        "strip_prefix",
        "preserve_host",
        "max_in_flight",
        "max_in_flight_per_backend",
        "clients_per_pool",
        "websockets",
        "max_websockets",
        "retry_after_s",
        "slow_start_s",
        "required_for_ready",
    }
)


def load_object(spec: str, *, variable: str) -> Any:
    """Import ``module:attribute``; the error names ``variable``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"{variable} must be 'module:attribute', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{variable}: cannot import module {module_name!r} ({exc})") from None
    try:
        value = module
        for part in attribute.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise ConfigurationError(f"{variable}: module {module_name!r} has no attribute {attribute!r}") from None
    return value


def policy_from_spec(spec: str, *, variable: str) -> str | Callable[[], Any]:
    """A built-in policy name stays a name; ``module:Class`` becomes the class."""
    if spec in POLICY_CLASSES:
        return spec
    if ":" not in spec:
        raise ConfigurationError(
            f"{variable} must be one of {', '.join(sorted(POLICY_CLASSES))} or 'module:Class', got {spec!r}"
        )
    policy = load_object(spec, variable=variable)
    if not callable(policy):
        raise ConfigurationError(f"{variable}: {spec!r} is not a class or factory")
    return policy  # type: ignore[no-any-return]


def pools_from_env(environ: Mapping[str, str] | None = None) -> list[UpstreamPool]:
    """The pools described by ``PREQUAL_POOLS`` and the defaults from the other variables."""
    return pools_and_routes_from_env(environ)[0]


_ROUTE_SCALARS = frozenset({"strip_prefix", "preserve_host", "websockets"})
_ROUTE_NESTED = ("timeouts", "limits")


def pools_and_routes_from_env(environ: Mapping[str, str] | None = None) -> tuple[list[UpstreamPool], list[Route]]:
    """The pools described by ``PREQUAL_POOLS`` and the routes they list (``routes``), the pools with
    the defaults from the other variables."""
    env = os.environ if environ is None else environ
    raw = env.get("PREQUAL_POOLS", DEFAULT_POOLS)
    try:
        described = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"PREQUAL_POOLS is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(described, dict):
        raise ConfigurationError("PREQUAL_POOLS must be a JSON object mapping prefixes or pool names to pools")
    defaults: dict[str, Any] = {}
    if "PREQUAL_POLICY" in env:
        defaults["policy"] = policy_from_spec(env["PREQUAL_POLICY"], variable="PREQUAL_POLICY")
    for variable, setting in _POOL_HOOKS.items():
        if env.get(variable):
            defaults[setting] = _hook(env[variable], variable)
    health_path = env.get("PREQUAL_HEALTH_PATH")
    probe_path = env.get("PREQUAL_PROBE_PATH")
    pools = []
    routes: list[Route] = []
    taken: dict[str, str] = {}  # prefix -> where it was declared, so a clash names both places
    for key in described:
        if isinstance(key, str) and key.startswith("/"):
            taken[key] = f"PREQUAL_POOLS[{key!r}]"
    for key, spec in described.items():
        where = f"PREQUAL_POOLS[{key!r}]"
        if isinstance(spec, list):
            spec = {"upstreams": spec}
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{where} must be a list of URLs or an object, got {spec!r}")
        kwargs: dict[str, Any] = dict(defaults)
        listed: object = []
        for setting, value in spec.items():
            if setting == "routes":
                listed = value
            elif setting == "upstreams":
                if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
                    raise ConfigurationError(f"{where}.upstreams must be a list of URL strings, got {value!r}")
                kwargs["upstreams"] = value
            elif setting == "policy":
                if not isinstance(value, str):
                    raise ConfigurationError(f"{where}.policy must be a string, got {value!r}")
                kwargs["policy"] = policy_from_spec(value, variable=f"{where}.policy")
            elif setting in _SCALARS:
                kwargs[setting] = value
            elif setting in _NESTED:
                kwargs[setting] = _nested(_NESTED[setting], value, f"{where}.{setting}")
            else:
                known = sorted({"upstreams", "routes", *_SCALARS, *_NESTED})
                raise ConfigurationError(f"{where} has an unknown setting {setting!r}; known: {', '.join(known)}")
        if health_path is not None and "health" not in spec:
            kwargs["health"] = HealthSettings(path=health_path or None)
        if probe_path is not None and "probes" not in spec:
            kwargs["probes"] = ProbeSettings(path=probe_path)
        try:
            if isinstance(key, str) and key.startswith("/"):
                pool = UpstreamPool(key, **kwargs)
            else:
                pool = UpstreamPool(name=key, **kwargs)
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        pools.append(pool)
        own = _routes(listed, pool.name, f"{where}.routes")
        for i, route in enumerate(own):
            if route.prefix in taken:
                raise ConfigurationError(
                    f"{where}.routes[{i}]: the prefix {route.prefix!r} is taken by {taken[route.prefix]}"
                )
            taken[route.prefix] = f"{where}.routes[{i}]"
        if pool.prefix is None and not own:
            raise ConfigurationError(
                f"{where}: a prefix must be a path starting with '/'; a key that is not one names a pool,"
                " which then needs routes (a list of prefixes)"
            )
        routes.extend(own)
    return pools, routes


def _routes(listed: object, pool: str, where: str) -> list[Route]:
    """The ``routes`` of one ``PREQUAL_POOLS`` entry: prefixes, or objects of ``Route`` settings."""
    if not isinstance(listed, list):
        raise ConfigurationError(f"{where} must be a list of prefixes or route objects, got {listed!r}")
    routes = []
    for i, item in enumerate(listed):
        here = f"{where}[{i}]"
        spec: dict[str, Any] = {"prefix": item} if isinstance(item, str) else item
        if not isinstance(spec, dict):
            raise ConfigurationError(f"{here} must be a prefix or an object, got {item!r}")
        kwargs: dict[str, Any] = {}
        for setting, value in spec.items():
            if setting == "prefix" or setting in _ROUTE_SCALARS:
                kwargs[setting] = value
            elif setting in _ROUTE_NESTED:
                kwargs[setting] = _nested(_NESTED[setting], value, f"{here}.{setting}")
            else:
                known = sorted({"prefix", *_ROUTE_SCALARS, *_ROUTE_NESTED})
                raise ConfigurationError(f"{here} has an unknown setting {setting!r}; known: {', '.join(known)}")
        if "prefix" not in kwargs:
            raise ConfigurationError(f"{here} needs a prefix")
        prefix = kwargs.pop("prefix")
        try:
            routes.append(Route(prefix, pool=pool, **kwargs))
        except (ConfigurationError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{here}: {exc}") from None
    return routes


_POOL_HOOKS = {
    "PREQUAL_PATH_REWRITE_HOOK": "rewrite_path",
    "PREQUAL_REQUEST_HOOK": "on_request",
    "PREQUAL_RESPONSE_HOOK": "on_response",
}


def _hook(spec: str, variable: str) -> Callable[..., Any]:
    hook = load_object(spec, variable=variable)
    if not callable(hook):
        raise ConfigurationError(f"{variable}: {spec!r} is not callable")
    return hook  # type: ignore[no-any-return]


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(value: str, variable: str) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off; anything else is an error naming it."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigurationError(f"{variable} must be one of 1, true, yes, on, 0, false, no, off; got {value!r}")


def gateway_kwargs_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything ``Gateway(**kwargs)`` needs, from the environment (``Gateway.from_env`` uses it)."""
    env = os.environ if environ is None else environ
    pools, routes = pools_and_routes_from_env(env)
    kwargs: dict[str, Any] = {"pools": pools, "routes": routes}
    kwargs["registry"] = registry_from_env(env)
    admin: dict[str, Any] = {}
    token = env.get("PREQUAL_REGISTRATION_TOKEN")
    if token:
        admin["token"] = token
    trust = env.get("PREQUAL_ADMIN_TRUST_LOOPBACK")
    if trust:
        admin["trust_loopback"] = _flag(trust, "PREQUAL_ADMIN_TRUST_LOOPBACK")
    hosts = env.get("PREQUAL_ADMIN_ALLOWED_HOSTS")
    if hosts:
        admin["allowed_hosts"] = tuple(h.strip() for h in hosts.split(",") if h.strip())
    allowed = env.get("PREQUAL_ALLOWED_UPSTREAMS")
    if allowed:
        admin["allowed_upstreams"] = tuple(a.strip() for a in allowed.split(",") if a.strip())
    stale = env.get("PREQUAL_READY_WHILE_STALE_S")
    if stale:
        try:
            admin["ready_while_stale_s"] = float(stale)
        except ValueError:
            message = f"PREQUAL_READY_WHILE_STALE_S must be a number of seconds, got {stale!r}"
            raise ConfigurationError(message) from None
    ttl = env.get("PREQUAL_LEASE_TTL_S")
    if ttl:
        try:
            admin["default_ttl_s"] = float(ttl)
        except ValueError:
            raise ConfigurationError(f"PREQUAL_LEASE_TTL_S must be a number of seconds, got {ttl!r}") from None
    try:
        kwargs["admin"] = AdminSettings(**admin)
    except ConfigurationError as exc:
        variable = (
            "PREQUAL_REGISTRATION_TOKEN"
            if "token" in str(exc)
            else "PREQUAL_ADMIN_ALLOWED_HOSTS"
            if "allowed_hosts" in str(exc)
            else "PREQUAL_READY_WHILE_STALE_S"
            if "ready_while_stale_s" in str(exc)
            else "PREQUAL_LEASE_TTL_S"
        )
        raise ConfigurationError(f"{variable}: {exc}") from None
    from prequal_middleware.registry.registration import AllowList

    try:
        AllowList(kwargs["admin"].allowed_upstreams)
    except ConfigurationError as exc:
        raise ConfigurationError(f"PREQUAL_ALLOWED_UPSTREAMS: {exc}") from None
    kwargs["dns"] = dns_from_env(env)
    via = env.get("PREQUAL_VIA_PSEUDONYM")
    if via:
        kwargs["via_pseudonym"] = via.strip()
    transport = env.get("PREQUAL_TRANSPORT", "").strip()
    if transport == "h1":
        from prequal_middleware.transports.http1 import H1Transport

        kwargs["transport"] = H1Transport()
    elif transport == "aiohttp":
        from prequal_middleware.transports.aiohttp import AiohttpTransport

        kwargs["transport"] = AiohttpTransport()
    elif transport:
        raise ConfigurationError(f"PREQUAL_TRANSPORT must be 'h1' or 'aiohttp', got {transport!r}")
    for variable, setting in (("PREQUAL_REGISTER_HOOK", "on_register"), ("PREQUAL_UNREGISTER_HOOK", "on_unregister")):
        if env.get(variable):
            kwargs[setting] = _hook(env[variable], variable)
    return kwargs


def dns_from_env(env: Mapping[str, str]) -> Any:
    """``DnsSettings`` from ``PREQUAL_DNS`` (on/off), ``PREQUAL_DNS_NAMESERVERS`` (comma-separated
    ``ip`` or ``ip:port``) and ``PREQUAL_DNS_REFRESH_S`` (the longest a DNS answer is kept)."""
    from prequal_middleware.registry.dns import DnsSettings

    settings: dict[str, Any] = {}
    if env.get("PREQUAL_DNS", "").strip():
        settings["enabled"] = _flag(env["PREQUAL_DNS"], "PREQUAL_DNS")
    servers = env.get("PREQUAL_DNS_NAMESERVERS", "")
    if servers.strip():
        settings["nameservers"] = tuple(s.strip() for s in servers.split(",") if s.strip())
    refresh = env.get("PREQUAL_DNS_REFRESH_S", "").strip()
    if refresh:
        try:
            settings["max_refresh_s"] = float(refresh)
        except ValueError:
            raise ConfigurationError(f"PREQUAL_DNS_REFRESH_S must be a number of seconds, got {refresh!r}") from None
        settings["min_refresh_s"] = min(1.0, settings["max_refresh_s"])
    try:
        return DnsSettings(**settings)
    except ConfigurationError as exc:
        variable = "PREQUAL_DNS_NAMESERVERS" if "nameservers" in str(exc) else "PREQUAL_DNS_REFRESH_S"
        raise ConfigurationError(f"{variable}: {exc}") from None


def registry_from_env(env: Mapping[str, str]) -> Any:
    spec = env.get("PREQUAL_REGISTRY", "").strip()
    if not spec:
        from prequal_middleware.registry.default import default_registry

        return default_registry(env)  # memory for one worker, a shared SQLite file for several
    if spec == "memory":
        from prequal_middleware.registry import MemoryRegistry

        return MemoryRegistry()
    if spec.startswith("sqlite:"):
        from prequal_middleware.registry import SqliteRegistry

        path = spec.removeprefix("sqlite:")
        if not path:
            raise ConfigurationError(
                "PREQUAL_REGISTRY: sqlite: needs a file path, e.g. sqlite:/var/lib/prequal/registry.db"
            )
        return SqliteRegistry(path)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            from prequal_middleware.registry.redis import RedisRegistry
        except ImportError:
            raise ConfigurationError(
                "PREQUAL_REGISTRY is a Redis URL but redis is not installed: pip install 'prequal-middleware[redis]'"
            ) from None
        return RedisRegistry(spec)
    if ":" in spec and "://" not in spec:
        factory = load_object(spec, variable="PREQUAL_REGISTRY")
        if not callable(factory):
            raise ConfigurationError(f"PREQUAL_REGISTRY: {spec!r} is not a class or factory")
        return factory()
    raise ConfigurationError(
        f"PREQUAL_REGISTRY must be 'memory', 'sqlite:PATH', a redis:// URL or 'module:Class', got {spec!r}"
    )


def _nested(cls: type[Any], value: object, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where} must be an object, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigurationError(f"{where} has unknown settings {unknown}; known: {', '.join(sorted(fields))}")
    try:
        return cls(**value)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from None

"""``RouteRuntime``: one route of a running gateway, a prefix and its settings, pointing at its pool.

The gateway matches a request's raw path against its routes (longest prefix first) and hands the
route to the forwarder: the route says how the request is sent (prefix stripping, path rewrite,
``Host``, timeouts, hooks, limits), the pool it points at chooses the backend and keeps the shared
state (members, policies, in-flight counts, retry budget). Several routes may point at one pool.

``route_table`` checks pools and routes against each other and returns every route, each with its
settings resolved: a ``Route`` setting left at ``None`` takes its pool's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from prequal_middleware.config import RequestLimits, Route, Timeouts, UpstreamPool
from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.gateway.pool import PoolRuntime
from prequal_middleware.gateway.request_target import raw_prefix
from prequal_middleware.transports.base import PathRewriteHook, RequestHook, ResponseHook


class RouteRuntime:
    """A route as the request path reads it: plain attributes, every setting resolved.

    Parameters:
        config: the route as configured (the short spelling's route for a pool's own prefix).
        pool: the pool it sends requests to.
        defaults: the pool configuration whose settings fill the route's ``None`` ones; by default
            ``pool.config`` (a reload builds routes for a pool before the pool takes its new configuration).
    """

    __slots__ = (
        "config",
        "pool",
        "prefix",
        "prefix_bytes",
        "strip_prefix",
        "strips",
        "preserve_host",
        "timeouts",
        "limits",
        "websockets",
        "rewrite_path",
        "on_request",
        "on_response",
    )

    def __init__(self, config: Route, pool: PoolRuntime, defaults: UpstreamPool | None = None) -> None:
        if defaults is None:
            defaults = pool.config
        self.config = config
        self.pool = pool
        self.prefix = config.prefix
        self.prefix_bytes = raw_prefix(config.prefix)  # as clients send it: what routing matches and strips
        self.strip_prefix: bool = _pick(config.strip_prefix, defaults.strip_prefix)
        # Whether the prefix comes off the upstream path ("/" has nothing to strip).
        self.strips = self.strip_prefix and config.prefix != "/"
        self.preserve_host: bool = _pick(config.preserve_host, defaults.preserve_host)
        self.timeouts: Timeouts = _pick(config.timeouts, defaults.timeouts)
        self.limits: RequestLimits = _pick(config.limits, defaults.limits)
        self.websockets: bool = _pick(config.websockets, defaults.websockets)
        self.rewrite_path: PathRewriteHook | None = _pick(config.rewrite_path, defaults.rewrite_path)
        self.on_request: RequestHook | None = _pick(config.on_request, defaults.on_request)
        self.on_response: ResponseHook | None = _pick(config.on_response, defaults.on_response)

    def __repr__(self) -> str:
        return f"RouteRuntime({self.prefix!r} -> pool {self.pool.name!r})"


_T = TypeVar("_T")


def _pick(own: _T | None, default: _T) -> _T:
    return default if own is None else own


def route_table(pools: Sequence[UpstreamPool], routes: Sequence[Route]) -> list[Route]:
    """Every route of a gateway: each pool's own route (the short spelling) then ``routes``.

    Raises ``ConfigurationError`` naming the field for: two pools with one name, a route naming no
    pool, two routes with one prefix, a pool no route reaches.
    """
    names: dict[str, int] = {}
    for i, pool in enumerate(pools):
        if not isinstance(pool, UpstreamPool):
            raise ConfigurationError(f"Gateway.pools must hold UpstreamPool objects, got {pool!r}")
        if pool.name in names:
            raise ConfigurationError(
                f"Gateway.pools[{i}].name: the pool name {pool.name!r} is taken by Gateway.pools[{names[pool.name]}]"
            )
        names[pool.name] = i
    if isinstance(routes, Route):
        raise ConfigurationError("Gateway.routes must be a list of Route objects, got a single Route")
    table: list[Route] = []
    where: dict[str, str] = {}
    for i, pool in enumerate(pools):
        own = pool.own_route()
        if own is not None:
            table.append(own)
            where[own.prefix] = f"Gateway.pools[{i}].prefix"
    for i, route in enumerate(routes):
        if not isinstance(route, Route):
            raise ConfigurationError(f"Gateway.routes must hold Route objects, got {route!r}")
        if route.pool not in names:
            known = ", ".join(repr(n) for n in names) or "(none)"
            raise ConfigurationError(f"Gateway.routes[{i}].pool names no pool: {route.pool!r}; the pools are {known}")
        if route.prefix in where:
            raise ConfigurationError(
                f"Gateway.routes[{i}].prefix: the prefix {route.prefix!r} is taken by {where[route.prefix]}"
            )
        where[route.prefix] = f"Gateway.routes[{i}]"
        table.append(route)
    reached = {route.pool for route in table}
    for i, pool in enumerate(pools):
        if pool.name not in reached:
            raise ConfigurationError(
                f"Gateway.pools[{i}]: the pool {pool.name!r} has no prefix and no route names it"
                " (give it a prefix, or add Route(prefix, pool=...))"
            )
    return table


class RouteTable:
    """The routes by raw prefix: ``match`` finds the longest prefix a raw path is under.

    A prefix matches a path that is the prefix or continues it with ``/`` (``request_target.under_prefix``),
    and no prefix but ``/`` ends with ``/``. So the only candidates are the path itself and its parts up
    to each ``/``: ``match`` looks those up in a dict, longest first, and only as far as the longest
    prefix reaches. That is a few lookups whatever the number of routes (a scan of every prefix cost
    one check per route per request: 50 on average with 100 prefixes), and a hostile path of thousands
    of ``/`` costs no more than one as long as the longest prefix.
    """

    __slots__ = ("_by_prefix", "_longest", "_root")

    def __init__(self, routes: Mapping[str, RouteRuntime]) -> None:
        self._by_prefix = {r.prefix_bytes: r for r in routes.values() if r.prefix_bytes != b"/"}
        self._root = next((r for r in routes.values() if r.prefix_bytes == b"/"), None)
        self._longest = max((len(p) for p in self._by_prefix), default=0)

    def match(self, raw_path: bytes) -> RouteRuntime | None:
        """The route with the longest prefix ``raw_path`` is under, or ``None``."""
        by_prefix = self._by_prefix
        if by_prefix:
            if len(raw_path) <= self._longest:
                route = by_prefix.get(raw_path)
                if route is not None:
                    return route
            # The '/' that ends a candidate prefix sits at most one byte past the longest prefix.
            cut = raw_path.rfind(b"/", 0, self._longest + 1)
            while cut > 0:
                route = by_prefix.get(raw_path[:cut])
                if route is not None:
                    return route
                cut = raw_path.rfind(b"/", 0, cut)
        return self._root

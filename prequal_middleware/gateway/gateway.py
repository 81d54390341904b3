"""``Gateway``: the pools, the routes, the upstream transport and the probe scheduler, started and stopped together.

    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=["http://10.0.0.5:8000"])])
    app.add_middleware(PrequalMiddleware, gateway=gateway)   # starts and stops it with the app

Several prefixes served by one fleet are routes to one pool, sharing its membership and Prequal state::

    Gateway(
        pools=[UpstreamPool(name="users", upstreams=["http://10.0.0.5:8000"])],
        routes=[Route("/v1", pool="users"), Route("/v2", pool="users", strip_prefix=False)],
    )

or, managing the lifespan yourself::

    async with gateway:
        ...

Startup opens the transport (unless you passed one) and starts the scheduler; shutdown stops them in
reverse order and leaves no task or connection behind. A stopped gateway can be started again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from starlette.applications import Starlette

from prequal_middleware.config import AccessLogSettings, AdminSettings, Route, UpstreamPool
from prequal_middleware.core import Member, PolicySnapshot
from prequal_middleware.core.history import HistorySettings
from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.gateway.access_log import AccessLog
from prequal_middleware.gateway.discovery import Discovery
from prequal_middleware.gateway.events import GatewayEvents
from prequal_middleware.gateway.forwarding import Forwarder, Receive, Scope, Send, send_error
from prequal_middleware.gateway.history import PoolHistories
from prequal_middleware.gateway.membership import Membership, RegistryHook
from prequal_middleware.gateway.metrics import PrequalMetrics
from prequal_middleware.gateway.observability import Observability
from prequal_middleware.gateway.pool import PoolRuntime
from prequal_middleware.gateway.readiness import Readiness, pool_readiness
from prequal_middleware.gateway.routes import RouteRuntime, RouteTable, route_table
from prequal_middleware.gateway.scheduler import ProbeScheduler
from prequal_middleware.gateway.tracing import Tracing
from prequal_middleware.gateway.websocket import forward_websocket, open_websockets
from prequal_middleware.registry import BackendRecord, Registry
from prequal_middleware.registry.default import check_registry_fits_workers, default_registry
from prequal_middleware.registry.dns import DnsSettings
from prequal_middleware.registry.registration import AllowList, RegistrationRequest
from prequal_middleware.transports.base import Transport
from prequal_middleware.transports.http1 import H1Transport

# An HTTP token (RFC 9110 section 5.6.2), at most 64 characters: what a Via pseudonym may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")

logger = logging.getLogger("prequal_middleware.gateway.gateway")


class GatewayState(enum.Enum):
    CREATED = "created"  # configured, never started
    RUNNING = "running"  # serving: transport open, scheduler running
    STOPPED = "stopped"  # shut down; may be started again


class Gateway:
    """An API gateway: routes (path prefixes) to pools of upstream backends balanced by their policies.

    Parameters:
        pools: the pools, each with a distinct name. ``UpstreamPool("/api", ...)`` also declares the
            route ``/api`` to it; a pool with only a name is reached through ``routes``.
        routes: more routes, each naming a pool; several may name one pool and share its state. No
            two routes (a pool's own prefix included) may have one prefix; every pool needs a route.
        transport: the upstream transport; by default an ``H1Transport`` (our HTTP/1.1 client; upstream
            WebSockets through the ``AiohttpTransport`` it owns). ``AiohttpTransport()`` and
            ``HttpxTransport(client)`` are opt-in behind the same seam. The gateway closes it on shutdown
            (an ``HttpxTransport`` closes your httpx client only with ``close_client=True``).
        metrics: the Prometheus metrics; by default on a fresh ``CollectorRegistry`` of the gateway's own.
        registry: where registered backends live. By default a ``MemoryRegistry``, or a ``SqliteRegistry``
            every worker shares when the server runs several (``registry.default``; a ``MemoryRegistry``
            under several workers is refused at startup); a ``RedisRegistry`` to share membership between
            hosts. The gateway starts and closes it.
        admin: who may register what (token, allow-list, leases) through ``admin_app()``.
        on_register / on_unregister: hooks called with the record after a change went through.
        clock: monotonic seconds; override for tests.
        rng: seeds every policy's random source; pass a seeded one for reproducible runs.
        via_pseudonym: this gateway's name in the ``Via`` header of upstream requests (an HTTP token);
            a request that already carries it came back through a loop and gets 508. Default: random,
            one per gateway. Give the workers of one gateway the same name to catch a loop in one hop.
        dns: how upstreams named by DNS are expanded into one member per address (``DnsSettings``;
            ``DnsSettings(enabled=False)`` keeps a name one member). See ``gateway.discovery``.
        history: what the status page's charts cover (``HistorySettings``: 5 minutes at 5 s, the 5
            busiest backends of each pool by name); sampled from the metrics by the scheduler.
        access_log: a line per proxied request (``AccessLogSettings``; ``gateway.access_log``); off by default.
        request_id_header: the request id header (kept when sound, else made; sent upstream and back to
            the client; ``gateway.request_id``); ``None`` turns request ids off.
        tracing: an OpenTelemetry span per proxied request and ``traceparent`` upstream (the ``otel``
            extra; ``gateway.tracing``): ``True`` for the global tracer provider, or a provider.
    """

    def __init__(
        self,
        pools: Sequence[UpstreamPool] = (),
        routes: Sequence[Route] = (),
        *,
        transport: Transport | None = None,
        metrics: PrequalMetrics | None = None,
        registry: Registry | None = None,
        admin: AdminSettings | None = None,
        on_register: RegistryHook | None = None,
        on_unregister: RegistryHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        via_pseudonym: str | None = None,
        dns: DnsSettings | None = None,
        history: HistorySettings | None = None,
        access_log: AccessLogSettings | None = None,
        request_id_header: str | None = "x-request-id",
        tracing: Any = False,
    ) -> None:
        if via_pseudonym is None:
            # One per gateway (not per process), so two gateways chained in one process are not a loop.
            via_pseudonym = "prequal-" + secrets.token_hex(6)
        elif not isinstance(via_pseudonym, str) or not _TOKEN.fullmatch(via_pseudonym):
            raise ConfigurationError(f"Gateway.via_pseudonym must be an HTTP token (RFC 9110), got {via_pseudonym!r}")
        self.via_pseudonym = via_pseudonym.encode("ascii")
        if request_id_header is not None and (
            not isinstance(request_id_header, str) or not _TOKEN.fullmatch(request_id_header)
        ):
            raise ConfigurationError(
                f"Gateway.request_id_header must be None or an HTTP header name, got {request_id_header!r}"
            )
        if access_log is not None and not isinstance(access_log, AccessLogSettings):
            raise ConfigurationError(f"Gateway.access_log must be None or AccessLogSettings, got {access_log!r}")
        table = route_table(pools, routes)
        rng = self._rng = rng if rng is not None else random.Random()
        # Pools by name (what registrations and metrics use), routes by prefix.
        self.pools: dict[str, PoolRuntime] = {p.name: PoolRuntime(p, rng, clock) for p in pools}
        self.routes: dict[str, RouteRuntime] = {r.prefix: RouteRuntime(r, self.pools[r.pool]) for r in table}
        # Longest prefix first, so the first match wins; matched against the raw path, byte for byte.
        self._route_table = RouteTable(self.routes)
        self.clock = clock
        self._transport = transport
        self.metrics = metrics if metrics is not None else PrequalMetrics()
        self.history = PoolHistories(self.metrics, history)
        self.admin = admin if admin is not None else AdminSettings()
        self.allow_list = AllowList(self.admin.allowed_upstreams)
        self.registry: Registry = registry if registry is not None else default_registry()
        self.events = GatewayEvents(clock)
        self.observe = Observability(
            access_log=AccessLog(access_log) if access_log is not None else None,
            tracing=None if tracing is False or tracing is None else Tracing(None if tracing is True else tracing),
            request_id=request_id_header.lower().encode("ascii") if request_id_header is not None else None,
            events=self.events,
        )
        self.membership = Membership(
            self.pools,
            self.registry,
            self.metrics,
            clock,
            on_register=on_register,
            on_unregister=on_unregister,
            events=self.events,
        )
        self.discovery = Discovery(self.membership, dns if dns is not None else DnsSettings())
        self._scheduler: ProbeScheduler | None = None
        self._forwarder: Forwarder | None = None
        self._reconfiguring = asyncio.Lock()  # one reload at a time (a signal and a file change may race)
        self.state = GatewayState.CREATED
        now = clock()
        for name, runtime in self.pools.items():
            # Names DNS expands join at startup, once resolved.
            runtime.set_members([Member(url) for url in sorted(self.membership.static_members(name))], now)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Gateway:
        """A gateway configured from ``PREQUAL_*`` variables (see ``envconfig``); keyword arguments win."""
        from prequal_middleware.envconfig import gateway_kwargs_from_env

        kwargs = gateway_kwargs_from_env(environ)
        kwargs.update(overrides)
        return cls(**kwargs)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state is GatewayState.RUNNING

    async def startup(self) -> None:
        """Open the transport and start probing and health checks. A no-op when already running."""
        if self.running:
            return
        transport = self._transport
        if transport is None:
            transport = self._transport = H1Transport()
        self.metrics.set_build_info(type(transport).__name__)
        check_registry_fits_workers(self.registry)
        await self.registry.start()
        await self.membership.refresh()
        await self.discovery.resolve_all()  # before serving: a pool named by DNS is not empty at first
        scheduler = ProbeScheduler(
            list(self.pools.values()), transport, self.metrics, self.clock, history=self.history, events=self.events
        )
        await scheduler.start(self.membership, self.discovery)
        self._scheduler = scheduler
        self._forwarder = Forwarder(
            transport, self.metrics, self.clock, via_pseudonym=self.via_pseudonym, observe=self.observe
        )
        self.state = GatewayState.RUNNING
        logger.info(
            "gateway started: %s",
            ", ".join(f"{r.prefix} -> {r.pool.name}" for r in self.routes.values()) or "no routes",
        )

    async def shutdown(self) -> None:
        """Stop the scheduler, then close the transport."""
        if not self.running:
            return
        self.state = GatewayState.STOPPED
        scheduler, self._scheduler, self._forwarder = self._scheduler, None, None
        if scheduler is not None:
            await scheduler.aclose()
        await self.registry.aclose()
        if self._transport is not None:
            await self._transport.aclose()
        self.metrics.flush()  # the last requests' counts, for a registry read after shutdown
        logger.info("gateway stopped")

    async def __aenter__(self) -> Gateway:
        await self.startup()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    # --- reload --------------------------------------------------------------------------------

    async def reconfigure(
        self, pools: Sequence[UpstreamPool], routes: Sequence[Route] = (), *, drain_timeout_s: float | None = None
    ) -> Reconfigured:
        """Serve a new set of pools and routes without dropping a request.

        The whole configuration is checked first (as ``Gateway(pools, routes)`` would): a
        ``ConfigurationError`` leaves everything as it was. Then, in one step no request can see
        half of, the routing table is swapped: new requests take the new routes at once.

        A pool whose settings are unchanged is kept, with its members (registered ones included),
        Prequal state and counts; a change of its upstreams or of its routes' defaults is applied to
        it (a removed upstream drains). A pool with other changed settings is replaced by a fresh one;
        the replaced and the removed pools finish the requests they have in flight (their attempt
        handles and connections stay valid), and their probes and health checks stop once those
        drained, or after ``drain_timeout_s`` (by default the longest a request on their routes may
        wait without a byte: connect + response headers + idle read timeouts).
        """
        async with self._reconfiguring:
            table = route_table(pools, routes)
            configs = {p.name: p for p in pools}
            old_pools = self.pools
            new_pools: dict[str, PoolRuntime] = {}
            replaced: dict[str, PoolRuntime] = {}
            for name, config in configs.items():
                current = old_pools.get(name)
                if current is not None and _same_pool(current.config, config):
                    new_pools[name] = current
                else:
                    new_pools[name] = PoolRuntime(config, self._rng, self.clock)  # may refuse the policy
                    if current is not None:
                        replaced[name] = current
            new_routes = {r.prefix: RouteRuntime(r, new_pools[r.pool], configs[r.pool]) for r in table}
            removed = {name: pool for name, pool in old_pools.items() if name not in configs}
            discovered: dict[tuple[str, str], tuple[str, ...]] = {}
            if self.running:
                # Upstreams new to a pool that DNS expands are looked up before the swap, so that a new
                # pool is not empty at first (as at startup). Nothing changed yet: this await is safe.
                known = set(self.discovery.names())
                wanted = [
                    (name, url)
                    for name, config in configs.items()
                    for url in config.upstreams
                    if self.discovery.settings.enabled and self.membership.resolves(url) and (name, url) not in known
                ]
                answers = await asyncio.gather(*(self.discovery.lookup(n, u) for n, u in wanted))
                discovered = {key: members for key, members in zip(wanted, answers, strict=True) if members is not None}
            grace = {name: _drain_bound(pool, self.routes.values()) for name, pool in (replaced | removed).items()}
            result = Reconfigured(
                added=tuple(n for n in configs if n not in old_pools),
                removed=tuple(removed),
                replaced=tuple(replaced),
                updated=tuple(n for n, p in new_pools.items() if p is old_pools.get(n) and p.config != configs[n]),
            )

            # The swap: no await from here to the scheduler's part, so no request sees a half-applied table.
            for name, pool in new_pools.items():
                if pool is old_pools.get(name):
                    pool.config = configs[name]
            self.pools = new_pools
            self.routes = new_routes
            self._route_table = RouteTable(new_routes)  # what match() reads, once per request
            self.membership.replace_pools(new_pools, discovered)
            try:
                self.membership.apply()
            except Exception:  # a policy's bug in one pool: the others are applied, the registry loop retries
                logger.exception("applying the members after a reload failed")
            scheduler = self._scheduler
            if scheduler is not None:
                for name, old in (replaced | removed).items():
                    timeout = drain_timeout_s if drain_timeout_s is not None else grace[name]
                    scheduler.retire(old, timeout, _busy, forget=name in removed)
                for name, pool in new_pools.items():
                    if pool is not old_pools.get(name):
                        scheduler.add_pool(pool, replaces=replaced.get(name))
                names = self.discovery.names()
                for pool_name, upstream in names:
                    scheduler.start_discovery(self.discovery, pool_name, upstream)
                await scheduler.stop_discovery(keep=names)
            logger.info(
                "gateway reconfigured: %s (%s)",
                ", ".join(f"{r.prefix} -> {r.pool.name}" for r in new_routes.values()) or "no routes",
                result,
            )
            return result

    # --- requests ------------------------------------------------------------------------------

    def match(self, raw_path: bytes) -> RouteRuntime | None:
        """The route whose prefix is the longest one matching the raw (undecoded) path on a segment boundary.

        The raw path is matched byte for byte (``request_target``): ``/%61pi`` is not under ``/api``.
        """
        return self._route_table.match(raw_path)

    def handle_http(self, route: RouteRuntime, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Forward one request on ``route``: the forwarder's coroutine itself, so the request path gets
        no extra coroutine frame to create and to resume through on every wake-up."""
        forwarder = self._forwarder
        if forwarder is None:
            return self._not_running(route, send)
        return forwarder.http(route, scope, receive, send)

    async def _not_running(self, route: RouteRuntime, send: Send) -> None:
        logger.error(
            "request for %s while the gateway is not running: run the app with lifespan enabled "
            "(uvicorn's default), inside `with TestClient(app)`, or `async with gateway`",
            route.prefix,
        )
        await send_error(send, 503, "gateway_not_running", "the gateway is not running", route.pool)

    async def handle_websocket(self, route: RouteRuntime, scope: Scope, receive: Receive, send: Send) -> None:
        transport = self._transport
        if self._forwarder is None or transport is None or not hasattr(transport, "connect_websocket"):
            await receive()
            await send({"type": "websocket.close", "code": 1011})
            return
        await forward_websocket(
            route,
            scope,
            receive,
            send,
            transport,  # type: ignore[arg-type]
            self.clock,
            via_pseudonym=self.via_pseudonym,
            observe=self.observe,
        )

    # --- registration (the admin routes call these) ----------------------------------------------

    async def register(self, req: RegistrationRequest) -> BackendRecord:
        """Register (or re-register) a backend; it takes traffic here at once, elsewhere on the next sync."""
        return await self.membership.register(req)

    async def heartbeat(self, req: RegistrationRequest) -> BackendRecord | None:
        """Renew a lease; ``None`` for a backend the registry does not know."""
        return await self.membership.heartbeat(req)

    async def unregister(self, req: RegistrationRequest) -> bool:
        """Remove a backend; requests in flight to it finish (it drains)."""
        return await self.membership.unregister(req)

    def admin_app(self) -> Starlette:
        """The admin routes as a Starlette app: ``app.mount("/_prequal", gateway.admin_app())``."""
        # Imported here: admin/ reads the gateway, never the other way round at import time.
        from prequal_middleware.admin.routes import admin_app

        return admin_app(self)

    def admin_router(self) -> Any:
        """The admin routes as a FastAPI ``APIRouter``: ``app.include_router(router, prefix="/_prequal")``."""
        from prequal_middleware.admin.routes import admin_router

        return admin_router(self)

    def routes_of(self, pool: str) -> list[str]:
        """The prefixes of the routes to the pool named ``pool``, in declaration order."""
        return [prefix for prefix, route in self.routes.items() if route.pool.name == pool]

    def readiness(self) -> Readiness:
        """Whether the gateway should get traffic (``/readyz``): running, every required pool with a healthy
        member (``UpstreamPool.required_for_ready``), and a registry not unreachable for
        ``AdminSettings.ready_while_stale_s`` or more. Each pool says whether it is required and why."""
        now = self.clock()
        pools = [pool_readiness(pool.config, pool.clients[0].snapshot(now)) for pool in self.pools.values()]
        stale_since = self.registry.snapshot().stale_since
        stale_for = None if stale_since is None else max(0.0, now - stale_since)
        return Readiness(self.running, tuple(pools), stale_for, self.admin.ready_while_stale_s)

    def readiness_problems(self) -> list[str]:
        """Why the gateway should not get traffic yet (empty when it should); see ``readiness``."""
        return self.readiness().problems

    # --- state ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every pool's state by name: members, their health and load, selections by reason."""
        now = self.clock()
        pools: dict[str, Any] = {}
        for name, pool in self.pools.items():
            clients: list[PolicySnapshot] = [c.snapshot(now) for c in pool.clients]
            pools[name] = {
                "routes": self.routes_of(name),
                "policy": clients[0].policy if clients else None,
                "in_flight": pool.in_flight,
                "probes_in_flight": pool.probes_in_flight,
                "probes_skipped": pool.probes_skipped,
                "clients": clients,
            }
        return {"state": self.state.value, "pools": pools}


@dataclasses.dataclass(frozen=True)
class Reconfigured:
    """What ``Gateway.reconfigure`` did, by pool name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()  # new settings: a fresh pool; the old one drained
    updated: tuple[str, ...] = ()  # kept with its state: new upstreams or route defaults

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in dataclasses.asdict(self).items() if names]
        return "; ".join(parts) or "no pool changed"


# The UpstreamPool settings its routes read (a pool keeps its state when only these and its upstreams change).
_ROUTE_SETTINGS = frozenset(f.name for f in dataclasses.fields(Route)) - {"pool"}


def _same_pool(old: UpstreamPool, new: UpstreamPool) -> bool:
    """Whether ``new`` differs from ``old`` only in its upstreams and its routes' settings."""
    carried = {name: getattr(new, name) for name in _ROUTE_SETTINGS}
    return dataclasses.replace(old, upstreams=new.upstreams, **carried) == new


def _drain_bound(pool: PoolRuntime, routes: Iterable[RouteRuntime]) -> float:
    """The longest a request on ``pool``'s routes may go without a byte: how long its retirement waits."""
    bounds = [
        t.connect_s + t.response_headers_s + t.read_idle_s for t in (r.timeouts for r in routes if r.pool is pool)
    ]
    t = pool.config.timeouts
    return max(bounds, default=t.connect_s + t.response_headers_s + t.read_idle_s)


def _busy(pool: PoolRuntime) -> int:
    """What a retired pool still serves: attempts in flight and open WebSockets."""
    return pool.in_flight + open_websockets(pool)

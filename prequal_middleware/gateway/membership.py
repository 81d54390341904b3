"""``Membership``: the registry's records turned into each pool's members.

A pool's members are its static upstreams plus the backends registered for it. The registry keeps
the records (memory by default, Redis to share them between gateways); this class writes to it on
behalf of the admin routes and applies its local snapshot to the pools, never a registry round trip
per proxied request. A member that leaves while requests to it are in flight stays as *draining*
(no new requests) until they finish. Health, ejection and probe state stay local to each gateway: a
heartbeat renews a lease and nothing else, so it never lifts an ejection.

Cost: with a local registry (the memory one) a write is applied as its delta, one member upserted or
removed, in O(1) whatever the pool's size; the full apply, O(n), runs at start, for changes this class
did not make (lease expiry), and every ``FULL_APPLY_S`` as a safety net. A shared registry (Redis) is
re-read and applied in full after each write, as other gateways may have written meanwhile.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prequal_middleware.core import Member
from prequal_middleware.gateway.events import GatewayEvents
from prequal_middleware.gateway.metrics import PrequalMetrics
from prequal_middleware.gateway.pool import PoolRuntime
from prequal_middleware.registry import BackendRecord, Registry
from prequal_middleware.registry.base import LocalRegistry
from prequal_middleware.registry.registration import RegistrationRequest

logger = logging.getLogger("prequal_middleware.gateway.membership")

# The longest the pools go without a full apply while every change came through as a delta.
FULL_APPLY_S = 5.0

RegistryHook = Callable[[BackendRecord], None | Awaitable[None]]
"""Called after a backend registered or unregistered (``on_register`` / ``on_unregister``)."""


class Membership:
    """Keeps the pools' members in step with the registry.

    Parameters:
        pools: the gateway's pools by prefix.
        registry: where registrations live.
        metrics: counts registry events and staleness.
        clock: monotonic seconds (for the policies); ``wall`` is epoch seconds (for leases).
        on_register / on_unregister: hooks called after a change went through.
        events: where registrations, unregistrations and lease expiries are logged.
    """

    def __init__(
        self,
        pools: Mapping[str, PoolRuntime],
        registry: Registry,
        metrics: PrequalMetrics,
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
        on_register: RegistryHook | None = None,
        on_unregister: RegistryHook | None = None,
        events: GatewayEvents | None = None,
    ) -> None:
        self.pools = pools
        self.events = events
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.on_register = on_register
        self.on_unregister = on_unregister
        # Per pool, the records the pools reflect: replaced at each full apply, updated per delta.
        self.records: dict[str, dict[str, BackendRecord]] = {}
        self._local = registry if isinstance(registry, LocalRegistry) else None
        # The local registry's version the pools reflect; None: unknown, the next refresh applies in full.
        self._applied: int | None = None
        self._last_full = -math.inf
        self._draining: dict[str, set[str]] = {}  # per pool, the members kept while requests finish
        self._static: dict[str, frozenset[str]] = {}
        # Per pool, per upstream named by DNS, the members it stands for now (``Discovery`` sets them).
        self._discovered: dict[str, dict[str, tuple[str, ...]]] = {}
        self.resolves: Callable[[str], bool] = _never  # which configured upstreams DNS expands

    # --- writes (the admin routes) ---------------------------------------------------------------

    async def register(self, req: RegistrationRequest) -> BackendRecord:
        """Store a registration and add (or update) its member; returns the record as stored."""
        record = BackendRecord(pool=req.pool, url=req.url, weight=req.weight, metadata=req.metadata or {})
        pool = self.pools.get(req.pool)
        before = await self._sweep()
        present = pool is not None and req.url in pool.members
        stored = await self.registry.register(record, req.ttl_s)
        self._count("register")
        if self._in_step(before):
            self._delta(stored.pool, stored.url, stored)
        else:
            await self.refresh()
        if pool is not None and present:
            pool.announce([stored.url])  # registered again while present: revisit what we learnt of it
        if self.events is not None:
            self.events.registered(stored.pool, stored.url, again=present, ttl_s=req.ttl_s)
        await _call(self.on_register, stored)
        return stored

    async def heartbeat(self, req: RegistrationRequest) -> BackendRecord | None:
        """Renew a lease; ``None`` for a backend the registry does not know."""
        before = self._version()
        renewed = await self.registry.heartbeat(req.pool, req.url, req.ttl_s)
        if renewed is not None:
            self._count("heartbeat")
            if self._in_step(before):  # a renewal changes no member, only the lease we report
                records = self.records.get(renewed.pool)
                if records is not None and renewed.url in records:
                    records[renewed.url] = renewed
                self._applied = self._version()
        return renewed

    async def unregister(self, req: RegistrationRequest) -> bool:
        """Remove a registration: its member leaves, or drains while requests to it are in flight."""
        before = await self._sweep()
        record = self.records.get(req.pool, {}).get(req.url)
        existed = await self.registry.unregister(req.pool, req.url)
        # In step, the delta applies whether or not a record existed: removing nothing changes nothing.
        in_step = self._in_step(before)
        if in_step:
            self._delta(req.pool, req.url, None)
        if existed:
            self._count("unregister")
            if not in_step:
                await self.refresh()
            if self.events is not None:
                pool = self.pools.get(req.pool)
                draining = pool.backend_in_flight.get(req.url, 0) if pool is not None else 0
                self.events.unregistered(req.pool, req.url, draining)
            if record is not None:
                await _call(self.on_unregister, record)
        return existed

    def _count(self, event: str) -> None:
        self.metrics.child(self.metrics.registry_events, event).inc()

    # --- reads ---------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Sync the registry's local snapshot and apply it (also finishes drains).

        The registry loop calls this after every change: when the pools already reflect the local
        registry's version (the change was one of our own writes, applied as a delta) only finished
        drains are removed, until ``FULL_APPLY_S`` after the last full apply.
        """
        await self.registry.sync()
        now = self.clock()
        if self._in_step(self._version()) and now - self._last_full < FULL_APPLY_S:
            self._finish_drains(now)
            return
        self.apply()

    def apply(self) -> None:
        """Make every pool's members its static upstreams plus the snapshot's records (and the draining
        members while requests to them are in flight): O(n) in the members."""
        version = self._version()  # before the snapshot, so a change made meanwhile is never marked applied
        snapshot = self.registry.snapshot()
        now = self.clock()
        stale = 0.0 if snapshot.stale_since is None else max(0.0, now - snapshot.stale_since)
        self.metrics.registry_stale.set(stale)
        first_error: Exception | None = None
        for prefix, pool in self.pools.items():
            try:
                self._apply_pool(prefix, pool, snapshot.records.get(prefix, {}), now)
            except Exception as exc:  # one pool's bad record or policy bug must not hold back the others
                first_error = first_error or exc
        self._applied = version if first_error is None else None
        self._last_full = now
        if first_error is not None:
            raise first_error  # the caller (the registry loop, an admin write) reports it

    def _apply_pool(self, prefix: str, pool: PoolRuntime, records: Mapping[str, BackendRecord], now: float) -> None:
        if self.events is not None:
            self._expired(prefix, records)
        self.records[prefix] = dict(records)
        members: dict[str, Member] = {url: Member(url) for url in self._static_of(prefix, pool)}
        for url, record in records.items():
            members[url] = self._registered(prefix, pool, record)
        for url, old in pool.members.items():
            if url not in members and pool.backend_in_flight.get(url, 0) > 0:
                members[url] = Member(url, weight=old.weight, draining=True)
        self._draining[prefix] = {url for url, member in members.items() if member.draining}
        if members != pool.members:
            for url in pool.members:
                if url not in members:
                    self.metrics.forget_backend(prefix, url)
            pool.set_members(members.values(), now)

    def _expired(self, prefix: str, records: Mapping[str, BackendRecord]) -> None:
        """Log the records that left because their lease ran out (an unregistration is logged where
        it was received)."""
        wall = None
        for url, record in self.records.get(prefix, {}).items():
            if url not in records and record.lease_expires_at is not None:
                wall = self.wall() if wall is None else wall
                if record.lease_expires_at <= wall and self.events is not None:
                    self.events.lease_expired(prefix, url)

    def replace_pools(
        self, pools: Mapping[str, PoolRuntime], discovered: Mapping[tuple[str, str], tuple[str, ...]] | None = None
    ) -> None:
        """Serve a new set of pools (``Gateway.reconfigure``); then ``apply()`` fills them.

        What is kept per pool name: the registry's records (they belong to the name, not to one
        configuration) and what DNS said of the upstreams still configured; the draining members of a
        pool kept as it was. ``discovered`` adds the answers for upstreams new to a pool.
        """
        old = self.pools
        for name in list(self._draining):
            if pools.get(name) is not old.get(name):
                del self._draining[name]  # the old pool keeps its members while it drains; the new one starts clean
        for name in list(self._discovered):
            pool = pools.get(name)
            upstreams = set(pool.config.upstreams) if pool is not None else set()
            kept = {u: m for u, m in self._discovered[name].items() if u in upstreams}
            if kept:
                self._discovered[name] = kept
            else:
                del self._discovered[name]
        for (name, upstream), members in (discovered or {}).items():
            self._discovered.setdefault(name, {})[upstream] = members
        for name in [n for n in self.records if n not in pools]:
            del self.records[name]
        self._static.clear()  # recomputed from the new configurations
        self.pools = pools
        self._applied = None  # the next refresh applies in full

    # --- deltas: one write applied in O(1) -------------------------------------------------------

    async def _sweep(self) -> int | None:
        """Before a write to a local registry: drop the leases that ran out, as the full path's sync
        did (O(1) unless one did; then the write finds the pools behind and applies in full), and
        return the version the write starts from."""
        if self._local is None:
            return None
        await self.registry.sync()
        return self._local.current_version()

    def _version(self) -> int | None:
        return None if self._local is None else self._local.current_version()

    def _in_step(self, before: int | None) -> bool:
        """Whether the pools reflected the local registry just before a write of ours (or now, for
        ``before`` read now), so that applying that write alone brings them level again."""
        after = self._version()
        return before is not None and after is not None and before == self._applied and after - before <= 1

    def _delta(self, prefix: str, url: str, record: BackendRecord | None) -> None:
        """Apply one write: ``record`` registered (upsert) or, for ``None``, ``url`` unregistered."""
        try:
            pool = self.pools.get(prefix)
            now = self.clock()
            if pool is not None:
                records = self.records.setdefault(prefix, {})
                if record is not None:
                    records[url] = record
                    self._upsert(prefix, pool, self._registered(prefix, pool, record), now)
                else:
                    records.pop(url, None)
                    self._remove(prefix, pool, url, now)
            self._finish_drains(now)  # as a full apply would
        except Exception:
            self._applied = None  # the registry loop's next refresh applies in full
            raise
        self._applied = self._version()

    def _registered(self, prefix: str, pool: PoolRuntime, record: BackendRecord) -> Member:
        # A registered member earns traffic with its first passing health check, where there are checks;
        # the operator's static members are trusted from the start.
        checked = pool.config.health.path is not None
        static = record.url in self._static_of(prefix, pool)
        return Member(record.url, weight=record.weight, awaits_health_check=checked and not static)

    def _upsert(self, prefix: str, pool: PoolRuntime, member: Member, now: float) -> None:
        self._draining.get(prefix, set()).discard(member.id)
        if pool.members.get(member.id) != member:  # a re-registration that changes nothing leaves the policies be
            pool.upsert_member(member, now)

    def _remove(self, prefix: str, pool: PoolRuntime, url: str, now: float) -> None:
        old = pool.members.get(url)
        if old is None:
            return
        if url in self._static_of(prefix, pool):
            self._upsert(prefix, pool, Member(url), now)  # the operator's member stays, as configured
        elif pool.backend_in_flight.get(url, 0) > 0:
            self._upsert(prefix, pool, Member(url, weight=old.weight, draining=True), now)
            self._draining.setdefault(prefix, set()).add(url)
        else:
            self.metrics.forget_backend(prefix, url)
            pool.remove_member(url, now)

    def _finish_drains(self, now: float) -> None:
        """Remove the draining members whose last request finished: O(draining members)."""
        for prefix, urls in self._draining.items():
            pool = self.pools[prefix]
            for url in [u for u in urls if not pool.backend_in_flight.get(u, 0)]:
                urls.discard(url)
                member = pool.members.get(url)
                if member is not None and member.draining:
                    self.metrics.forget_backend(prefix, url)
                    pool.remove_member(url, now)

    def _static_of(self, prefix: str, pool: PoolRuntime) -> frozenset[str]:
        """The operator's members: configured upstreams, each name DNS expands replaced by its members."""
        static = self._static.get(prefix)
        if static is None:
            literal = [url for url in pool.config.upstreams if not self.resolves(url)]
            discovered = [url for urls in self._discovered.get(prefix, {}).values() for url in urls]
            static = self._static[prefix] = frozenset((*literal, *discovered))
        return static

    def static_members(self, prefix: str) -> frozenset[str]:
        """The operator's members of one pool now (see ``_static_of``)."""
        return self._static_of(prefix, self.pools[prefix])

    def discovered(self, prefix: str, upstream: str) -> tuple[str, ...]:
        """The members one upstream named by DNS stands for now (empty before its first answer)."""
        return self._discovered.get(prefix, {}).get(upstream, ())

    def set_discovered(self, prefix: str, upstream: str, members: tuple[str, ...]) -> bool:
        """What one upstream named by DNS stands for now; re-applies the pool when that changed (O(n)
        in its members, as often as DNS changes). ``True`` if it did."""
        pool = self.pools.get(prefix)
        if pool is None:
            return False  # the pool left in a reload while its name was being looked up
        known = self._discovered.setdefault(prefix, {})
        if known.get(upstream) == members:
            return False
        known[upstream] = members
        self._static.pop(prefix, None)
        self._apply_pool(prefix, pool, self.records.get(prefix, {}), self.clock())
        return True

    def lease_remaining_s(self, prefix: str, url: str) -> float | None:
        record = self.records.get(prefix, {}).get(url)
        if record is None or record.lease_expires_at is None:
            return None
        return max(0.0, record.lease_expires_at - self.wall())

    def record_of(self, prefix: str, url: str) -> BackendRecord | None:
        return self.records.get(prefix, {}).get(url)


def _never(url: str) -> bool:
    return False


async def _call(hook: RegistryHook | None, record: BackendRecord) -> None:
    if hook is None:
        return
    try:
        result: Any = hook(record)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("registry hook %r failed for %s", hook, record.url)

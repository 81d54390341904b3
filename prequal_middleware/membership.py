"""``Membership``: the registry's records turned into each pool's members.

A pool's members are its static upstreams plus the backends registered for it. The registry keeps
the records (memory by default, Redis to share them between gateways); this class writes to it on
behalf of the admin routes and applies its local snapshot to the pools, never a registry round trip
per proxied request. A member that leaves while requests to it are in flight stays as *draining*
(no new requests) until they finish. Health, ejection and probe state stay local to each gateway: a
heartbeat renews a lease and nothing else, so it never lifts an ejection.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .core import Member
from .metrics import PrequalMetrics
from .pool import PoolRuntime
from .registration import RegistrationRequest
from .registry import BackendRecord, Registry

logger = logging.getLogger("prequal_middleware.membership")

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
    ) -> None:
        self.pools = pools
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.on_register = on_register
        self.on_unregister = on_unregister
        self.records: dict[str, Mapping[str, BackendRecord]] = {}

    # --- writes (the admin routes) ---------------------------------------------------------------

    async def register(self, req: RegistrationRequest) -> BackendRecord:
        record = BackendRecord(pool=req.pool, url=req.url, weight=req.weight, metadata=req.metadata or {})
        pool = self.pools.get(req.pool)
        present = pool is not None and req.url in pool.members
        stored = await self.registry.register(record, req.ttl_s)
        self._count("register")
        await self.refresh()
        if pool is not None and present:
            pool.announce([stored.url])  # registered again while present: revisit what we learnt of it
        await _call(self.on_register, stored)
        return stored

    async def heartbeat(self, req: RegistrationRequest) -> BackendRecord | None:
        renewed = await self.registry.heartbeat(req.pool, req.url, req.ttl_s)
        if renewed is not None:
            self._count("heartbeat")
        return renewed

    async def unregister(self, req: RegistrationRequest) -> bool:
        record = self.records.get(req.pool, {}).get(req.url)
        existed = await self.registry.unregister(req.pool, req.url)
        if existed:
            self._count("unregister")
            await self.refresh()
            if record is not None:
                await _call(self.on_unregister, record)
        return existed

    def _count(self, event: str) -> None:
        self.metrics.child(self.metrics.registry_events, event).inc()

    # --- reads ---------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Sync the registry's local snapshot and apply it (also finishes drains)."""
        await self.registry.sync()
        self.apply()

    def apply(self) -> None:
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
        if first_error is not None:
            raise first_error  # the caller (the registry loop, an admin write) reports it

    def _apply_pool(self, prefix: str, pool: PoolRuntime, records: Mapping[str, BackendRecord], now: float) -> None:
        self.records[prefix] = records
        members: dict[str, Member] = {url: Member(url) for url in pool.config.upstreams}
        # A registered member earns traffic with its first passing health check, where there are checks;
        # the operator's static members are trusted from the start.
        checked = pool.config.health.path is not None
        for url, record in records.items():
            static = url in members
            members[url] = Member(url, weight=record.weight, awaits_health_check=checked and not static)
        for url, old in pool.members.items():
            if url not in members and pool.backend_in_flight.get(url, 0) > 0:
                members[url] = Member(url, weight=old.weight, draining=True)
        if members != pool.members:
            for url in pool.members:
                if url not in members:
                    self.metrics.forget_backend(prefix, url)
            pool.set_members(members.values(), now)

    def lease_remaining_s(self, prefix: str, url: str) -> float | None:
        record = self.records.get(prefix, {}).get(url)
        if record is None or record.lease_expires_at is None:
            return None
        return max(0.0, record.lease_expires_at - self.wall())

    def record_of(self, prefix: str, url: str) -> BackendRecord | None:
        return self.records.get(prefix, {}).get(url)


async def _call(hook: RegistryHook | None, record: BackendRecord) -> None:
    if hook is None:
        return
    try:
        result: Any = hook(record)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("registry hook %r failed for %s", hook, record.url)

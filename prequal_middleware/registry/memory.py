"""``MemoryRegistry``: the default registry, a dict in this process (nothing shared, nothing to run)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType

from prequal_middleware.registry.base import (
    BackendRecord,
    Records,
    RegistrySnapshot,
    lease_expiry,
    normalise_metadata,
    same_entry,
)


class MemoryRegistry:
    """Registry kept in this process; writes show in :meth:`snapshot` at once, leases expire at :meth:`sync`.

    A write costs O(1): snapshots are built lazily, when asked for, and then re-copy only the pools
    written since the previous one (a :class:`~.base.LocalRegistry`: ``Membership`` applies each write
    as a delta instead of reading a snapshot).

    Parameters:
        wall: wall-clock epoch seconds, for leases.
        monotonic: monotonic seconds, for ``synced_at``.
    """

    kind = "memory"

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._pools: dict[str, dict[str, BackendRecord]] = {}
        self._version = 0
        self._synced_version = 0
        # A lower bound of the earliest lease: heartbeats only move leases later, so a stale bound only
        # costs one needless scan, and sync() skips the scan entirely while it lies in the future.
        self._next_expiry = math.inf
        self._synced_at = monotonic()
        self._frozen: Records | None = None  # None: rebuild on the next snapshot()
        # Each pool's read-only copy as of the last snapshot(), and the pools written since: a snapshot
        # after a write copies the pool that changed, not every record of every pool.
        self._frozen_pools: dict[str, Mapping[str, BackendRecord]] = {}
        self._dirty: set[str] = set()
        self._snapshot: RegistrySnapshot | None = None
        # Replaced on every change, so each waiter holds the event of the generation it waits on.
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Nothing to connect."""

    async def aclose(self) -> None:
        """Wake any waiter; nothing to release."""
        self._changed.set()

    async def register(self, record: BackendRecord, ttl_s: float | None) -> BackendRecord:
        """Insert or replace a record (see :meth:`Registry.register`)."""
        now = self._wall()
        lease = lease_expiry(now, ttl_s)
        members = self._pools.setdefault(record.pool, {})
        old = members.get(record.url)
        if old is not None and old.expired(now):
            old = None  # an expired lease that sync() has not dropped yet: this is a new registration
        stored = replace(
            record,
            weight=float(record.weight),
            metadata=normalise_metadata(record.metadata),
            lease_expires_at=lease,
            registered_at=now if old is None else old.registered_at,
        )
        members[record.url] = stored
        self._written(record.pool, lease, changed=old is None or not same_entry(old, stored))
        return stored

    async def heartbeat(self, pool: str, url: str, ttl_s: float | None) -> BackendRecord | None:
        """Renew a lease (see :meth:`Registry.heartbeat`)."""
        now = self._wall()
        lease = lease_expiry(now, ttl_s)
        old = self._pools.get(pool, {}).get(url)
        if old is None or old.expired(now):
            return None
        renewed = replace(old, lease_expires_at=lease)
        self._pools[pool][url] = renewed
        self._written(pool, lease, changed=(old.lease_expires_at is None) != (lease is None))
        return renewed

    async def unregister(self, pool: str, url: str) -> bool:
        """Remove a record (see :meth:`Registry.unregister`)."""
        members = self._pools.get(pool, {})
        old = members.pop(url, None)
        if old is None:
            return False
        if not members:
            del self._pools[pool]
        self._written(pool, None, changed=True)
        return not old.expired(self._wall())

    def snapshot(self) -> RegistrySnapshot:
        """The current records (see :meth:`Registry.snapshot`)."""
        if self._frozen is None:
            for pool in self._dirty:
                members = self._pools.get(pool)
                if members:
                    self._frozen_pools[pool] = MappingProxyType(dict(members))
                else:
                    self._frozen_pools.pop(pool, None)  # a snapshot lists no empty pools
            self._dirty.clear()
            frozen = self._frozen_pools
            self._frozen = MappingProxyType({pool: frozen[pool] for pool in self._pools if pool in frozen})
            self._snapshot = None
        if self._snapshot is None:
            self._snapshot = RegistrySnapshot(self._frozen, self._version, None, self._synced_at)
        return self._snapshot

    def current_version(self) -> int:
        """The version the next :meth:`snapshot` carries, in O(1) (see :class:`~.base.LocalRegistry`)."""
        return self._version

    async def sync(self) -> bool:
        """Drop expired leases; ``True`` if membership changed since the previous sync."""
        now = self._wall()
        if now >= self._next_expiry:
            self._expire(now)
        self._synced_at = self._monotonic()
        self._snapshot = None
        changed = self._version != self._synced_version
        self._synced_version = self._version
        return changed

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return at the next write (or at once if one happened since the last sync), else after ``timeout_s``."""
        if self._version != self._synced_version:
            return
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await changed.wait()

    def _written(self, pool: str, lease: float | None, *, changed: bool) -> None:
        if lease is not None:
            self._next_expiry = min(self._next_expiry, lease)
        self._dirty.add(pool)
        self._frozen = None
        if changed:
            self._version += 1
            self._changed.set()
            self._changed = asyncio.Event()

    def _expire(self, now: float) -> None:
        next_expiry = math.inf
        for pool, members in list(self._pools.items()):
            for url, record in list(members.items()):
                if record.expired(now):
                    del members[url]
                    self._written(pool, None, changed=True)
                elif record.lease_expires_at is not None:
                    next_expiry = min(next_expiry, record.lease_expires_at)
            if not members:
                del self._pools[pool]
        self._next_expiry = next_expiry

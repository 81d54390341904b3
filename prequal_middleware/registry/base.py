"""The registry's types: what a backend record is, what a snapshot is, and the protocol every store meets.

Times: lease expiry and registration are wall-clock epoch seconds (they are shared between processes
and hosts); ``stale_since`` and ``synced_at`` are monotonic seconds of the process that holds the
snapshot (they are only compared with that process's own clock).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

Records = Mapping[str, Mapping[str, "BackendRecord"]]

EMPTY_RECORDS: Records = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class BackendRecord:
    """One backend of one pool.

    Parameters:
        pool: the pool's name, e.g. ``"/api"`` (a pool declared by prefix) or ``"users"``.
        url: the backend's normalised URL, unique within its pool.
        weight: relative weight for policies that use one.
        metadata: small, JSON-serialisable data about the backend.
        lease_expires_at: wall-clock epoch seconds after which the record is gone; ``None``: never.
        registered_at: wall-clock epoch seconds of the first registration (kept across re-registrations).
    """

    pool: str
    url: str
    weight: float = 1.0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    lease_expires_at: float | None = None
    registered_at: float = 0.0

    def expired(self, now: float) -> bool:
        """Whether the lease has run out at wall-clock ``now``."""
        return self.lease_expires_at is not None and self.lease_expires_at <= now

    def to_json(self) -> str:
        """Compact JSON of every field."""
        return json.dumps(
            {
                "pool": self.pool,
                "url": self.url,
                "weight": self.weight,
                "metadata": dict(self.metadata),
                "lease_expires_at": self.lease_expires_at,
                "registered_at": self.registered_at,
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> BackendRecord:
        """Parse what :meth:`to_json` wrote; raises ``ValueError`` on anything else."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a backend record must be a JSON object")
        pool, url, metadata = data.get("pool"), data.get("url"), data.get("metadata", {})
        if not isinstance(pool, str) or not isinstance(url, str):
            raise ValueError("a backend record needs string 'pool' and 'url'")
        if not isinstance(metadata, dict):
            raise ValueError("a backend record's 'metadata' must be a JSON object")
        lease = data.get("lease_expires_at")
        return cls(
            pool=pool,
            url=url,
            weight=_number(data.get("weight", 1.0), "weight"),
            metadata=metadata,
            lease_expires_at=None if lease is None else _number(lease, "lease_expires_at"),
            registered_at=_number(data.get("registered_at", 0.0), "registered_at"),
        )


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """An immutable view of the registry as one process last saw it.

    Parameters:
        records: pool -> url -> record, unexpired ones only (as of the last sync).
        version: changes whenever membership (who, weight, metadata, lease or none) changed in this view.
        stale_since: monotonic time the store became unreachable; ``None`` while it answers.
        synced_at: monotonic time of the last successful sync (before the first: creation time).
    """

    records: Records
    version: int
    stale_since: float | None
    synced_at: float

    def pool(self, prefix: str) -> Mapping[str, BackendRecord]:
        """The members of one pool (empty if it has none)."""
        return self.records.get(prefix, MappingProxyType({}))


class Registry(Protocol):
    """Who exists: the store behind run-time registration, shared or not.

    ``snapshot()`` is the only method the request path may call; everything else is for the admin
    routes and the scheduler's registry loop (``wait_for_change`` then ``sync``).
    """

    kind: str

    async def start(self) -> None:
        """Connect and take the first snapshot; never raises because the store is down."""

    async def aclose(self) -> None:
        """Release connections; the registry cannot be used afterwards."""

    async def register(self, record: BackendRecord, ttl_s: float | None) -> BackendRecord:
        """Insert or replace ``record`` with a lease of ``ttl_s`` seconds (``None``: no lease); returns it as stored.

        An unexpired record keeps its ``registered_at``. Raises ``RegistryUnavailable`` if the
        store cannot be written; then nothing was applied.
        """
        ...

    async def heartbeat(self, pool: str, url: str, ttl_s: float | None) -> BackendRecord | None:
        """Renew the lease of an unexpired record and return it; ``None`` if there is none (re-register)."""
        ...

    async def unregister(self, pool: str, url: str) -> bool:
        """Remove a record; ``True`` if an unexpired one existed."""
        ...

    def snapshot(self) -> RegistrySnapshot:
        """The local snapshot: no I/O, cheap enough for every request."""
        ...

    async def sync(self) -> bool:
        """Refresh the snapshot from the store and drop expired leases; ``True`` if membership changed.

        Never raises: on a store error the last snapshot stays, ``stale_since`` is set and the result is ``False``.
        """
        ...

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when membership may have changed (any writer, any process), or after ``timeout_s``."""


@runtime_checkable
class LocalRegistry(Protocol):
    """A registry held by this process alone (``MemoryRegistry``): no other writer, never stale.

    Its writes show in ``snapshot()`` as soon as they return and complete without yielding to the event
    loop, so :meth:`current_version` read just before and just after one write differs by that write
    alone. ``Membership`` then applies each write it makes as a delta, and skips the full apply of a
    version it has already reflected.
    """

    def current_version(self) -> int:
        """What ``snapshot().version`` would be now, without building a snapshot (O(1))."""
        ...


def lease_expiry(now: float, ttl_s: float | None) -> float | None:
    """Epoch seconds a lease of ``ttl_s`` taken at ``now`` ends; ``None`` for no lease."""
    if ttl_s is None:
        return None
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"ttl_s must be a positive number of seconds or None, got {ttl_s!r}")
    return now + ttl_s


def normalise_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy through JSON, so every store keeps exactly what a shared one would give back."""
    try:
        copied = json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    assert isinstance(copied, dict)
    return copied


def same_entry(a: BackendRecord, b: BackendRecord) -> bool:
    """Whether two records of one url are the same membership: lease renewals alone do not count."""
    return (
        a.weight == b.weight
        and a.metadata == b.metadata
        and (a.lease_expires_at is None) == (b.lease_expires_at is None)
        and a.registered_at == b.registered_at
    )


def same_membership(a: Records, b: Records) -> bool:
    """Whether two views hold the same pools, urls and entries (see :func:`same_entry`)."""
    if a.keys() != b.keys():
        return False
    for pool, members in a.items():
        others = b[pool]
        if members.keys() != others.keys():
            return False
        if not all(same_entry(record, others[url]) for url, record in members.items()):
            return False
    return True


def earliest_expiry(records: Records) -> float:
    """The first lease to run out among ``records`` (``inf`` if none has a lease)."""
    leases = (r.lease_expires_at for members in records.values() for r in members.values())
    return min((lease for lease in leases if lease is not None), default=math.inf)


def freeze(records: Mapping[str, Mapping[str, BackendRecord]]) -> Records:
    """Read-only copy for a snapshot, without empty pools."""
    return MappingProxyType({pool: MappingProxyType(dict(members)) for pool, members in records.items() if members})


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"a backend record's {name!r} must be a number")
    return float(value)

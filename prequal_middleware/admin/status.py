"""The one status model: the gateway's state (``GET /backends``, the status page, write answers), as the
pydantic models of ``admin.schemas``.

Every pool (by name, with the prefixes of the routes to it) with its policy, in-flight count,
probe-pool occupancy, RIF threshold, selections by reason, and each member's state, probe mode, last
reported RIF and latency, in-flight count, weight, lease and failures. With several clients per pool
the first client's view of each member is shown (their health and load views are their own), and
counters are summed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prequal_middleware.admin.schemas import GatewayStatus, Record
from prequal_middleware.core import PolicySnapshot
from prequal_middleware.registry import BackendRecord

if TYPE_CHECKING:
    from prequal_middleware.gateway.gateway import Gateway
    from prequal_middleware.gateway.pool import PoolRuntime


# Members listed per pool unless the caller asks for another page: with thousands of members the full
# list would cost the status page's once-a-second refresh more than everything else; the counts by state
# always cover every member.
DEFAULT_MEMBER_LIMIT = 100
MAX_MEMBER_LIMIT = 1000


def describe(
    gateway: Gateway, *, pool: str | None = None, offset: int = 0, limit: int = DEFAULT_MEMBER_LIMIT
) -> GatewayStatus:
    """The gateway's state: every pool (or only ``pool``), each with its members ``offset`` to ``offset + limit``
    (validated by the model, so what is sent is what the OpenAPI schema says)."""
    now = gateway.clock()
    snapshot = gateway.registry.snapshot()
    stale_for = None if snapshot.stale_since is None else round(max(0.0, now - snapshot.stale_since), 3)
    pools = []
    for name, runtime in gateway.pools.items():
        if pool is not None and name != pool:
            continue
        pools.append(_describe_pool(gateway, name, runtime, now, offset, limit))
    return GatewayStatus.model_validate(
        {
            "state": gateway.state.value,
            "registry": {
                "kind": getattr(gateway.registry, "kind", type(gateway.registry).__name__),
                "version": snapshot.version,
                "stale": snapshot.stale_since is not None,
                "stale_for_s": stale_for,
            },
            "pools": pools,
        }
    )


def _describe_pool(
    gateway: Gateway, name: str, pool: PoolRuntime, now: float, offset: int, limit: int
) -> dict[str, Any]:
    """One pool's state; its members from ``offset``, at most ``limit`` of them; counts cover them all."""
    clients: list[PolicySnapshot] = [c.snapshot(now) for c in pool.clients]
    first = clients[0]
    selections: dict[str, int] = {}
    for c in clients:
        for reason, count in c.selections.items():
            selections[reason] = selections.get(reason, 0) + count
    pooled = [c.pool_size for c in clients if c.pool_size is not None]
    members = []
    states: dict[str, int] = dict.fromkeys(("healthy", "unhealthy", "ejected", "draining"), 0)
    for b in first.backends:
        states[b.state] = states.get(b.state, 0) + 1
    for b in first.backends[offset : offset + limit]:
        record = gateway.membership.record_of(name, b.id)
        members.append(
            {
                "url": b.id,
                "state": b.state,
                "probe_mode": b.probe_mode,
                "weight": b.weight,
                "rif": b.rif,
                "latency_ms": None if b.latency_s is None else round(b.latency_s * 1000, 3),
                "in_flight": pool.backend_in_flight.get(b.id, 0),
                "lease_expires_in_s": _round(gateway.membership.lease_remaining_s(name, b.id)),
                "ejected_for_s": None if b.ejected_until is None else round(b.ejected_until - now, 3),
                "consecutive_failures": b.consecutive_failures,
                "failure_rate": round(b.failure_rate, 4),
                "source": "registered" if record is not None else "static",
                "metadata": dict(record.metadata) if record is not None else {},
            }
        )
    routes = gateway.routes_of(name)
    return {
        "name": name,
        # The pool's own prefix (the short spelling), else its first route's: what a one-prefix page shows.
        "prefix": pool.config.prefix if pool.config.prefix is not None else routes[0] if routes else None,
        "routes": routes,
        "policy": first.policy,
        "in_flight": pool.in_flight,
        "clients": len(clients),
        "pool_size": sum(pooled) if pooled else None,
        "pool_capacity": None if first.pool_capacity is None else first.pool_capacity * len(clients),
        "rif_threshold": first.rif_threshold,
        "panic": any(c.panic for c in clients),
        "selections": selections,
        "probes_in_flight": pool.probes_in_flight,
        "probes_skipped": pool.probes_skipped,
        "member_count": len(first.backends),
        "member_states": states,
        "members_offset": offset,
        "members": members,
        # The last few minutes (rps, p99, backends' shares) for the page's charts; null until first sampled.
        "history": gateway.history.as_json(name, now),
    }


def record_json(record: BackendRecord) -> dict[str, Any]:
    """A registry record as the admin routes answer a write: its lease as a wall-clock time and as seconds left."""
    return Record(
        pool=record.pool,
        url=record.url,
        weight=record.weight,
        metadata=dict(record.metadata),
        lease_expires_at=record.lease_expires_at,
        ttl_s=None if record.lease_expires_at is None else round(record.lease_expires_at - time.time(), 3),
    ).model_dump()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

"""Readiness as data: whether the gateway should get traffic, and why not, pool by pool (``/readyz``).

The gateway is ready when it runs, every *required* pool has a healthy member and a shared registry
has not been unreachable for ``AdminSettings.ready_while_stale_s`` or more. Which pools are required
is ``UpstreamPool.required_for_ready``; by default those with configured upstreams (static or named by
DNS), not those filled only by registration: their backends register through the gateway, and a
readiness-gated load balancer (a Kubernetes Service) would never let a registration reach a gateway
that waits for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prequal_middleware.config import UpstreamPool
from prequal_middleware.core import PolicySnapshot


def pool_requirement(config: UpstreamPool) -> tuple[bool, str]:
    """Whether ``/readyz`` waits for the pool to have a healthy member, and why (a short phrase)."""
    if config.required_for_ready is not None:
        return config.required_for_ready, f"required_for_ready={config.required_for_ready}"
    if config.upstreams:
        return True, "it has configured upstreams"
    return False, "its members join by registration"


@dataclass(frozen=True, slots=True)
class PoolReadiness:
    """One pool's part in readiness: required or not (and why), members and healthy members."""

    name: str
    required: bool
    why: str
    members: int
    healthy: int

    @property
    def has_healthy_member(self) -> bool:
        return self.healthy > 0

    @property
    def problem(self) -> str | None:
        """What keeps the gateway from being ready because of this pool, or None."""
        if self.required and not self.has_healthy_member:
            return f"pool {self.name} has no healthy member"
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "required": self.required,
            "why": self.why,
            "ready": self.has_healthy_member,
            "members": self.members,
            "healthy": self.healthy,
        }


@dataclass(frozen=True, slots=True)
class Readiness:
    """The gateway's readiness: ``ready`` when ``problems`` is empty."""

    running: bool
    pools: tuple[PoolReadiness, ...]
    stale_for_s: float | None
    ready_while_stale_s: float

    @property
    def problems(self) -> list[str]:
        found = [] if self.running else ["the gateway is not running"]
        found.extend(p.problem for p in self.pools if p.problem is not None)
        # A shared registry that is briefly unreachable leaves every gateway serving its last snapshot
        # (fail static); taking them all out of a load balancer at once for it would undo that. Readiness
        # fails only once the snapshot is older than the bound; staleness shows in /backends and the
        # metric from the first second.
        if self.stale_for_s is not None and self.stale_for_s >= self.ready_while_stale_s:
            found.append(f"the registry has been unreachable for {self.stale_for_s:.1f} s")
        return found

    @property
    def ready(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        """The ``/readyz`` body: status, problems (empty when ready), each pool's part, the registry's."""
        return {
            "status": "ready" if self.ready else "not_ready",
            "problems": self.problems,
            "pools": {p.name: p.as_json() for p in self.pools},
            "registry": {
                "stale_for_s": None if self.stale_for_s is None else round(self.stale_for_s, 3),
                "ready_while_stale_s": self.ready_while_stale_s,
            },
        }


def pool_readiness(config: UpstreamPool, snapshot: PolicySnapshot) -> PoolReadiness:
    """One pool's readiness from its first client's snapshot (every client has the same members)."""
    required, why = pool_requirement(config)
    healthy = sum(1 for b in snapshot.backends if b.state == "healthy")
    return PoolReadiness(config.name, required, why, len(snapshot.backends), healthy)

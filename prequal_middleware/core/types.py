"""Value types shared by the sans-IO core: members, outcomes, selections and snapshots.

Everything here is a small immutable record or an enum; nothing does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

BackendId = str
"""A backend is named by the URL it was registered with (``http://10.0.0.5:8000``)."""

SelectionReason = Literal["cold", "hot", "fallback", "panic", "policy"]
"""Why a backend was chosen.

- ``cold``: Prequal, the cold probe with the lowest latency;
- ``hot``: Prequal, every probe was hot, so the lowest RIF;
- ``fallback``: Prequal, fewer than two usable probes, so the fallback rule chose (``PrequalSettings.fallback``:
  the fewest of this client's requests in flight by default, or a uniformly random backend, the paper's rule);
- ``panic``: too few healthy backends, so the choice was made over every member;
- ``policy``: any other policy's ordinary choice.
"""

SELECTION_REASONS: tuple[SelectionReason, ...] = ("cold", "hot", "fallback", "panic", "policy")

BackendState = Literal["healthy", "unhealthy", "ejected", "draining"]
ProbeMode = Literal["probe", "local"]
"""``probe``: the backend answers probes. ``local``: it does not (404 on the probe path), so the
gateway's own view stands in (its in-flight count and the latencies it measures)."""


class Outcome(enum.Enum):
    """How an upstream request ended, as far as load balancing cares."""

    SUCCESS = "success"  # any response that is not a server-side failure (1xx-4xx except 429)
    FAILURE = "failure"  # 5xx or 429: the backend answered, but badly
    CONNECT_ERROR = "connect_error"  # never reached the backend (refused, reset before sending)
    TIMEOUT = "timeout"  # sent, but no answer in time
    CANCELLED = "cancelled"  # the client went away; says nothing about the backend

    @property
    def is_failure(self) -> bool:
        """True for the outcomes that count against a backend's health."""
        return self in _FAILURES

    @classmethod
    def from_status(cls, status: int) -> Outcome:
        """Classify an HTTP status: 5xx and 429 are failures, everything else a success."""
        return cls.FAILURE if status >= 500 or status == 429 else cls.SUCCESS


_FAILURES = frozenset({Outcome.FAILURE, Outcome.CONNECT_ERROR, Outcome.TIMEOUT})


@dataclass(frozen=True, slots=True)
class Member:
    """One backend as the registry sees it.

    Parameters:
        id: the backend's URL, unique in its pool.
        weight: relative share for the policies that have a notion of weight (> 0).
        draining: no new requests; requests in flight finish.
        awaits_health_check: a member that must pass an active health check before it gets any
            traffic (one that joined by registration while the pool runs health checks): until then it
            is neither a candidate nor a choice in panic mode (Envoy's ``ignore_new_hosts_until_first_hc``).
    """

    id: BackendId
    weight: float = 1.0
    draining: bool = False
    awaits_health_check: bool = False

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Member.id must not be empty")
        if not (self.weight > 0 and self.weight < float("inf")):
            raise ValueError(f"Member.weight must be a finite number > 0, got {self.weight!r}")


@dataclass(frozen=True, slots=True)
class Selection:
    """The result of ``Policy.select``.

    ``probes`` are the backends the policy wants probed now (Prequal's per-query probing); the
    caller sends them without waiting for them.
    """

    backend: BackendId
    reason: SelectionReason
    probes: tuple[BackendId, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    """One member's state, for the status page and metrics."""

    id: BackendId
    state: BackendState
    weight: float
    in_flight: int
    probe_mode: ProbeMode
    rif: int | None = None  # last reported requests in flight (probe or local view)
    latency_s: float | None = None  # last latency estimate the policy uses
    ejected_until: float | None = None  # monotonic seconds
    consecutive_failures: int = 0
    failure_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """A policy's state at one instant."""

    policy: str
    backends: tuple[BackendSnapshot, ...]
    selections: dict[str, int] = field(default_factory=dict)
    panic: bool = False
    pool_size: int | None = None  # Prequal only: probes currently pooled
    pool_capacity: int | None = None
    rif_threshold: float | None = None  # Prequal only: the current hot/cold boundary
    probes_requested: int = 0

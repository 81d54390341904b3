"""The testbed's fleet model: replicas with private, heterogeneous, time-varying capacity.

The same model as the simulator's (``prequal_middleware/core/sim_fleet.py``, docs/simulator.md), for real
processes:

- Replica ``i`` has ``slots`` service slots with a FIFO queue behind them. A query holds a slot for
  ``work / speed_i(t)`` seconds (``asyncio.sleep``), the speed sampled when its service starts.
- ``speed_i(t)`` is the replica's *allocation* ``a_i`` (uniform in ``[allocation_min, allocation_max]``)
  while its antagonist is busy, and ``a_i * h_i`` (headroom ``h_i`` uniform in
  ``[headroom_min, headroom_max]``) while it is idle.
- The antagonist is busy on a square wave with a per-replica period, duty cycle and phase, plus short
  random bursts (a Poisson process of ``burst_rate_hz``, each ``burst_min_s``-``burst_max_s`` long).
- Query work (seconds of service at speed 1) is Normal(``work_mu_s``, sigma=``work_mu_s``) truncated at
  0 by redrawing, drawn by the load generator and carried in a request header, so every contender
  serves the same work in the same order.
- Capacity (load 1.0) is ``sum_i slots * a_i / mean_work``: what the fleet guarantees with every
  antagonist busy.

Allocations and headrooms are drawn once per fleet from the seed. Antagonist schedules are drawn per
*schedule key* (the round and the load level), so every contender of one (round, load) meets the same
antagonists from the start of its run (the replicas restart their schedule clock at each run's epoch).
Standard library only.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prequal_middleware.core.load_tracker import WINDOW_SERVICE_TIMES

# The model's pieces shared with the simulator: one definition of the work distribution and its mean.
from prequal_middleware.core.sim_fleet import (
    TRUNCATED_MEAN_FACTOR,
    antagonist_busy,
    replica_model_checks,
    scaled_service_times,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class FleetConfig:
    """Everything the replicas' behaviour depends on (see the module docstring)."""

    replicas: int = 12
    slots: int = 4
    work_mu_s: float = 0.08
    allocation_min: float = 0.6
    allocation_max: float = 1.4
    headroom_min: float = 1.5
    headroom_max: float = 2.0
    antagonist_period_min_s: float = 5.0
    antagonist_period_max_s: float = 30.0
    antagonist_duty_min: float = 0.25
    antagonist_duty_max: float = 0.75
    burst_rate_hz: float = 0.05
    burst_min_s: float = 0.5
    burst_max_s: float = 1.5
    seed: int = 1
    # The last ``sinkholes`` replicas fail every request in ~1 ms (a 503) and add no capacity; they are
    # drawn like the others, after them, so the first ``replicas - sinkholes`` are the same fleet as a
    # run with that many replicas and no sinkholes (the baseline of "no loss of p99").
    sinkholes: int = 0
    # The replicas' latency estimator (``LoadTrackerSettings.window_service_times``): its window is this
    # many median service times (at least 1 s); 0 keeps the fixed 1 s window of before.
    window_service_times: float = WINDOW_SERVICE_TIMES
    specs: tuple[ReplicaSpec, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        checks = (
            ("replicas", self.replicas >= 1),
            ("sinkholes", 0 <= self.sinkholes < self.replicas),
            ("window_service_times", 0 <= self.window_service_times < math.inf),
            *replica_model_checks(self),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"FleetConfig.{name} is out of range: {getattr(self, name)!r}")
        if not self.specs:
            rng = random.Random(f"testbed-fleet:{self.seed}")
            specs = []
            for i in range(self.replicas):
                allocation = rng.uniform(self.allocation_min, self.allocation_max)
                headroom = rng.uniform(self.headroom_min, self.headroom_max)
                specs.append(ReplicaSpec(index=i, allocation=allocation, fast_speed=allocation * headroom))
            object.__setattr__(self, "specs", tuple(specs))

    @property
    def mean_work_s(self) -> float:
        """The mean of the truncated work distribution, in seconds of service at speed 1."""
        return self.work_mu_s * TRUNCATED_MEAN_FACTOR

    @property
    def honest(self) -> int:
        """The replicas that serve (the first ones); the rest are sinkholes."""
        return self.replicas - self.sinkholes

    def is_sinkhole(self, index: int) -> bool:
        return index >= self.honest

    @property
    def capacity_qps(self) -> float:
        """Load 1.0: what the fleet's honest replicas serve with every antagonist busy (sinkholes serve nothing)."""
        return sum(self.slots * s.allocation for s in self.specs[: self.honest]) / self.mean_work_s

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON (the drawn replicas included)."""
        data = asdict(self)
        data["specs"] = [asdict(s) for s in self.specs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetConfig:
        """The inverse of ``to_dict`` (the replicas are drawn again from the seed)."""
        fields = {k: v for k, v in data.items() if k != "specs"}
        return cls(**fields)

    def time_scaled(self, factor: float) -> FleetConfig:
        """This fleet with the service's time constants multiplied by ``factor`` (``sim_fleet.time_scaled``'s
        rule): the work, the antagonists' periods and bursts (their rate divided); the same replicas."""
        return replace(self, **scaled_service_times(self, factor))

    def schedule(self, index: int, key: str, horizon_s: float) -> Antagonist:
        """Replica ``index``'s antagonist for the schedule ``key``, over ``[0, horizon_s]``."""
        rng = random.Random(f"testbed-antagonist:{self.seed}:{key}:{index}")
        busy = antagonist_busy(
            rng,
            horizon_s,
            period_s=(self.antagonist_period_min_s, self.antagonist_period_max_s),
            duty=(self.antagonist_duty_min, self.antagonist_duty_max),
            burst_rate_hz=self.burst_rate_hz,
            burst_s=(self.burst_min_s, self.burst_max_s),
        )
        return Antagonist.merged(busy, horizon_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaSpec:
    """One replica's fixed speeds (per slot): with its antagonist busy, and idle."""

    index: int
    allocation: float
    fast_speed: float


@dataclass(frozen=True, slots=True)
class Antagonist:
    """Busy intervals, merged and sorted; busy outside ``[0, horizon_s]`` (the pessimistic side)."""

    starts: tuple[float, ...]
    ends: tuple[float, ...]
    horizon_s: float

    @classmethod
    def merged(cls, intervals: list[tuple[float, float]], horizon_s: float) -> Antagonist:
        starts: list[float] = []
        ends: list[float] = []
        for start, end in sorted(intervals):
            if end <= start:
                continue
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        return cls(tuple(starts), tuple(ends), horizon_s)

    def busy(self, t: float) -> bool:
        """Is the antagonist busy ``t`` seconds after the epoch?"""
        if t < 0.0 or t >= self.horizon_s:
            return True
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t < self.ends[i]

    def busy_share(self, start: float, end: float) -> float:
        """The share of ``[start, end]`` (within the horizon) the antagonist is busy."""
        if end <= start:
            return 1.0
        total = 0.0
        for s, e in zip(self.starts, self.ends, strict=True):
            total += max(0.0, min(e, end) - max(s, start))
        return total / (end - start)


def mean_speeds(config: FleetConfig, key: str, horizon_s: float, start: float, end: float) -> list[float]:
    """Each replica's time-averaged slot speed over ``[start, end]`` for the schedule ``key``."""
    out = []
    for spec in config.specs:
        share = config.schedule(spec.index, key, horizon_s).busy_share(start, end)
        out.append(share * spec.allocation + (1.0 - share) * spec.fast_speed)
    return out

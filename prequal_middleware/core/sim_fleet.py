"""The fleet model of the discrete-event simulator (``simulator.py``): configuration, replicas, antagonists.

This is the setting of the paper's testbed (Prequal, NSDI '24, section 5; prequal-spec.md sections 10.2
and 11), with the machines' contention made explicit because the paper's antagonists were "whatever we
happen to encounter in the wild":

- Replica ``i`` has ``slots`` concurrent service slots with a FIFO queue behind them. Each slot runs at
  ``speed_i(t)`` units of work per second, sampled when a query starts service.
- ``speed_i(t)`` is the replica's *allocation* ``a_i`` (its guaranteed speed, drawn uniformly from
  ``[allocation_min, allocation_max]``: some replicas are intrinsically slower) while its antagonist is
  busy, and ``a_i * h_i`` (headroom ``h_i`` uniform in ``[headroom_min, headroom_max]``: the machine is
  up to about twice as fast as the allocation) while the antagonist is idle.
- The antagonist is busy on a square wave with a per-replica period (uniform in
  ``[antagonist_period_min_s, antagonist_period_max_s]``), duty cycle (uniform in
  ``[antagonist_duty_min, antagonist_duty_max]``) and phase (uniform over the period), plus short bursts
  arriving as a Poisson process of rate ``burst_rate_hz`` per replica, each lasting
  ``[burst_min_s, burst_max_s]`` (the 1 s bursts of the paper's Fig. 3).
- Query work is Normal(``work_mu_s``, sigma=``work_mu_s``) truncated at 0 by *redrawing* negative draws
  (a true truncated normal), so its mean is ``work_mu_s * (1 + phi(1) / Phi(1)) ~= 1.288 * work_mu_s``.
- Liars (``liars``, default 0; issue 12, item 8): the first ``liars`` replicas answer every probe with
  RIF 0 and latency 0 whatever their load, and serve ``liar_slowdown`` times slower than their draw
  (both speeds divided). Their draws are the same as an honest fleet's, so the honest replicas of a
  lying fleet are exactly those of the honest fleet with the same seed.
- Sinkholes (``sinkholes``, default 0; issue 15): the *last* ``sinkholes`` replicas answer every query
  with a 5xx ``sinkhole_fail_s`` after it arrives, hold no slot, and report RIF 0 and latency 0 in
  probes and piggybacked reports. They add nothing to the capacity, and their draws come after the
  others', so a fleet of ``n`` with ``k`` sinkholes has the arrivals and honest replicas of the fleet of
  ``n - k`` with the same seed: its baseline.
- Capacity (load 1.0) is ``sum_i slots * a_i / mean_work`` (a liar's ``a_i`` after the slowdown, no
  sinkhole's): what the fleet guarantees with every antagonist busy. Above 1.0 the fleet is overloaded against its
  allocation but can still cope if the balancer routes around the replicas whose antagonist is busy.

Standard library only, like the rest of ``prequal_middleware.core``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Protocol, TypedDict

from prequal_middleware.core.load_tracker import LoadTrackerSettings
from prequal_middleware.core.settings import OutlierSettings, PrequalSettings

# E[X | X > 0] for X ~ Normal(mu, mu) is mu * (1 + phi(1) / Phi(1)) ~= 1.2876 * mu.
_PHI_1 = math.exp(-0.5) / math.sqrt(2.0 * math.pi)
_CDF_1 = 0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))
TRUNCATED_MEAN_FACTOR = 1.0 + _PHI_1 / _CDF_1


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    """Everything one simulated run depends on, besides the policy and the load.

    Parameters:
        replicas: server replicas.
        clients: independent clients, each with its own policy instance.
        seconds: simulated seconds of arrivals; queries still open then are drained to their end.
        seed: the one seed every random draw derives from.
        warmup_fraction: queries sent in this first share of ``seconds`` are not measured.
        deadline_s: the client gives up on a query after this long (an error).
        network_delay_s: one-way delay of every query, response and probe.
        idle_tick_s: how often each client asks its policy for idle probes.
        sample_interval_s: how often replica RIF and pool occupancy are sampled (diagnostics only).
        slots, work_mu_s, allocation_*, headroom_*, antagonist_*, burst_*: the fleet model (module docstring).
        liars: how many replicas lie in their probe answers (module docstring); the first ones.
        liar_slowdown: how much slower a liar serves than its drawn speeds.
        sinkholes: how many replicas fail every query fast while reporting idle (module docstring); the last ones.
        sinkhole_fail_s: how long after a query reaches it a sinkhole answers its 5xx.
        attempts: the most attempts per request, the first included (the gateway's ``RetrySettings``):
            a 5xx is retried on a replica not tried yet while the client's retry budget allows; a
            deadline is never retried (the gateway does not resend a request that may have run).
        retry_budget_ratio, retry_budget_min_per_s, retry_budget_window_s: each client's ``RetryBudget``
            (the gateway's ``RetrySettings`` defaults).
        tracker: the settings of every replica's ``LoadTracker``.
        outliers: every client policy's passive health settings (ejection, error aversion).
        prequal: the settings of every ``prequal`` client.
    """

    replicas: int = 100
    clients: int = 100
    seconds: float = 30.0
    seed: int = 1
    warmup_fraction: float = 0.1
    deadline_s: float = 5.0
    network_delay_s: float = 0.0005
    idle_tick_s: float = 0.25
    sample_interval_s: float = 0.25
    slots: int = 4
    work_mu_s: float = 0.2
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
    liars: int = 0
    liar_slowdown: float = 3.0
    sinkholes: int = 0
    sinkhole_fail_s: float = 0.001
    attempts: int = 1
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0
    retry_budget_window_s: float = 10.0
    tracker: LoadTrackerSettings = field(default_factory=LoadTrackerSettings)
    outliers: OutlierSettings = field(default_factory=OutlierSettings)
    prequal: PrequalSettings = field(default_factory=PrequalSettings)

    def __post_init__(self) -> None:
        checks = (
            ("replicas", self.replicas >= 1),
            ("clients", self.clients >= 1),
            ("seconds", 0 < self.seconds < math.inf),
            ("warmup_fraction", 0.0 <= self.warmup_fraction < 1.0),
            ("deadline_s", 0 < self.deadline_s < math.inf),
            ("network_delay_s", 0 <= self.network_delay_s < self.deadline_s),
            ("idle_tick_s", 0 < self.idle_tick_s < math.inf),
            ("sample_interval_s", 0 < self.sample_interval_s < math.inf),
            ("liars", 0 <= self.liars <= self.replicas),
            ("liar_slowdown", 1.0 <= self.liar_slowdown < math.inf),
            ("sinkholes", 0 <= self.sinkholes < self.replicas and self.liars + self.sinkholes <= self.replicas),
            ("sinkhole_fail_s", 0 <= self.sinkhole_fail_s < self.deadline_s),
            ("attempts", self.attempts >= 1),
            ("retry_budget_ratio", 0 <= self.retry_budget_ratio < math.inf),
            ("retry_budget_min_per_s", 0 <= self.retry_budget_min_per_s < math.inf),
            ("retry_budget_window_s", 1 <= self.retry_budget_window_s < math.inf),
            *replica_model_checks(self),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"SimConfig.{name} is out of range: {getattr(self, name)!r}")

    @property
    def mean_work_s(self) -> float:
        """The mean of the truncated work distribution, in seconds of service at speed 1."""
        return self.work_mu_s * TRUNCATED_MEAN_FACTOR

    @property
    def horizon_s(self) -> float:
        """The latest simulated time anything can happen at: the last arrival plus its deadline."""
        return self.seconds + self.deadline_s + 1.0


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One replica's fixed parameters and antagonist schedule."""

    index: int
    id: str
    allocation: float  # speed per slot while the antagonist is busy
    fast_speed: float  # speed per slot while the antagonist is idle
    busy: tuple[tuple[float, float], ...]  # antagonist busy intervals (may overlap), clipped to [0, horizon]
    liar: bool = False  # answers every probe with RIF 0 and latency 0
    sinkhole: bool = False  # fails every query fast, reports RIF 0 and latency 0

    def speed_changes(self) -> list[tuple[float, int]]:
        """``(time, +1 / -1)`` steps of the antagonist's busy count, in time order."""
        steps = [(start, 1) for start, _ in self.busy] + [(end, -1) for _, end in self.busy]
        steps.sort()
        return steps

    def mean_speed(self, start: float, end: float) -> float:
        """The replica's time-averaged slot speed over ``[start, end]``."""
        if end <= start:
            return self.allocation
        busy_time = 0.0
        count = 0
        last = start
        for t, delta in self.speed_changes():
            t = min(max(t, start), end)
            if count > 0:
                busy_time += t - last
            last = t
            count += delta
        if count > 0:
            busy_time += end - last
        busy_share = busy_time / (end - start)
        return busy_share * self.allocation + (1.0 - busy_share) * self.fast_speed


@dataclass(frozen=True, slots=True)
class Fleet:
    """The replicas of one run and the capacity that load 1.0 means."""

    replicas: tuple[ReplicaSpec, ...]
    capacity_qps: float


def build_fleet(config: SimConfig, rng: random.Random) -> Fleet:
    """Draw every replica's allocation, headroom and antagonist schedule from ``rng``, replica by replica."""
    horizon = config.horizon_s
    specs: list[ReplicaSpec] = []
    for i in range(config.replicas):
        allocation = rng.uniform(config.allocation_min, config.allocation_max)
        headroom = rng.uniform(config.headroom_min, config.headroom_max)
        busy = antagonist_busy(
            rng,
            horizon,
            period_s=(config.antagonist_period_min_s, config.antagonist_period_max_s),
            duty=(config.antagonist_duty_min, config.antagonist_duty_max),
            burst_rate_hz=config.burst_rate_hz,
            burst_s=(config.burst_min_s, config.burst_max_s),
        )
        liar = i < config.liars
        if liar:
            allocation /= config.liar_slowdown
        sinkhole = i >= config.replicas - config.sinkholes
        specs.append(ReplicaSpec(i, f"replica-{i:03d}", allocation, allocation * headroom, tuple(busy), liar, sinkhole))
    capacity = sum(config.slots * s.allocation for s in specs if not s.sinkhole) / config.mean_work_s
    return Fleet(tuple(specs), capacity)


def time_scaled(config: SimConfig, factor: float) -> SimConfig:
    """``config`` with the service's time constants multiplied by ``factor``: a slower service, same shape.

    Scaled: the work, the deadline, the antagonist's periods and bursts (the burst rate divided), and the
    simulated seconds (so a run has the same arrivals). Not scaled: what belongs to the clients or the
    network, not to the service (the idle-probe tick, the probes' and reports' ages, the network delay,
    the sampling), the sinkholes' fast failure, and the replicas' ``LoadTracker`` settings: the point of
    a slow fleet is to see how the estimator's window copes with it.
    """
    return replace(
        config,
        seconds=config.seconds * factor,
        deadline_s=config.deadline_s * factor,
        **scaled_service_times(config, factor),
    )


class ServiceTimes(TypedDict):
    """The replica model's time constants (``scaled_service_times``)."""

    work_mu_s: float
    antagonist_period_min_s: float
    antagonist_period_max_s: float
    burst_rate_hz: float
    burst_min_s: float
    burst_max_s: float


def scaled_service_times(model: ReplicaModel, factor: float) -> ServiceTimes:
    """The replica model's time constants multiplied by ``factor`` (the burst rate divided), as keyword
    arguments for ``dataclasses.replace``: the one rule of a slow service for the simulator and the testbed."""
    if not 0 < factor < math.inf:
        raise ValueError(f"the time scale must be a finite number > 0, got {factor!r}")
    return ServiceTimes(
        work_mu_s=model.work_mu_s * factor,
        antagonist_period_min_s=model.antagonist_period_min_s * factor,
        antagonist_period_max_s=model.antagonist_period_max_s * factor,
        burst_rate_hz=model.burst_rate_hz / factor,
        burst_min_s=model.burst_min_s * factor,
        burst_max_s=model.burst_max_s * factor,
    )


class ReplicaModel(Protocol):
    """The replica parameters the simulator and the testbed share (same names, same meaning)."""

    @property
    def slots(self) -> int: ...
    @property
    def work_mu_s(self) -> float: ...
    @property
    def allocation_min(self) -> float: ...
    @property
    def allocation_max(self) -> float: ...
    @property
    def headroom_min(self) -> float: ...
    @property
    def headroom_max(self) -> float: ...
    @property
    def antagonist_period_min_s(self) -> float: ...
    @property
    def antagonist_period_max_s(self) -> float: ...
    @property
    def antagonist_duty_min(self) -> float: ...
    @property
    def antagonist_duty_max(self) -> float: ...
    @property
    def burst_rate_hz(self) -> float: ...
    @property
    def burst_min_s(self) -> float: ...
    @property
    def burst_max_s(self) -> float: ...


def replica_model_checks(c: ReplicaModel) -> tuple[tuple[str, bool], ...]:
    """(field, valid) for the shared replica parameters, for a config's ``__post_init__``."""
    return (
        ("slots", c.slots >= 1),
        ("work_mu_s", 0 < c.work_mu_s < math.inf),
        ("allocation_min", 0 < c.allocation_min <= c.allocation_max < math.inf),
        ("headroom_min", 1.0 <= c.headroom_min <= c.headroom_max < math.inf),
        ("antagonist_period_min_s", 0 < c.antagonist_period_min_s <= c.antagonist_period_max_s < math.inf),
        ("antagonist_duty_min", 0.0 <= c.antagonist_duty_min <= c.antagonist_duty_max <= 1.0),
        ("burst_rate_hz", 0.0 <= c.burst_rate_hz < math.inf),
        ("burst_min_s", 0.0 <= c.burst_min_s <= c.burst_max_s < math.inf),
    )


def antagonist_busy(
    rng: random.Random,
    horizon_s: float,
    *,
    period_s: tuple[float, float],
    duty: tuple[float, float],
    burst_rate_hz: float,
    burst_s: tuple[float, float],
) -> list[tuple[float, float]]:
    """An antagonist's busy intervals over ``[0, horizon_s]`` (unsorted, may overlap).

    A square wave with a period and duty cycle drawn uniformly from the ranges and a random phase, plus
    Poisson bursts of uniformly drawn lengths (prequal-spec.md section 11). Draws from ``rng`` in a fixed
    order, so a seeded ``rng`` gives the same schedule everywhere (the simulator and the testbed).
    """
    period = rng.uniform(*period_s)
    share = rng.uniform(*duty)
    phase = rng.uniform(0.0, period)
    busy: list[tuple[float, float]] = []
    start = phase - period
    while start < horizon_s:
        end = start + share * period
        if end > 0.0 and end > start:
            busy.append((max(0.0, start), min(end, horizon_s)))
        start += period
    if burst_rate_hz > 0:
        t = rng.expovariate(burst_rate_hz)
        while t < horizon_s:
            busy.append((t, min(horizon_s, t + rng.uniform(*burst_s))))
            t += rng.expovariate(burst_rate_hz)
    return busy


def draw_work(rng: random.Random, mu: float) -> float:
    """One query's work: Normal(mu, sigma=mu) truncated at 0 (negative draws are redrawn)."""
    while True:
        work = rng.gauss(mu, mu)
        if work > 0.0:
            return work

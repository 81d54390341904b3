"""A discrete-event simulator of many clients balancing over a fleet with private, time-varying capacity.

It drives the real sans-IO objects exactly as the gateway does: one policy per client from
``create_policy`` and, on every replica, a ``LoadTracker`` answering probes. The fleet (replicas with
slots and FIFO queues, heterogeneous allocations, antagonists) is described in ``sim_fleet.py``.

Per query, at its (Poisson, open-loop) arrival a uniformly random client calls ``policy.select(now)``
(``None`` is a "no backend" error), then ``on_start``; it sends each backend in ``Selection.probes`` a
probe and the query itself. Every message takes ``network_delay_s`` one way. At the replica the query
is counted in by ``tracker.start`` and served by a free slot or queued (FIFO); its service time is
``work / speed`` with the speed at service start. At completion ``tracker.finish`` and, after the
network delay, ``policy.on_finish(..., Outcome.SUCCESS)`` with the end-to-end latency. A probe is
answered from ``tracker.report(now)`` when it reaches the replica (probes are never counted in RIF)
and lands in ``policy.on_probe`` one network delay later (a liar answers RIF 0 and latency 0 whatever
its state: ``SimConfig.liars``). Every ``idle_tick_s`` each client sends the
probes ``policy.idle_probes(now)`` asks for.

Sinkholes (``SimConfig.sinkholes``): a query reaching one is answered with a 5xx ``sinkhole_fail_s``
later, without a slot or the tracker, and every report it gives (probe or piggybacked) is RIF 0 and
latency 0. The client hands the report to ``on_report`` and calls ``on_finish(..., Outcome.FAILURE)``;
then, as the gateway's ``RetrySettings`` would for a retryable failure, it retries the request on a
replica it has not tried (``select(now, exclude=tried)``) if ``attempts`` allow and its
``RetryBudget`` has a retry; otherwise the client sees the failure. The deadline runs from the first
send. Every attempt is counted in ``replica_share`` and ``sinkhole_attempts``.

Deadline: ``deadline_s`` after sending, a query not yet answered is an error; the client calls
``on_finish(..., Outcome.TIMEOUT)``. The replica learns the deadline with the query (as gRPC deadline
propagation does): a query still queued is dropped at once (``tracker.finish(ok=False)``); one in
service runs to completion, occupying its slot, and is finished with ``ok=False``; its result is
discarded.

Measurement: queries *sent* before ``warmup_fraction * seconds`` are not measured. Arrivals stop at
``seconds`` and the run continues until every query has ended, so nothing is censored. Percentiles are
nearest-rank over every measured request, an error counting as ``deadline_s`` (the paper's "TO").

Piggybacked reports: every response carries the replica's report as of its completion (the RIF of
the others in flight, as ``LoadReportingMiddleware`` sends it; a liar's is 0 / 0), handed to
``policy.on_report`` on arrival, before ``on_finish``.

Policies: any name of ``POLICY_CLASSES``; ``prequal_nocheck``: Prequal with
``PrequalSettings.cross_check`` off (reports pooled as they come); ``prequal_probeall``: Prequal with
``report_max_age_s=0`` (every probe on the network, piggybacked reports unused: the paper's rule);
``oracle``: one dispatcher that sees every replica's true queue and speed and sends each query where it
would finish soonest (``sim_oracle.py``): the bound of this fleet model, constructible only here;
``oracle_meanwork``: the same without the works of the queries not yet started (the new one and those
queued), each taken as the mean: how much of the bound is the knowledge of sizes no balancer has;
``prequal_sync``: Prequal in sync mode (``PrequalSettings.mode = "sync"``, which ``SimConfig.prequal``
may also set for every Prequal variant).

Sync mode, as ``PoolRuntime.select_sync`` and the scheduler's ``probe_and_wait`` drive it: at a query's
arrival (and at a retry) the client asks ``policy.sync_plan(now, exclude=tried)`` and probes its
backends (one network delay each way, answered from ``tracker.report`` like any probe); every answer
goes to ``on_probe`` as it lands (pool, RIF history; late ones too). Once ``plan.wait_for`` answers of
this round came, or ``sync_wait_s`` after the plan, ``policy.select_sync(plan, answered, now, tried)``
chooses; ``None`` (fewer than two answers) leaves it to ``select``, the asynchronous choice, whose probes
are sent as usual. A chosen sync query sends no other probe (the real ``select_sync`` asks for none);
idle probes go on. The query is sent when the round ends: its latency and its deadline run from its
arrival, so they include the wait; the latency given to ``on_finish`` does not (the gateway's attempt
starts after the wait). A deadline reached during the wait ends the query without an attempt.

Randomness: one ``random.Random(seed)`` derives separate streams for arrivals, client choice, work,
the fleet, timer phases and each client's policy, so every policy of a run sees the same arrivals,
work and antagonists (common random numbers) and the same seed gives the same result.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from prequal_middleware.core.load_tracker import LoadTracker, LoadTrackerSettings, RequestTicket
from prequal_middleware.core.policies import POLICY_CLASSES, create_policy
from prequal_middleware.core.policy import BasePolicy
from prequal_middleware.core.prequal import PrequalPolicy, SyncPlan
from prequal_middleware.core.retry_budget import RetryBudget
from prequal_middleware.core.sim_fleet import Fleet, SimConfig, build_fleet, draw_work, time_scaled
from prequal_middleware.core.sim_oracle import OracleView, oracle_choose
from prequal_middleware.core.types import Member, Outcome

__all__ = [
    "ORACLE",
    "ORACLE_MEANWORK",
    "SIM_POLICIES",
    "Fleet",
    "RunResult",
    "SimConfig",
    "fleet_for",
    "percentile",
    "simulate",
    "time_scaled",
]

# The simulator's policy names: the built-in ones, Prequal without the probe cross-check, and Prequal
# that probes every target it draws (no piggybacked reports), and the oracle (sim_oracle.py), which no
# gateway can build: it reads the replicas' true state.
ORACLE = "oracle"
ORACLE_MEANWORK = "oracle_meanwork"
SIM_POLICIES: tuple[str, ...] = (
    *POLICY_CLASSES,
    "prequal_nocheck",
    "prequal_probeall",
    "prequal_sync",
    ORACLE,
    ORACLE_MEANWORK,
)

# Event kinds; an event is the tuple (time, sequence number, kind, a, b).
(
    _ARRIVAL,
    _AT_REPLICA,
    _COMPLETE,
    _RESPONSE,
    _DEADLINE,
    _PROBE,
    _PROBE_REPLY,
    _IDLE,
    _SPEED,
    _SAMPLE,
    _FAILED,
    _SYNC_PROBE,
    _SYNC_REPLY,
    _SYNC_WAIT,
) = range(14)
# Query outcomes.
_PENDING, _OK, _TIMED_OUT, _FAILED_OUT, _NO_BACKEND = 0, 1, 2, 3, 4


class _Query:
    """One request; its current attempt's replica, send time and ticket (a retry reuses it).

    ``sent`` is the arrival: the sync mode's wait comes before the first attempt. ``plan`` is the sync
    round being waited for (``None`` otherwise), ``answered`` its backends that answered so far, and
    ``waited`` the time spent in sync rounds.
    """

    __slots__ = (
        "client",
        "replica",
        "sent",
        "attempt_sent",
        "tried",
        "work",
        "ticket",
        "outcome",
        "started",
        "measured",
        "plan",
        "answered",
        "waited",
    )

    def __init__(self, client: int, sent: float, work: float, measured: bool) -> None:
        self.client = client
        self.replica = -1
        self.sent = sent
        self.attempt_sent = sent
        self.tried: tuple[str, ...] = ()  # the backends of the failed attempts, for the retry's exclude
        self.work = work
        self.ticket: RequestTicket | None = None
        self.outcome = _PENDING
        self.started = False
        self.measured = measured
        self.plan: SyncPlan | None = None
        self.answered: list[str] = []
        self.waited = 0.0


class _Replica:
    __slots__ = ("index", "tracker", "free", "queue", "busy", "speed", "allocation", "fast_speed", "liar", "sinkhole")

    def __init__(
        self,
        index: int,
        allocation: float,
        fast_speed: float,
        slots: int,
        liar: bool = False,
        sinkhole: bool = False,
        tracker: LoadTrackerSettings | None = None,
    ) -> None:
        self.index = index
        self.liar = liar
        self.sinkhole = sinkhole
        self.tracker = LoadTracker(tracker)
        self.free = slots
        self.queue: deque[_Query] = deque()
        self.busy = 0  # the antagonist's busy count
        self.speed = fast_speed
        self.allocation = allocation
        self.fast_speed = fast_speed


@dataclass(frozen=True, slots=True)
class RunResult:
    """The measurements of one (policy, load) run. Latencies are in milliseconds."""

    policy: str
    load: float
    rate_qps: float
    requests: int  # measured: sent after the warm-up
    successes: int
    errors: int  # deadline_errors + no_backend_errors + failed
    deadline_errors: int
    no_backend_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    probes_per_query: float
    fallback_rate: float  # share of selections that were Prequal's fallback (too few usable probes)
    mean_pool_size: float | None  # Prequal only: fresh probes pooled, averaged over clients and samples
    rif_p50: float  # replica RIF sampled every sample_interval_s
    rif_p99: float
    rif_max: int
    replica_share: tuple[float, ...]  # share of measured attempts routed to each replica
    share_speed_corr: float  # Pearson correlation of replica_share with each replica's mean speed
    events: int
    liar_share: float = 0.0  # share of measured requests routed to lying replicas
    # Prequal only, per probe answer received after the warm-up: how often the cross-check raised the
    # reported RIF to the client's own in flight, and the reported latency to measured / ratio.
    rif_correction_rate: float | None = None
    latency_correction_rate: float | None = None
    # Sinkholes and retries (all over measured requests): attempts made, retries among them, attempts
    # that reached a sinkhole, and requests whose failure the client saw (in ``errors`` too).
    attempts: int = 0
    retries: int = 0
    sinkhole_attempts: int = 0
    failed: int = 0
    p99_ok_ms: float = 0.0  # over the successful requests only
    p999_ok_ms: float = 0.0
    # Probe answers from honest replicas after the warm-up, and the share of them with latency 0 (no
    # fresh sample near the replica's RIF: the estimator's window).
    honest_answers: int = 0
    zero_latency_share: float = 0.0
    # Sync mode (``prequal_sync``): the time waited for sync answers, in ms per measured request, and
    # the share of the measured sync rounds with too few answers in time (the asynchronous choice decided).
    sync_wait_ms: float = 0.0
    sync_fallback_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _streams(seed: int, clients: int) -> tuple[list[random.Random], list[int]]:
    master = random.Random(seed)
    streams = [random.Random(master.getrandbits(64)) for _ in range(5)]  # arrivals, clients, work, fleet, timers
    policy_master = random.Random(master.getrandbits(64))
    return streams, [policy_master.getrandbits(64) for _ in range(clients)]


def fleet_for(config: SimConfig) -> Fleet:
    """The fleet every run with ``config`` simulates (its capacity defines load 1.0)."""
    return build_fleet(config, _streams(config.seed, config.clients)[0][3])


def simulate(config: SimConfig, policy: str, load: float) -> RunResult:
    """Run ``policy`` on every client at ``load`` x capacity; deterministic in ``config.seed``."""
    if not 0 < load < math.inf:
        raise ValueError(f"load must be a finite number > 0, got {load!r}")
    (arrival_rng, client_rng, work_rng, fleet_rng, timer_rng), policy_seeds = _streams(config.seed, config.clients)
    fleet = build_fleet(config, fleet_rng)
    rate = load * fleet.capacity_qps
    ids = [spec.id for spec in fleet.replicas]
    index_of = {backend: i for i, backend in enumerate(ids)}
    replicas = [
        _Replica(i, spec.allocation, spec.fast_speed, config.slots, spec.liar, spec.sinkhole, config.tracker)
        for i, spec in enumerate(fleet.replicas)
    ]
    lies = [spec.liar or spec.sinkhole for spec in fleet.replicas]
    honest = config.replicas - config.sinkholes  # the sinkholes are the last replicas
    members = [Member(backend) for backend in ids]
    # The oracle replaces the clients' policies: one dispatcher for the fleet, seeded like client 0's policy.
    oracle = policy in (ORACLE, ORACLE_MEANWORK)
    mean_work = config.mean_work_s if policy == ORACLE_MEANWORK else None
    oracle_rng = random.Random(policy_seeds[0])
    policies = [] if oracle else [_policy(policy, config, random.Random(s)) for s in policy_seeds]
    for p in policies:
        p.set_members(members, 0.0)
    max_attempts = config.attempts
    budgets = (
        [
            RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s, config.retry_budget_window_s)
            for _ in policies
        ]
        if max_attempts > 1
        else []
    )
    prequals = [p for p in policies if isinstance(p, PrequalPolicy)]
    prequal_pools = [p.pool for p in prequals]
    # Every client runs the same settings; in sync mode every policy is Prequal (``prequals`` is ``policies``).
    sync = bool(prequals) and prequals[0].settings.mode == "sync"
    sync_wait = prequals[0].settings.sync_wait_s if sync else 0.0
    corrections_at_warm: tuple[int, int] | None = None
    answers = 0  # probe answers received after the warm-up

    end = config.seconds
    warm = config.warmup_fraction * end
    delay = config.network_delay_s
    deadline = config.deadline_s
    tick = config.idle_tick_s
    mu = config.work_mu_s
    n_clients = config.clients
    max_age = config.prequal.max_age_s

    heap: list[tuple[Any, ...]] = []
    seq = itertools.count()
    push = heapq.heappush
    pop = heapq.heappop
    for spec, replica in zip(fleet.replicas, replicas, strict=True):
        for t, delta in spec.speed_changes():
            if t <= 0.0:
                replica.busy += delta
            else:
                push(heap, (t, next(seq), _SPEED, replica, delta))
        replica.speed = replica.allocation if replica.busy > 0 else replica.fast_speed
    views = [OracleView(config.slots, replica.speed, exact=mean_work is None) for replica in replicas] if oracle else []
    for c in range(n_clients):
        push(heap, (timer_rng.uniform(0.0, tick), next(seq), _IDLE, c, None))
    push(heap, (warm, next(seq), _SAMPLE, None, None))
    push(heap, (arrival_rng.expovariate(rate), next(seq), _ARRIVAL, None, None))

    latencies: list[float] = []
    deadline_errors = no_backend = requests = probes_sent = fallbacks = 0
    attempts = retries = failed = honest_answers = zero_answers = 0
    sync_rounds = sync_fallbacks = 0
    waited = 0.0  # in sync rounds, over measured requests
    routed = [0] * len(replicas)
    rif_samples: list[int] = []
    pool_samples: list[int] = []
    pending = 0
    events = 0
    success = Outcome.SUCCESS
    timeout = Outcome.TIMEOUT
    failure = Outcome.FAILURE
    fail_s = config.sinkhole_fail_s

    def dispatch(q: _Query, client: BasePolicy, sel: Any, t: float) -> None:
        """Send an attempt of ``q`` where ``sel`` says, with its probes, as the gateway does."""
        nonlocal probes_sent, fallbacks, attempts
        backend = sel.backend
        r = q.replica = index_of[backend]
        q.attempt_sent = t
        client.on_start(backend, t)
        for target in sel.probes:
            push(heap, (t + delay, next(seq), _PROBE, q.client, index_of[target]))
        if q.measured:
            routed[r] += 1
            attempts += 1
            probes_sent += len(sel.probes)
            if sel.reason == "fallback":
                fallbacks += 1
        push(heap, (t + delay, next(seq), _AT_REPLICA, q, None))

    def answer(r: int, t: float) -> tuple[int, float]:
        """Replica ``r``'s probe answer at ``t`` (a liar's or a sinkhole's is idle and instant)."""
        nonlocal honest_answers, zero_answers
        if lies[r]:
            return 0, 0.0
        rif, latency = replicas[r].tracker.report(t)
        if t >= warm:
            honest_answers += 1
            zero_answers += latency == 0.0
        return rif, latency

    def ask_sync(q: _Query, client: PrequalPolicy, t: float) -> None:
        """Sync mode: probe the plan of an attempt of ``q`` and wait (``PoolRuntime.select_sync``)."""
        nonlocal probes_sent, sync_rounds
        plan = q.plan = client.sync_plan(t, q.tried)
        if q.measured:
            sync_rounds += 1
            probes_sent += len(plan.probes)
        if not plan.probes:  # fewer than two candidates: nothing to wait for
            settle(q, client, t)
            return
        q.answered.clear()  # a retry's round starts afresh
        for target in plan.probes:
            push(heap, (t + delay, next(seq), _SYNC_PROBE, q, (plan, index_of[target])))
        push(heap, (t + sync_wait, next(seq), _SYNC_WAIT, q, plan))

    def settle(q: _Query, client: PrequalPolicy, t: float) -> None:
        """End ``q``'s sync round at ``t``: HCL on its answers, else the asynchronous choice; send or fail."""
        nonlocal sync_fallbacks, waited, retries, pending, failed, no_backend
        plan = q.plan
        assert plan is not None
        q.plan = None
        wait = t - plan.started
        q.waited += wait
        sel = client.select_sync(plan, q.answered, t, q.tried)
        if sel is None:
            sel = client.select(t, q.tried)
            sync_fallbacks += q.measured
        if q.measured:
            waited += wait
        if sel is not None:
            if q.tried and q.measured:
                retries += 1
            dispatch(q, client, sel, t)
            return
        pending -= 1
        if q.tried:  # a retry with no replica left: the client sees the failure
            q.outcome = _FAILED_OUT
            failed += q.measured
        else:
            q.outcome = _NO_BACKEND
            no_backend += q.measured

    while heap:
        t, _, kind, a, b = pop(heap)
        if t >= end and pending == 0:
            break
        events += 1
        if kind == _PROBE_REPLY:  # no probes with the oracle
            policies[a].on_probe(ids[b[0]], t, b[1], b[2])
            if t >= warm:
                answers += 1
        elif kind == _PROBE:
            rif, latency = answer(b, t)
            push(heap, (t + delay, next(seq), _PROBE_REPLY, a, (b, rif, latency)))
        elif kind == _SYNC_REPLY:  # a = the query, b = (its round, replica, rif, latency)
            plan, r, rif, latency = b
            policies[a.client].on_probe(ids[r], t, rif, latency)  # a late answer feeds the pool too
            if t >= warm:
                answers += 1
            if a.plan is plan:
                a.answered.append(ids[r])
                if len(a.answered) >= plan.wait_for:
                    settle(a, prequals[a.client], t)
        elif kind == _SYNC_PROBE:
            rif, latency = answer(b[1], t)
            push(heap, (t + delay, next(seq), _SYNC_REPLY, a, (b[0], b[1], rif, latency)))
        elif kind == _SYNC_WAIT:
            if a.plan is b:  # still waiting for this round: its time is up
                settle(a, prequals[a.client], t)
        elif kind == _ARRIVAL:
            if t >= end:
                continue
            push(heap, (t + arrival_rng.expovariate(rate), next(seq), _ARRIVAL, None, None))
            c = int(client_rng.random() * n_clients)
            measured = t >= warm
            q = _Query(c, t, draw_work(work_rng, mu), measured)
            if measured:
                requests += 1
            if oracle:
                # It knows which replicas are sinkholes (the last ones) and never sends there.
                work = q.work if mean_work is None else mean_work
                r = q.replica = oracle_choose(views[:honest], t, t + delay, work, oracle_rng)
                views[r].route(q, t, t + delay, work)
                if measured:
                    routed[r] += 1
                    attempts += 1
                pending += 1
                push(heap, (t + delay, next(seq), _AT_REPLICA, q, None))
                push(heap, (t + deadline, next(seq), _DEADLINE, q, None))
                continue
            client = policies[c]
            if budgets:
                budgets[c].record_request(t)
            if sync:
                pending += 1
                push(heap, (t + deadline, next(seq), _DEADLINE, q, None))
                ask_sync(q, prequals[c], t)
                continue
            sel = client.select(t)
            if sel is None:
                if measured:
                    no_backend += 1
                continue
            dispatch(q, client, sel, t)
            pending += 1
            push(heap, (t + deadline, next(seq), _DEADLINE, q, None))
        elif kind == _AT_REPLICA:
            if a.outcome != _PENDING:
                continue
            replica = replicas[a.replica]
            if replica.sinkhole:
                push(heap, (t + fail_s + delay, next(seq), _FAILED, a, a.replica))
                continue
            a.ticket = replica.tracker.start(t)
            if replica.free:
                replica.free -= 1
                a.started = True
                push(heap, (t + a.work / replica.speed, next(seq), _COMPLETE, a, replica))
                if oracle:
                    views[a.replica].start(a, t + a.work / replica.speed)
            else:
                replica.queue.append(a)
        elif kind == _COMPLETE:
            b.tracker.finish(a.ticket, t, a.outcome == _PENDING)
            if oracle:
                views[a.replica].finish(a)
            if a.outcome == _PENDING:
                report = (0, 0.0) if b.liar else b.tracker.report(t)  # a sinkhole completes nothing
                push(heap, (t + delay, next(seq), _RESPONSE, a, report))
            queue = b.queue
            while queue:
                nxt = queue.popleft()
                if nxt.outcome == _PENDING:
                    nxt.started = True
                    push(heap, (t + nxt.work / b.speed, next(seq), _COMPLETE, nxt, b))
                    if oracle:
                        views[nxt.replica].start(nxt, t + nxt.work / b.speed)
                    break
            else:
                b.free += 1
        elif kind == _RESPONSE:
            if a.outcome != _PENDING:
                continue
            a.outcome = _OK
            pending -= 1
            latency = t - a.sent
            if not oracle:
                backend_id = ids[a.replica]
                policies[a.client].on_report(backend_id, t, b[0], b[1])
                policies[a.client].on_finish(backend_id, t, latency - a.waited, success)
            if a.measured:
                latencies.append(latency)
        elif kind == _FAILED:  # a sinkhole's 5xx reached the client
            if a.outcome != _PENDING:
                continue  # the deadline came first
            client = policies[a.client]
            backend_id = ids[b]
            client.on_report(backend_id, t, 0, 0.0)
            client.on_finish(backend_id, t, t - a.attempt_sent, failure)
            a.tried += (backend_id,)
            if len(a.tried) < max_attempts and budgets[a.client].try_withdraw(t):
                if sync:
                    ask_sync(a, prequals[a.client], t)
                    continue
                sel = client.select(t, a.tried)
                if sel is not None:
                    if a.measured:
                        retries += 1
                    dispatch(a, client, sel, t)
                    continue
            a.outcome = _FAILED_OUT
            pending -= 1
            if a.measured:
                failed += 1
        elif kind == _DEADLINE:
            if a.outcome != _PENDING:
                continue
            a.outcome = _TIMED_OUT
            pending -= 1
            if oracle:
                if not a.started:
                    views[a.replica].drop(a)
            elif a.plan is not None:  # still waiting for sync answers: no attempt in flight
                if a.measured:
                    waited += t - a.plan.started
                a.plan = None
            else:
                policies[a.client].on_finish(ids[a.replica], t, deadline, timeout)
            if a.measured:
                deadline_errors += 1
            if a.ticket is not None and not a.started:  # queued: dropped now, skipped when dequeued
                replicas[a.replica].tracker.finish(a.ticket, t, False)
        elif kind == _IDLE:
            if t >= end or oracle:
                continue
            probes = policies[a].idle_probes(t)
            for target in probes:
                push(heap, (t + delay, next(seq), _PROBE, a, index_of[target]))
            if t >= warm:
                probes_sent += len(probes)
            push(heap, (t + tick, next(seq), _IDLE, a, None))
        elif kind == _SPEED:
            a.busy += b
            a.speed = a.allocation if a.busy > 0 else a.fast_speed
            if oracle:
                views[a.index].set_speed(a.speed)
        elif kind == _SAMPLE:
            if t >= end:
                continue
            if corrections_at_warm is None:
                corrections_at_warm = _corrections(prequals)
            rif_samples.extend(replica.tracker.rif for replica in replicas)
            horizon = t - max_age
            for pool in prequal_pools:
                pool_samples.append(sum(1 for e in pool if e.received_at >= horizon))
            push(heap, (t + config.sample_interval_s, next(seq), _SAMPLE, None, None))

    errors = deadline_errors + no_backend + failed
    ok = sorted(latencies)
    ordered = ok + [deadline] * errors
    rif_samples.sort()
    total_routed = sum(routed)
    share = tuple(n / total_routed if total_routed else 0.0 for n in routed)
    speeds = [spec.mean_speed(warm, end) for spec in fleet.replicas]
    rif_rate = latency_rate = None
    if prequals and answers:
        rif_now, latency_now = _corrections(prequals)
        rif_then, latency_then = corrections_at_warm or (0, 0)
        rif_rate, latency_rate = (rif_now - rif_then) / answers, (latency_now - latency_then) / answers
    return RunResult(
        policy=policy,
        load=load,
        rate_qps=rate,
        requests=requests,
        successes=len(latencies),
        errors=errors,
        deadline_errors=deadline_errors,
        no_backend_errors=no_backend,
        p50_ms=1000.0 * percentile(ordered, 0.50),
        p90_ms=1000.0 * percentile(ordered, 0.90),
        p99_ms=1000.0 * percentile(ordered, 0.99),
        p999_ms=1000.0 * percentile(ordered, 0.999),
        mean_ms=1000.0 * sum(ordered) / len(ordered) if ordered else 0.0,
        probes_per_query=probes_sent / requests if requests else 0.0,
        fallback_rate=fallbacks / total_routed if total_routed else 0.0,
        mean_pool_size=sum(pool_samples) / len(pool_samples) if pool_samples else None,
        rif_p50=percentile(rif_samples, 0.50),
        rif_p99=percentile(rif_samples, 0.99),
        rif_max=rif_samples[-1] if rif_samples else 0,
        replica_share=share,
        share_speed_corr=_correlation(list(share), speeds),
        events=events,
        liar_share=sum(n for n, spec in zip(share, fleet.replicas, strict=True) if spec.liar),
        rif_correction_rate=rif_rate,
        latency_correction_rate=latency_rate,
        attempts=attempts,
        retries=retries,
        sinkhole_attempts=sum(n for n, spec in zip(routed, fleet.replicas, strict=True) if spec.sinkhole),
        failed=failed,
        p99_ok_ms=1000.0 * percentile(ok, 0.99),
        p999_ok_ms=1000.0 * percentile(ok, 0.999),
        honest_answers=honest_answers,
        zero_latency_share=zero_answers / honest_answers if honest_answers else 0.0,
        sync_wait_ms=1000.0 * waited / requests if requests else 0.0,
        sync_fallback_rate=(sync_fallbacks / sync_rounds if sync_rounds else 0.0) if sync else None,
    )


def _policy(name: str, config: SimConfig, rng: random.Random) -> BasePolicy:
    outliers = config.outliers
    if name == "prequal_nocheck":
        return PrequalPolicy(replace(config.prequal, cross_check=False), rng=rng, outliers=outliers)
    if name == "prequal_probeall":
        return PrequalPolicy(replace(config.prequal, report_max_age_s=0.0), rng=rng, outliers=outliers)
    if name == "prequal_sync":
        return PrequalPolicy(replace(config.prequal, mode="sync"), rng=rng, outliers=outliers)
    return create_policy(name, rng=rng, prequal=config.prequal, outliers=outliers)


def _corrections(prequals: Sequence[PrequalPolicy]) -> tuple[int, int]:
    return sum(p.rif_corrections for p in prequals), sum(p.latency_corrections for p in prequals)


def _correlation(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0

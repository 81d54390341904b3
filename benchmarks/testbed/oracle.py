"""The fleet model's bound for a testbed run, replayed offline: the simulator's oracle on the same queries.

A testbed run's load is a pure function of its seed key (``loadgen.schedule``: arrival times and works),
and so is every replica's speed (``FleetConfig.schedule``: the antagonist). So the simulator's oracle
(``prequal_middleware/core/sim_oracle.py``: it sees every replica's true queue and speed and sends each
query where it would finish soonest) can be run over exactly the queries a contender got, through the
testbed replica's own model: FIFO slots, a query served for ``work / speed`` at the speed of its start,
one whose deadline passed while it queued answered at once without service, the sinkholes never chosen
(the oracle knows they fail). No network, no balancer process, no event loop: a bound no contender can
beat by its policy. What separates a contender from it is its policy's excess *plus* the real path's
cost (loopback hops, the balancer's and the replicas' event loops, sleeps that overshoot); the replay of
round robin over the same queries (``replay(..., policy="round_robin")``) against the measured round
robin shows how large that path cost is (docs/benchmarks.md).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prequal_middleware.core.sim_oracle import OracleView, oracle_choose

from .fleet import FleetConfig
from .loadgen import LoadSpec, schedule
from .metrics import cdf_points, percentile

REPLAY_POLICIES = ("oracle", "round_robin")


@dataclass(frozen=True, slots=True)
class Replay:
    """Latencies of the measured queries (ms; errors at the deadline) and the errors among them."""

    latencies_ms: list[float]
    errors: int

    def summary(self) -> dict[str, float | int]:
        ordered = self.latencies_ms
        return {
            "requests": len(ordered),
            "errors": self.errors,
            "p50_ms": percentile(ordered, 0.50),
            "p90_ms": percentile(ordered, 0.90),
            "p99_ms": percentile(ordered, 0.99),
            "p999_ms": percentile(ordered, 0.999),
        }


def replay(
    fleet: FleetConfig,
    key: str,
    horizon_s: float,
    times: Sequence[float],
    works: Sequence[float],
    deadline_s: float,
    window: tuple[float, float],
    *,
    policy: str = "oracle",
    seed: int = 1,
) -> Replay:
    """Serve the queries ``(times[i], works[i])`` on the honest replicas of ``fleet`` under the antagonist
    schedule ``key``, each sent where ``policy`` says: ``oracle`` (soonest projected finish) or
    ``round_robin``. Latencies of the queries sent within ``window`` (seconds after the epoch)."""
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"replay policy must be one of {REPLAY_POLICIES}, got {policy!r}")
    if len(times) != len(works):
        raise ValueError("times and works differ in length")
    n = fleet.honest
    specs = fleet.specs[:n]
    schedules = [fleet.schedule(i, key, horizon_s) for i in range(n)]

    def speed(i: int, t: float) -> float:
        return specs[i].allocation if schedules[i].busy(t) else specs[i].fast_speed

    views = [OracleView(fleet.slots, speed(i, 0.0)) for i in range(n)]
    waiting: list[deque[int]] = [deque() for _ in range(n)]
    running = [0] * n
    ends: list[tuple[float, int, int]] = []  # (end, replica, query), a heap
    finish = [math.nan] * len(times)
    rng = random.Random(f"testbed-oracle:{seed}:{key}")
    turn = itertools.count()

    def start_waiting(i: int, now: float) -> None:
        while waiting[i] and running[i] < fleet.slots:
            q = waiting[i].popleft()
            if now > times[q] + deadline_s:  # the replica answers 504 without service; the slot stays free
                views[i].drop(q)
                finish[q] = math.inf
                continue
            end = now + works[q] / speed(i, now)
            views[i].start(q, end)
            running[i] += 1
            finish[q] = end
            heapq.heappush(ends, (end, i, q))

    def finish_until(t: float) -> None:
        while ends and ends[0][0] <= t:
            end, i, q = heapq.heappop(ends)
            views[i].finish(q)
            running[i] -= 1
            start_waiting(i, end)

    for q, (t, work) in enumerate(zip(times, works, strict=True)):
        finish_until(t)
        if policy == "oracle":
            for i, view in enumerate(views):
                view.set_speed(speed(i, t))
            i = oracle_choose(views, t, t, work, rng)
        else:
            i = next(turn) % n
        views[i].route(q, t, t, work)
        waiting[i].append(q)
        start_waiting(i, t)
    finish_until(math.inf)

    start, stop = window
    deadline_ms = 1000.0 * deadline_s
    latencies: list[float] = []
    errors = 0
    for t, end in zip(times, finish, strict=True):
        if not start <= t < stop:
            continue
        latency_ms = 1000.0 * (end - t)
        if latency_ms > deadline_ms:
            errors += 1
            latency_ms = deadline_ms
        latencies.append(latency_ms)
    latencies.sort()
    return Replay(latencies, errors)


def replay_runs(
    fleet: FleetConfig,
    loads: Sequence[float],
    rounds: int,
    seed: int,
    warmup_s: float,
    seconds: float,
    deadline_s: float,
    *,
    keep_latencies: bool = False,
) -> list[dict[str, Any]]:
    """The replays of every (round, load) a benchmark ran, oracle and round robin, as the runner keys them
    (``latencies_ms`` too with ``keep_latencies``)."""
    out: list[dict[str, Any]] = []
    horizon = warmup_s + seconds + deadline_s + 10.0  # the runner's horizon
    for round_index in range(rounds):
        for load in loads:
            key = f"round{round_index}:load{load:g}"
            spec = LoadSpec(
                targets=["-"],
                rate=load * fleet.capacity_qps,
                warmup_s=warmup_s,
                seconds=seconds,
                deadline_s=deadline_s,
                work_mu_s=fleet.work_mu_s,
                seed_key=f"{seed}:{key}",
                out="",
            )
            times, _, works = schedule(spec)
            for policy in REPLAY_POLICIES:
                result = replay(
                    fleet, key, horizon, times, works, deadline_s, (warmup_s, warmup_s + seconds), policy=policy
                )
                row: dict[str, Any] = {"policy": policy, "load": load, "round": round_index, **result.summary()}
                if keep_latencies:
                    row["latencies_ms"] = result.latencies_ms
                out.append(row)
    return out


def oracle_points(document: dict[str, Any], key: str) -> list[tuple[float, float]]:
    """(load, median over rounds of ``key``) of the oracle replayed over each run's queries (``oracle.py``)."""
    by_load: dict[float, list[float]] = {}
    for r in document.get("replays", []):
        if r["policy"] == "oracle" and r.get(key) is not None:
            by_load.setdefault(float(r["load"]), []).append(float(r[key]))
    return [(load, statistics.median(values)) for load, values in sorted(by_load.items())]


def oracle_cdf(document: dict[str, Any], load: float) -> list[list[float]]:
    """The oracle's latency CDF at ``load`` (``[quantile, ms]``, every round pooled), replayed again from the
    document's configuration: the replay is a pure function of it, so nothing beyond the config is stored."""
    config = document["config"]
    fleet = FleetConfig.from_dict(config["fleet"])
    rounds = sorted({int(r["round"]) for r in document.get("replays", []) if r["load"] == load})
    if not rounds:
        return []
    pooled: list[float] = []
    for run in replay_runs(
        fleet,
        [load],
        max(rounds) + 1,
        config["seed"],
        config["warmup_s"],
        config["seconds"],
        config["deadline_s"],
        keep_latencies=True,
    ):
        if run["policy"] == "oracle" and run["round"] in rounds:
            pooled.extend(run["latencies_ms"])
    return cdf_points(sorted(pooled))

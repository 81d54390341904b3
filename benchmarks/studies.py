"""The paper's evaluation, replayed on the fleet simulator: ``python -m benchmarks.studies``.

Three studies of Prequal, NSDI '24 (prequal-spec.md sections 10.4 and 10.5), and one of small fleets, each
run over several seeds and reported as median [min-max]. Every run is one
``prequal_middleware.core.simulator.simulate`` call (the model is in docs/simulator.md). Every study also
runs the simulator's ``oracle`` (core/sim_oracle.py) on the same fleet, seed and load: the floor the
policies are read against. Its rows are in the JSON's ``results`` and ``summary`` (``variant`` "oracle"),
in the tables, and black and dashed in the plots; every other record has ``p99_excess_ms`` and
``p999_excess_ms``, its figure minus the oracle's of the same seed and load.

- ``compare`` (section 5.2, Fig. 7): every policy in ``POLICY_CLASSES``, plus Prequal at the paper's
  Q_RIF of 0.75 for that figure, at 0.7 and 0.9 of capacity.
- ``qrif`` (section 5.3, Fig. 9): Prequal's Q_RIF over the paper's 14 values with half the replicas
  doing twice the work, at 75% of the fleet's capacity. ``SimConfig`` has no option for slow replicas;
  ``two_speed_fleet`` builds that fleet from its public knobs.
- ``probes`` (section 5.3, Fig. 8): Prequal's r_probe from 4 down to 1/2 with r_remove = 0.25, with
  ``max_reuse`` 32 (Eq. 1's budget uncapped), 2 (the default) and max(2, ceil(2 / r_probe)), at 1.3x the
  allocation (the paper's 1.5x is beyond what this fleet can serve; docs/benchmarks.md, "Simulator
  studies") and at 0.9.
- ``pool`` (issue 15, section 3): small fleets (6, 12, 20 and 36 replicas) behind few clients (4, a gateway's
  processes) at 0.7, 0.9 and 1.2: Prequal with the fixed pool of 16 against the pool derived from the fleet
  size, ``min(16, max(2, n // 3))`` (``fleet_pool_size``). With m = 16, Eq. 1's reuse budget is 1 for
  n <= 24 (docs/simulator.md, "Small fleets and the pool size").

A progress line per run goes to stderr and the tables to stdout. Each study writes
``<json-dir>/studies-<study>.json`` (``{"config": ..., "results": [one per run], "summary": [one per
cell]}``) and a PNG into ``--img-dir`` (matplotlib is optional: without it the plots are skipped).

    python -m benchmarks.studies --jobs 2                 # all three studies, 100 x 100, seeds 1-5
    python -m benchmarks.studies --studies qrif --paper-rate --seeds 1-3
    python -m benchmarks.studies --quick                  # 40 replicas x 10 clients, 5 s, one seed
    python -m benchmarks.studies --studies pool --seeds 1-3 --seconds 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prequal_middleware.core import POLICY_CLASSES, PrequalSettings, reuse_budget
from prequal_middleware.core.simulator import ORACLE, RunResult, SimConfig, fleet_for, simulate

from .harness.progress import progress

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("compare", "qrif", "probes", "pool")
DEFAULT_STUDIES = ("compare", "qrif", "probes")  # the paper's; ``pool`` runs when asked for

COMPARE_LOADS = (0.7, 0.9)
PAPER_COMPARE_Q_RIF = 0.75  # Prequal's Q_RIF in the paper's Fig. 7
PAPER_Q_RIF = (0.0, 0.35, 0.39, 0.43, 0.48, 0.53, 0.59, 0.66, 0.73, 0.81, 0.90, 0.99, 0.999, 1.0)
QRIF_LOAD = 0.75  # of the two-speed fleet's time-averaged capacity
SLOW_FACTOR = 2.0  # slow replicas do this many times the work
PROBE_RATES: tuple[tuple[str, float], ...] = (
    ("4", 4.0),
    ("2√2", 2.0 * math.sqrt(2.0)),
    ("2", 2.0),
    ("√2", math.sqrt(2.0)),
    ("1", 1.0),
    ("1/√2", 1.0 / math.sqrt(2.0)),
    ("1/2", 0.5),
)
PROBE_REMOVALS = 0.25
# max_reuse: 32 leaves Eq. 1 uncapped at every rate of the sweep (it peaks at 11.8); 2 is the library's default;
# "scaled" is max(2, ceil((1 + drift) / r_probe)), which this study finds best at low probe rates.
PROBE_CAPS = ("eq1", "default", "scaled")
CAP_LABELS = {"eq1": "32 (Eq. 1)", "default": "2 (default)", "scaled": "max(2, ⌈2/r⌉)"}
# 1.3: the highest load (in steps of 0.1) where Prequal has no deadline errors in this model; the paper's 1.5x
# is beyond what the fleet serves. 0.9: a moderate load, for contrast.
PROBE_LOADS = (1.3, 0.9)

# The pool study: small fleets behind a gateway's few processes. 36 checks the range 25-47, where m = 16
# gives Eq. 1 a budget above the cap (2) and the derived pool is smaller than 16 too.
POOL_FLEETS = (6, 12, 20, 36)
POOL_CLIENTS = 4
POOL_LOADS = (0.7, 0.9, 1.2)
POOL_FIXED = 16  # the paper's m and the library's default (kept: docs/simulator.md)
POOL_RULES = ("fixed", "derived")
POOL_LABELS = {"fixed": "m = 16", "derived": "m = min(16, max(2, n // 3))"}

QUICK = {"replicas": 40, "clients": 10, "seconds": 5.0}
QUICK_SEEDS = (1,)
DEFAULT_SEEDS = (1, 2, 3, 4, 5)
PAPER_RATE: dict[str, Any] = {"slots": 8, "work_mu_s": 0.1}  # ~4x the query rate per replica, p50 ~80 ms
METRICS = (
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "errors",
    "probes_per_query",
    "fallback_rate",
    "mean_pool_size",
    "rif_p99",
    "share_speed_corr",
    "p99_excess_ms",
    "p999_excess_ms",
    "p99_vs_fixed_ms",
    "p999_vs_fixed_ms",
)


# --- the runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One simulation: ``simulate(config, policy, sim_load)``; ``fields`` go into its JSON record.

    ``copies`` are further field sets this very run stands for: a ``probes`` cell whose reuse budget
    is the same under several ``max_reuse`` rules is simulated once and reported under each.
    """

    study: str
    label: str
    config: SimConfig
    policy: str
    sim_load: float
    fields: dict[str, Any]
    copies: tuple[dict[str, Any], ...] = field(default=())


def execute(run: Run) -> tuple[RunResult, float]:
    """Simulate one run; returns the result and the wall time (top-level, so worker processes can call it)."""
    started = time.perf_counter()
    result = simulate(run.config, run.policy, run.sim_load)
    return result, time.perf_counter() - started


def make_record(result: RunResult, fields: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The JSON record of one run: ``fields`` (seed, swept parameters), the headline numbers, diagnostics."""
    data = result.to_dict()
    share = data.pop("replica_share")
    n = len(share)
    record: dict[str, Any] = {"policy": result.policy, "load": result.load, **fields}
    for key in ("requests", "errors", "p50_ms", "p90_ms", "p99_ms", "p999_ms"):
        record[key] = data.pop(key)
    data.pop("policy")
    data["sim_load"] = data.pop("load")  # the load passed to simulate(): a fraction of the allocation
    record.update(data)
    record["share_min_x_n"] = min(share) * n if n else 0.0
    record["share_max_x_n"] = max(share) * n if n else 0.0
    record["wall_s"] = round(wall_s, 3)
    return record


def run_all(runs: Sequence[Run], jobs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Execute ``runs`` (in ``jobs`` processes when > 1); records in the order of ``runs``, copies after each."""
    outcomes: list[tuple[RunResult, float] | None] = [None] * len(runs)
    total = len(runs)

    def report(done: int, index: int) -> None:
        run = runs[index]
        outcome = outcomes[index]
        assert outcome is not None
        result, wall = outcome
        log(
            f"[{done}/{total}] {run.study} {run.label} seed={run.fields['seed']}: requests={result.requests} "
            f"errors={result.errors} p99={result.p99_ms:.0f}ms wall={wall:.1f}s"
        )

    if jobs <= 1:
        for i, run in enumerate(runs):
            outcomes[i] = execute(run)
            report(i + 1, i)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as executor:
            futures = {executor.submit(execute, run): i for i, run in enumerate(runs)}
            for done, future in enumerate(as_completed(futures), 1):
                index = futures[future]
                outcomes[index] = future.result()
                report(done, index)
    records: list[dict[str, Any]] = []
    for run, outcome in zip(runs, outcomes, strict=True):
        assert outcome is not None
        result, wall = outcome
        records.append(make_record(result, run.fields, wall))
        records.extend(make_record(result, {**run.fields, **copy}, wall) for copy in run.copies)
    return records


def with_prequal(config: SimConfig, **changes: Any) -> SimConfig:
    return dataclasses.replace(config, prequal=dataclasses.replace(config.prequal, **changes))


# --- the studies ---------------------------------------------------------------------------------


def compare_runs(base: SimConfig, seeds: Sequence[int]) -> list[Run]:
    """Section 5.2: every policy (Prequal also at Q_RIF 0.75) at 0.7 and 0.9; all see the same arrivals."""
    runs: list[Run] = []
    variants: list[tuple[str, str, float | None]] = [
        (name, name, base.prequal.q_rif if name == "prequal" else None) for name in POLICY_CLASSES
    ]
    variants.insert(1, (f"prequal q={PAPER_COMPARE_Q_RIF:g}", "prequal", PAPER_COMPARE_Q_RIF))
    variants.append((ORACLE, ORACLE, None))
    for seed in seeds:
        for load in COMPARE_LOADS:
            for variant, policy, q_rif in variants:
                config = dataclasses.replace(base, seed=seed)
                if q_rif is not None:
                    config = with_prequal(config, q_rif=q_rif)
                fields = {"seed": seed, "variant": variant, "q_rif": q_rif}
                runs.append(Run("compare", f"{variant} load={load:g}", config, policy, load, fields))
    return runs


def two_speed_fleet(config: SimConfig, slow_factor: float = SLOW_FACTOR) -> SimConfig:
    """Replicas of two speeds, about half of each, from ``SimConfig``'s public knobs (it has no slow-replica option).

    Every allocation is 1 and every headroom ``slow_factor``. Each antagonist has duty 0.5 and a period of
    10^6 s with a uniform phase, so over a run of seconds it is busy throughout (speed 1: the slow replicas,
    doing ``slow_factor`` times the work of a fast one) or idle throughout (speed ``slow_factor``), each with
    probability about 1/2. The short random bursts of the default fleet are kept: they slow a fast replica
    for about a second now and then. ``slow_replicas`` counts the slow ones of a seed.
    """
    return dataclasses.replace(
        config,
        allocation_min=1.0,
        allocation_max=1.0,
        headroom_min=slow_factor,
        headroom_max=slow_factor,
        antagonist_period_min_s=1e6,
        antagonist_period_max_s=1e6,
        antagonist_duty_min=0.5,
        antagonist_duty_max=0.5,
    )


def fleet_speeds(config: SimConfig) -> tuple[list[float], list[float]]:
    """Each replica's allocation and its mean slot speed over the measured window."""
    replicas = fleet_for(config).replicas
    warm = config.warmup_fraction * config.seconds
    return [r.allocation for r in replicas], [r.mean_speed(warm, config.seconds) for r in replicas]


def slow_replicas(config: SimConfig, slow_factor: float = SLOW_FACTOR) -> int:
    """How many replicas of a ``two_speed_fleet`` run slow (mean speed nearer 1 than ``slow_factor``)."""
    return sum(1 for speed in fleet_speeds(config)[1] if speed < (1.0 + slow_factor) / 2.0)


def qrif_runs(base: SimConfig, seeds: Sequence[int], load: float = QRIF_LOAD) -> list[Run]:
    """Section 5.3: Q_RIF over the paper's values on a two-speed fleet at ``load`` of its real capacity.

    The simulator's load 1.0 is the allocation (every replica at speed 1); this fleet serves about 1.5x
    that on average, so each seed runs at ``load`` x its own mean-speed / allocation ratio.
    """
    runs: list[Run] = []
    for seed in seeds:
        config = two_speed_fleet(dataclasses.replace(base, seed=seed))
        allocations, speeds = fleet_speeds(config)
        factor = sum(speeds) / sum(allocations)
        slow = slow_replicas(config)
        for q in PAPER_Q_RIF:
            fields = {
                "seed": seed,
                "load": load,
                "variant": "prequal",
                "q_rif": q,
                "slow_replicas": slow,
                "capacity_factor": factor,
            }
            runs.append(Run("qrif", f"q_rif={q:g}", with_prequal(config, q_rif=q), "prequal", load * factor, fields))
        fields = {"seed": seed, "load": load, "variant": ORACLE, "q_rif": None, "slow_replicas": slow}
        runs.append(Run("qrif", ORACLE, config, ORACLE, load * factor, {**fields, "capacity_factor": factor}))
    return runs


def cap_for(rule: str, settings: PrequalSettings, r_probe: float) -> int:
    """``max_reuse`` under a ``PROBE_CAPS`` rule."""
    if rule == "eq1":
        return 32
    if rule == "default":
        return PrequalSettings().max_reuse
    if rule == "scaled":
        return max(2, math.ceil((1.0 + settings.drift) / r_probe - 1e-9))
    raise ValueError(f"unknown cap rule {rule!r}")


def budget_profile(settings: PrequalSettings, n: int, r_probe: float, cap: int) -> tuple[float, ...]:
    """The reuse budget for every fleet size outlier ejection can leave (n/2 to n): equal profiles, equal runs."""
    m, drift = settings.pool_size, settings.drift
    return tuple(reuse_budget(m, k, r_probe, PROBE_REMOVALS, drift, cap) for k in range(max(1, n // 2), n + 1))


def probe_runs(base: SimConfig, seeds: Sequence[int], loads: Sequence[float] = PROBE_LOADS) -> list[Run]:
    """Section 5.3: r_probe from 4 to 1/2 with r_remove 0.25, under each ``PROBE_CAPS`` rule for ``max_reuse``.

    Cap rules that give the same reuse budget are simulated once (the simulator is deterministic) and
    reported under each rule, with ``shared_run`` set.
    """
    runs: list[Run] = []
    pq = base.prequal
    n = base.replicas
    for seed in seeds:
        for load in loads:
            for label, r_probe in PROBE_RATES:
                groups: dict[tuple[float, ...], list[tuple[str, int]]] = {}
                for rule in PROBE_CAPS:
                    cap = cap_for(rule, pq, r_probe)
                    groups.setdefault(budget_profile(pq, n, r_probe, cap), []).append((rule, cap))
                for members in groups.values():
                    (rule, cap), others = members[0], members[1:]
                    fields = {
                        "seed": seed,
                        "load": load,
                        "variant": "prequal",
                        "r_probe": r_probe,
                        "r_probe_label": label,
                        "r_remove": PROBE_REMOVALS,
                        "cap_rule": rule,
                        "max_reuse": cap,
                        "b_reuse": reuse_budget(pq.pool_size, n, r_probe, PROBE_REMOVALS, pq.drift, cap),
                        "shared_run": bool(others),
                    }
                    copies = tuple({"cap_rule": other, "max_reuse": other_cap} for other, other_cap in others)
                    config = with_prequal(
                        dataclasses.replace(base, seed=seed),
                        probes_per_query=r_probe,
                        removals_per_query=PROBE_REMOVALS,
                        max_reuse=cap,
                    )
                    text = f"r_probe={label} max_reuse={cap} ({'/'.join(r for r, _ in members)}) load={load:g}"
                    runs.append(Run("probes", text, config, "prequal", load, fields, copies))
            fields = {"seed": seed, "load": load, "variant": ORACLE, "r_probe": None, "r_probe_label": None}
            fields.update({"cap_rule": None, "max_reuse": None, "b_reuse": None, "shared_run": False})
            runs.append(
                Run("probes", f"{ORACLE} load={load:g}", dataclasses.replace(base, seed=seed), ORACLE, load, fields)
            )
    return runs


def fleet_pool_size(n: int) -> int:
    """The pool size derived from the fleet size: ``min(16, max(2, n // 3))`` (issue 15, section 3).

    With the default rates (r_probe 3, r_remove 1, drift 1, max_reuse 2), n // 3 is the largest pool for
    which Eq. 1 is defined and within the cap: (1 - m/n) * 3 - 1 >= 1 exactly when m <= n/3. It is 16,
    the paper's m, from n = 48 up; 2 is the fewest probes HCL chooses between.
    """
    return min(POOL_FIXED, max(2, n // 3))


def pool_size_for(rule: str, n: int) -> int:
    """The pool size of a ``POOL_RULES`` rule for a fleet of ``n``."""
    if rule == "fixed":
        return POOL_FIXED
    if rule == "derived":
        return fleet_pool_size(n)
    raise ValueError(f"unknown pool rule {rule!r}")


def pool_runs(
    base: SimConfig,
    seeds: Sequence[int],
    fleets: Sequence[int] = POOL_FLEETS,
    loads: Sequence[float] = POOL_LOADS,
    clients: int = POOL_CLIENTS,
) -> list[Run]:
    """Issue 15, section 3: the fixed pool of 16 against the derived one, and the oracle, per fleet size and load.

    Both pool sizes are passed explicitly, so the study means the same whatever the library's default.
    Rules that give the same pool size (n >= 48) are simulated once and reported under each.
    """
    runs: list[Run] = []
    pq = base.prequal
    for seed in seeds:
        for n in fleets:
            config = dataclasses.replace(base, seed=seed, replicas=n, clients=clients)
            for load in loads:
                common = {"seed": seed, "replicas": n, "clients": clients, "load": load}
                groups: dict[int, list[str]] = {}
                for rule in POOL_RULES:
                    groups.setdefault(pool_size_for(rule, n), []).append(rule)
                for m, rules in groups.items():
                    budget = reuse_budget(m, n, pq.probes_per_query, pq.removals_per_query, pq.drift, pq.max_reuse)
                    fields = {**common, "variant": rules[0], "pool_size": m, "b_reuse": budget}
                    fields["shared_run"] = len(rules) > 1
                    copies = tuple({"variant": other} for other in rules[1:])
                    text = f"n={n} m={m} ({'/'.join(rules)}) load={load:g}"
                    runs.append(Run("pool", text, with_prequal(config, pool_size=m), "prequal", load, fields, copies))
                fields = {**common, "variant": ORACLE, "pool_size": None, "b_reuse": None, "shared_run": False}
                runs.append(Run("pool", f"n={n} {ORACLE} load={load:g}", config, ORACLE, load, fields))
    return runs


# --- against the oracle --------------------------------------------------------------------------


def _cell_of(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a record shares with the oracle run it is read against: seed, load simulated, fleet size."""
    return (record["seed"], record["sim_load"], record.get("replicas"))


def add_oracle_excess(records: Sequence[dict[str, Any]]) -> None:
    """Give every non-oracle record ``p99_excess_ms`` and ``p999_excess_ms``: minus the oracle's of its cell."""
    oracles = {_cell_of(r): r for r in records if r["policy"] == ORACLE}
    for record in records:
        oracle = oracles.get(_cell_of(record))
        if oracle is None or record["policy"] == ORACLE:
            continue
        for metric in ("p99_ms", "p999_ms"):
            record[metric.replace("_ms", "_excess_ms")] = record[metric] - oracle[metric]


def add_pool_deltas(records: Sequence[dict[str, Any]]) -> None:
    """Pool study: each ``derived`` record gets ``p99_vs_fixed_ms``, ``p999_vs_fixed_ms`` (same seed, fleet, load)."""
    fixed = {_cell_of(r): r for r in records if r.get("variant") == "fixed"}
    for record in records:
        base = fixed.get(_cell_of(record))
        if record.get("variant") != "derived" or base is None:
            continue
        for metric in ("p99_ms", "p999_ms"):
            record[metric.replace("_ms", "_vs_fixed_ms")] = record[metric] - base[metric]


# --- summaries and tables ------------------------------------------------------------------------

CELL_KEYS = {
    "compare": ("load", "variant"),
    "qrif": ("variant", "q_rif"),
    "probes": ("load", "variant", "r_probe_label", "cap_rule"),
    "pool": ("replicas", "load", "variant"),
}


def summarize(records: Iterable[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per cell (records sharing ``keys``, in first-seen order): median, min and max over seeds."""
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in records:
        cells.setdefault(tuple(record.get(k) for k in keys), []).append(record)
    rows: list[dict[str, Any]] = []
    for cell, members in cells.items():
        row: dict[str, Any] = dict(zip(keys, cell, strict=True))
        first = members[0]
        for extra in ("policy", "variant", "q_rif", "r_probe", "max_reuse", "b_reuse", "pool_size", "clients"):
            if extra in first and extra not in row:
                row[extra] = first[extra]
        row["seeds"] = [m["seed"] for m in members]
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                row[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        rows.append(row)
    return rows


def _ms(value: float, deadline_ms: float) -> str:
    return "TO" if value >= deadline_ms else f"{value:.0f}"


def _stat(row: dict[str, Any], metric: str, fmt: Callable[[float], str], spread: bool = True) -> str:
    stat = row.get(metric)
    if stat is None:
        return "-"
    median = fmt(stat["median"])
    if not spread or stat["min"] == stat["max"]:
        return median
    return f"{median} [{fmt(stat['min'])}-{fmt(stat['max'])}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right_from: int) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def _excess(row: dict[str, Any], metric: str) -> str:
    """A row's figure minus the oracle's, median [min-max] over the seeds (signed); "-" for the oracle itself."""
    return _stat(row, metric, lambda v: f"{v:+.0f}")


def format_compare(summary: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    def ms(v: float) -> str:
        return _ms(v, deadline_ms)

    def count(v: float) -> str:
        return f"{v:g}"

    rows = [
        (
            f"{row['load']:g}",
            row["variant"],
            _stat(row, "p50_ms", ms, spread=False),
            _stat(row, "p90_ms", ms),
            _stat(row, "p99_ms", ms),
            _stat(row, "p999_ms", ms),
            _stat(row, "errors", count),
            _excess(row, "p99_excess_ms"),
            _excess(row, "p999_excess_ms"),
        )
        for row in summary
    ]
    header = ("load", "policy", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors", "p99-or", "p999-or")
    return _table(header, rows, 2)


def format_qrif(summary: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    def ms(v: float) -> str:
        return _ms(v, deadline_ms)

    rows = [
        (
            ORACLE if row["variant"] == ORACLE else f"{row['q_rif']:g}",
            _stat(row, "p50_ms", ms, spread=False),
            _stat(row, "p90_ms", ms, spread=False),
            _stat(row, "p99_ms", ms),
            _stat(row, "p999_ms", ms),
            _stat(row, "errors", lambda v: f"{v:g}"),
            _stat(row, "rif_p99", lambda v: f"{v:.0f}", spread=False),
            _excess(row, "p99_excess_ms"),
        )
        for row in summary
    ]
    return _table(("Q_RIF", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors", "RIF p99", "p99-or"), rows, 1)


def format_probes(summary: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    def ms(v: float) -> str:
        return _ms(v, deadline_ms)

    def prequal_cells(row: dict[str, Any]) -> tuple[str, ...]:
        if row["variant"] == ORACLE:
            return (ORACLE, "", "", "")
        return (row["r_probe_label"], CAP_LABELS[row["cap_rule"]], str(row["max_reuse"]), f"{row['b_reuse']:.2f}")

    rows = [
        (
            f"{row['load']:g}",
            *prequal_cells(row),
            _stat(row, "probes_per_query", lambda v: f"{v:.2f}", spread=False),
            _stat(row, "p99_ms", ms),
            _stat(row, "p999_ms", ms),
            _stat(row, "errors", lambda v: f"{v:g}"),
            _stat(row, "fallback_rate", lambda v: f"{100 * v:.1f}%", spread=False),
            _stat(row, "mean_pool_size", lambda v: f"{v:.1f}", spread=False),
            _stat(row, "rif_p99", lambda v: f"{v:.0f}", spread=False),
            _excess(row, "p99_excess_ms"),
        )
        for row in summary
    ]
    header = (
        "load",
        "r_probe",
        "cap rule",
        "max_reuse",
        "b_reuse",
        "probes/q",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "fallback",
        "pool",
        "RIF p99",
        "p99-or",
    )
    return _table(header, rows, 3)


def format_pool(summary: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    def ms(v: float) -> str:
        return _ms(v, deadline_ms)

    def signed(v: float) -> str:
        return f"{v:+.0f}"

    rows = [
        (
            str(row["replicas"]),
            f"{row['load']:g}",
            ORACLE if row["variant"] == ORACLE else POOL_LABELS[row["variant"]],
            "" if row.get("pool_size") is None else str(row["pool_size"]),
            "" if row.get("b_reuse") is None else f"{row['b_reuse']:.2f}",
            _stat(row, "p99_ms", ms),
            _stat(row, "p999_ms", ms),
            _stat(row, "errors", lambda v: f"{v:g}"),
            _excess(row, "p99_excess_ms"),
            _excess(row, "p999_excess_ms"),
            _stat(row, "p99_vs_fixed_ms", signed),
            _stat(row, "p999_vs_fixed_ms", signed),
            _stat(row, "fallback_rate", lambda v: f"{100 * v:.1f}%", spread=False),
            _stat(row, "mean_pool_size", lambda v: f"{v:.1f}", spread=False),
        )
        for row in summary
    ]
    header = (
        "n",
        "load",
        "pool",
        "m",
        "b_reuse",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "p99-or",
        "p999-or",
        "p99 vs 16",
        "p999 vs 16",
        "fallback",
        "pooled",
    )
    return _table(header, rows, 4)


FORMATTERS: dict[str, Callable[[Sequence[dict[str, Any]], float], str]] = {
    "compare": format_compare,
    "qrif": format_qrif,
    "probes": format_probes,
    "pool": format_pool,
}


# --- plots ---------------------------------------------------------------------------------------


def _spread(rows: Sequence[dict[str, Any]], metric: str) -> tuple[list[float], list[float], list[float]]:
    return (
        [row[metric]["median"] for row in rows],
        [row[metric]["min"] for row in rows],
        [row[metric]["max"] for row in rows],
    )


def oracle_rows(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The oracle's summary rows: the floor every plot draws (black, dashed)."""
    return [row for row in summary if row.get("variant") == ORACLE]


def policy_rows(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every summary row but the oracle's."""
    return [row for row in summary if row.get("variant") != ORACLE]


def _oracle_level(ax: Any, value: float, label: str | None, **style: Any) -> None:
    from benchmarks import plotting

    ax.axhline(value, linewidth=1.2, label=label, **{**plotting.ORACLE_STYLE, **style})


def plot_compare(summary: Sequence[dict[str, Any]], deadline_ms: float, path: Path, title: str) -> Path:
    from benchmarks import plotting

    plt = plotting.pyplot()
    policies = policy_rows(summary)
    oracles = oracle_rows(summary)
    variants = list(dict.fromkeys(row["variant"] for row in policies))
    loads = list(dict.fromkeys(row["load"] for row in policies))
    fig, ax = plt.subplots(figsize=(8.5, 4.0))
    width = 0.8 / len(loads)
    for j, load in enumerate(loads):
        rows = [next(r for r in policies if r["load"] == load and r["variant"] == v) for v in variants]
        median, low, high = _spread(rows, "p99_ms")
        xs = [i + (j - (len(loads) - 1) / 2) * width for i in range(len(variants))]
        below = [m - lo for m, lo in zip(median, low, strict=True)]
        above = [h - m for m, h in zip(median, high, strict=True)]
        bars = ax.bar(xs, median, width, yerr=[below, above], capsize=2, label=f"load {load:g}")
        for oracle in (r for r in oracles if r["load"] == load):
            # The floor at this load, in the bars' colour, dashed: one level per load.
            color = bars.patches[0].get_facecolor()
            value = oracle["p99_ms"]["median"]
            _oracle_level(ax, value, f"oracle, load {load:g} ({value:.0f} ms)", color=color)
    plotting.deadline_line(ax, deadline_ms)
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set_ylabel("p99 latency, ms (median, min-max over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="center left", fontsize=8)
    return plotting.save(fig, path)


def plot_qrif(summary: Sequence[dict[str, Any]], deadline_ms: float, path: Path, title: str) -> Path:
    from benchmarks import plotting

    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.0))
    rows = policy_rows(summary)
    xs = list(range(len(rows)))
    for metric, label in (("p99_ms", "p99"), ("p999_ms", "p99.9")):
        plotting.band(ax, xs, *_spread(rows, metric), label=label)
    for oracle in oracle_rows(summary):
        _oracle_level(ax, oracle["p99_ms"]["median"], "oracle p99")
        _oracle_level(ax, oracle["p999_ms"]["median"], "oracle p99.9", linestyle=":")
    plotting.deadline_line(ax, deadline_ms)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{row['q_rif']:g}" for row in rows], rotation=45)
    ax.set_xlabel("Q_RIF (0 = RIF only, 1 = latency only)")
    ax.set_ylabel("latency, ms (median, min-max band)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return plotting.save(fig, path)


def plot_probes(summary: Sequence[dict[str, Any]], deadline_ms: float, path: Path, title: str) -> Path:
    from benchmarks import plotting

    plt = plotting.pyplot()
    policies = policy_rows(summary)
    loads = list(dict.fromkeys(row["load"] for row in policies))
    fig, axes = plt.subplots(len(loads), 2, figsize=(10.0, 3.6 * len(loads)), squeeze=False)
    ticks = {rate: label for label, rate in PROBE_RATES}
    for (ax, ax_pool), load in zip(axes, loads, strict=True):
        for rule in dict.fromkeys(row["cap_rule"] for row in policies):
            rows = [row for row in policies if row["load"] == load and row["cap_rule"] == rule]
            xs = [row["r_probe"] for row in rows]
            label = f"max_reuse {CAP_LABELS[rule]}"
            plotting.band(ax, xs, *_spread(rows, "p99_ms"), label=label)
            ax_pool.plot(xs, [row["mean_pool_size"]["median"] for row in rows], marker="o", markersize=4, label=label)
        for oracle in (r for r in oracle_rows(summary) if r["load"] == load):
            _oracle_level(ax, oracle["p99_ms"]["median"], "oracle")
        plotting.deadline_line(ax, deadline_ms, max(row["p99_ms"]["max"] for row in policies if row["load"] == load))
        for axis in (ax, ax_pool):
            axis.set_xscale("log", base=2)
            axis.set_xticks(list(ticks), list(ticks.values()))
            axis.minorticks_off()
            axis.invert_xaxis()
            axis.set_xlabel("probes per query (r_probe), r_remove = 0.25")
        ax.set_ylabel(f"load {load:g}: p99 ms (median, min-max)")
        ax_pool.set_ylabel("fresh probes in the pool (mean)")
        ax.legend(fontsize=7)
        ax_pool.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return plotting.save(fig, path)


def plot_pool(summary: Sequence[dict[str, Any]], deadline_ms: float, path: Path, title: str) -> Path:
    """p99 and p99.9 against load, one panel per fleet size: each pool rule and the oracle (black, dashed)."""
    from benchmarks import plotting

    plt = plotting.pyplot()
    fleets = list(dict.fromkeys(row["replicas"] for row in summary))
    fig, axes = plt.subplots(2, len(fleets), figsize=(3.2 * len(fleets), 6.4), squeeze=False, constrained_layout=True)
    for column, n in enumerate(fleets):
        panels = (axes[0][column], axes[1][column])
        for ax, metric, name in zip(panels, ("p99_ms", "p999_ms"), ("p99", "p99.9"), strict=True):
            for variant in dict.fromkeys(row["variant"] for row in summary):
                rows = [row for row in summary if row["replicas"] == n and row["variant"] == variant]
                if not rows:
                    continue
                xs = [row["load"] for row in rows]
                if variant == ORACLE:
                    plotting.band(ax, xs, *_spread(rows, metric), label=ORACLE, **plotting.ORACLE_STYLE)
                else:
                    m = rows[0]["pool_size"]
                    plotting.band(ax, xs, *_spread(rows, metric), label=f"{variant}: m = {m}")
            plotting.deadline_line(ax, deadline_ms, max(r[metric]["max"] for r in summary if r["replicas"] == n))
            ax.set_title(f"n = {n}: {name} (ms)", fontsize=9)
            if metric == "p999_ms":
                ax.set_xlabel("load (fraction of the allocation)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return plotting.save(fig, path)


PLOTTERS: dict[str, tuple[str, Callable[[Sequence[dict[str, Any]], float, Path, str], Path]]] = {
    "compare": ("compare-p99", plot_compare),
    "qrif": ("qrif", plot_qrif),
    "probes": ("probes", plot_probes),
    "pool": ("pool", plot_pool),
}


# --- command line --------------------------------------------------------------------------------


def _seeds(text: str) -> list[int]:
    """``1-5`` or ``1,3,7`` (or both: ``1-3,9``)."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                seeds.extend(range(first, last + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 1-5 or 1,2,3, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return list(dict.fromkeys(seeds))


def _studies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(n not in STUDIES for n in names):
        raise argparse.ArgumentTypeError(f"studies must be among {','.join(STUDIES)}, got {text!r}")
    return list(dict.fromkeys(names))


def _loads(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None
    if not values or any(not 0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _sizes(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.studies",
        description="The paper's section 5.2 and 5.3 studies on the fleet simulator (see docs/benchmarks.md).",
    )
    p.add_argument(
        "--studies",
        type=_studies,
        default=list(DEFAULT_STUDIES),
        help=f"comma list of {','.join(STUDIES)} [{','.join(DEFAULT_STUDIES)}]",
    )
    p.add_argument("--seeds", type=_seeds, help="e.g. 1-5 or 1,2,3 [1-5; --quick 1]")
    p.add_argument(
        "--seconds", type=float, help=f"simulated seconds per run [{d.seconds:g}; --quick {QUICK['seconds']:g}]"
    )
    p.add_argument("--replicas", type=int, help=f"[{d.replicas}; --quick {QUICK['replicas']}]")
    p.add_argument("--clients", type=int, help=f"[{d.clients}; --quick {QUICK['clients']}]")
    p.add_argument("--quick", action="store_true", help="a small fleet, short runs, one seed (all studies < 1 min)")
    p.add_argument(
        "--paper-rate",
        action="store_true",
        help="8 slots and work mu 0.1 s: ~4x the per-replica query rate, as in the paper (runs ~4x longer)",
    )
    p.add_argument(
        "--qrif-load", type=float, default=QRIF_LOAD, help=f"qrif: fraction of real capacity [{QRIF_LOAD:g}]"
    )
    p.add_argument(
        "--probe-loads",
        type=_loads,
        default=list(PROBE_LOADS),
        help=f"probes: loads, comma list [{','.join(f'{x:g}' for x in PROBE_LOADS)}]",
    )
    p.add_argument(
        "--pool-fleets",
        type=_sizes,
        default=list(POOL_FLEETS),
        help=f"pool: fleet sizes, comma list [{','.join(map(str, POOL_FLEETS))}]",
    )
    p.add_argument(
        "--pool-loads",
        type=_loads,
        default=list(POOL_LOADS),
        help=f"pool: loads, comma list [{','.join(f'{x:g}' for x in POOL_LOADS)}]",
    )
    p.add_argument("--pool-clients", type=int, default=POOL_CLIENTS, help=f"pool: clients [{POOL_CLIENTS}]")
    p.add_argument("--jobs", type=int, default=1, help="worker processes [1]")
    p.add_argument("--json-dir", type=Path, default=REPO / "benchmarks" / "results", help="[benchmarks/results]")
    p.add_argument("--img-dir", type=Path, help="where the PNGs go [docs/img; --quick: the --json-dir]")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="no simulation: plot these studies-*.json files into --img-dir (the study is in each file)",
    )
    return p


def base_config(args: argparse.Namespace) -> SimConfig:
    def pick(name: str, fallback: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return QUICK[name] if args.quick else fallback

    d = SimConfig()
    config = SimConfig(
        replicas=pick("replicas", d.replicas), clients=pick("clients", d.clients), seconds=pick("seconds", d.seconds)
    )
    if args.paper_rate:
        config = dataclasses.replace(config, **PAPER_RATE)
    return config


def _study_runs(study: str, base: SimConfig, seeds: Sequence[int], args: argparse.Namespace) -> list[Run]:
    if study == "compare":
        return compare_runs(base, seeds)
    if study == "qrif":
        return qrif_runs(base, seeds, args.qrif_load)
    if study == "pool":
        return pool_runs(base, seeds, args.pool_fleets, args.pool_loads, args.pool_clients)
    return probe_runs(base, seeds, args.probe_loads)


def _study_config(study: str, base: SimConfig, seeds: Sequence[int], args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {
        "study": study,
        "simulator": dataclasses.asdict(base),
        "seeds": list(seeds),
        "quick": args.quick,
        "paper_rate": args.paper_rate,
        "jobs": args.jobs,
        "mean_work_s": base.mean_work_s,
        "capacity_qps": {seed: fleet_for(dataclasses.replace(base, seed=seed)).capacity_qps for seed in seeds},
    }
    config["oracle"] = "the simulator's oracle on the same fleet, seed and load; *_excess_ms = figure - oracle's"
    if study == "compare":
        config["loads"] = list(COMPARE_LOADS)
        config["policies"] = [*POLICY_CLASSES, ORACLE]
        config["extra_variant"] = {"policy": "prequal", "q_rif": PAPER_COMPARE_Q_RIF}
    elif study == "pool":
        config["fleets"] = args.pool_fleets
        config["clients"] = args.pool_clients
        config["loads"] = args.pool_loads
        config["pool_rules"] = {
            rule: {"label": POOL_LABELS[rule], "pool_size": {n: pool_size_for(rule, n) for n in args.pool_fleets}}
            for rule in POOL_RULES
        }
        config["capacity_qps"] = {
            n: {s: fleet_for(dataclasses.replace(base, seed=s, replicas=n)).capacity_qps for s in seeds}
            for n in args.pool_fleets
        }
    elif study == "qrif":
        fleet = two_speed_fleet(base)
        config["simulator"] = dataclasses.asdict(fleet)
        config["capacity_qps"] = {s: fleet_for(dataclasses.replace(fleet, seed=s)).capacity_qps for s in seeds}
        config["q_rif_values"] = list(PAPER_Q_RIF)
        config["load"] = args.qrif_load
        config["load_means"] = "fraction of the fleet's time-averaged capacity; sim_load = load * capacity_factor"
        config["slow_factor"] = SLOW_FACTOR
    else:
        config["loads"] = args.probe_loads
        config["r_probe_values"] = [{"label": label, "value": value} for label, value in PROBE_RATES]
        config["r_remove"] = PROBE_REMOVALS
        config["cap_rules"] = {rule: CAP_LABELS[rule] for rule in PROBE_CAPS}
    return config


def _title(study: str, base: SimConfig, seeds: Sequence[int], args: argparse.Namespace) -> str:
    fleet = f"{base.replicas} replicas x {base.clients} clients"
    if study == "pool":
        fleet = f"{','.join(map(str, args.pool_fleets))} replicas x {args.pool_clients} clients"
    setting = f"{fleet}, {base.seconds:g} s, seeds {','.join(map(str, seeds))}"
    if args.paper_rate:
        setting += ", paper rate (8 slots, mu 0.1 s)"
    what = {
        "compare": "p99 per policy (paper section 5.2, Fig. 7)",
        "qrif": f"Q_RIF sweep, half the replicas at 2x work, {args.qrif_load:g} of capacity (paper Fig. 9)",
        "probes": f"probe-rate sweep at load {','.join(f'{x:g}' for x in args.probe_loads)} (paper Fig. 8)",
        "pool": "small fleets: the fixed pool of 16 against the derived one, and the oracle (issue 15)",
    }[study]
    return f"{what}\n{setting}"


def replot(path: Path, img_dir: Path) -> Path:
    """Plot a ``studies-<study>[tag].json`` into ``img_dir / studies-<plot name>[tag].png`` (no simulation)."""
    document = json.loads(path.read_text(encoding="utf-8"))
    config = document["config"]
    study = config["study"]
    name, plot = PLOTTERS[study]
    tag = path.stem[len(f"studies-{study}") :] if path.stem.startswith(f"studies-{study}") else ""
    deadline_ms = 1000.0 * float(config["simulator"]["deadline_s"])
    title = config.get("title") or f"{study}, seeds {','.join(map(str, config['seeds']))}"
    return plot(document["summary"], deadline_ms, img_dir / f"studies-{name}{tag}.png", title)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        img_dir_only: Path = args.img_dir or REPO / "docs" / "img"
        for path in args.from_json:
            print(f"plot: {replot(path, img_dir_only)}", flush=True)
        return 0
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        base = base_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    tag = ("-quick" if args.quick else "") + ("-paper-rate" if args.paper_rate else "")
    img_dir: Path = args.img_dir or (args.json_dir if args.quick else REPO / "docs" / "img")
    plots = not args.no_plots
    if plots:
        from benchmarks.plotting import have_matplotlib

        if not have_matplotlib():
            print("warning: matplotlib is not installed; no plots (pip install matplotlib)", file=sys.stderr)
            plots = False
    deadline_ms = 1000.0 * base.deadline_s
    for study in args.studies:
        started = time.perf_counter()
        runs = _study_runs(study, base, seeds, args)
        progress(f"== {study}: {len(runs)} runs, seeds {','.join(map(str, seeds))}, {args.jobs} job(s)")
        records = run_all(runs, args.jobs, progress)
        add_oracle_excess(records)
        if study == "pool":
            add_pool_deltas(records)
        summary = summarize(records, CELL_KEYS[study])
        wall = time.perf_counter() - started
        document = {
            "config": {
                **_study_config(study, base, seeds, args),
                "title": _title(study, base, seeds, args),
                "wall_s": round(wall, 1),
            },
            "results": records,
            "summary": summary,
        }
        path = args.json_dir / f"studies-{study}{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\n## {study}: {_title(study, base, seeds, args).replace(chr(10), '; ')}\n")
        print(FORMATTERS[study](summary, deadline_ms))
        print(f"\n{len(runs)} runs in {wall:.0f} s wall; JSON: {path}", flush=True)
        if plots:
            name, plot = PLOTTERS[study]
            png = plot(summary, deadline_ms, img_dir / f"studies-{name}{tag}.png", _title(study, base, seeds, args))
            print(f"plot: {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare load-balancing policies on the simulated fleet: ``python -m benchmarks.simulate``.

Every (policy, load) pair is one run of ``prequal_middleware.core.simulator.simulate`` with the same seed,
so all policies see the same arrivals, work and antagonists. A progress line per run goes to stderr, the
table to stdout, and ``--json PATH`` writes ``{"config": {...}, "results": [...]}``. See docs/simulator.md.

    python -m benchmarks.simulate --load 0.7,0.9,1.2 --json benchmarks/results/sim.json
    python -m benchmarks.simulate --quick
    python -m benchmarks.simulate --policies prequal,prequal_nocheck,round_robin --liars 5 --load 0.7,0.9
    python -m benchmarks.simulate --plot docs/img/sim-oracle.png --from-json docs/results/sim-oracle-seed*.json
    python -m benchmarks.simulate --policies prequal,prequal_sync --load 0.9 --sync-probes 3 --sync-wait-s 0.01

With ``oracle`` among the policies (the fleet model's bound, ``core/sim_oracle.py``), every run's p99 and
p99.9 are also given as their excess over the oracle's, and per load the share of the best peer's excess
that Prequal removes: ``1 - (prequal - oracle) / (best_peer - oracle)``, the best peer being the lowest
of the policies that are neither Prequal nor the oracle (``limit`` in the JSON).

With ``--sinkholes K`` the last K replicas fail every request fast while reporting idle, and every
policy is also run on the fleet without them (the first n - K replicas, same seed: the same arrivals)
for the baseline of its successful requests' p99 (``sinkholes`` in the JSON, ``sinkhole_rows``).
``--time-scale F`` multiplies the service's time constants by F (``time_scaled``): a slow service.
``prequal_sync`` is Prequal in sync mode (``--sync-probes``, ``--sync-wait-s``); its table rows add the
mean wait for the sync answers per request (``wait_ms``) and the share of sync rounds with too few answers
in time (``sync_fb``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import plotting
from prequal_middleware.core import PrequalSettings
from prequal_middleware.core.load_tracker import LoadTrackerSettings
from prequal_middleware.core.settings import OutlierSettings
from prequal_middleware.core.simulator import (
    ORACLE,
    SIM_POLICIES,
    RunResult,
    SimConfig,
    fleet_for,
    simulate,
    time_scaled,
)

DEFAULT_POLICIES = "prequal,round_robin,random,least_request,peak_ewma"
# --quick: a small fleet and a short run. The pool is 8 there, not 16: with m=16 of n=20 replicas Eq. 1
# has no finite reuse budget (prequal-spec.md section 7: keep (1 - m/n) * r_probe > r_remove).
QUICK = {"replicas": 20, "clients": 10, "seconds": 10.0}


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in SIM_POLICIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"policies must be among {', '.join(sorted(SIM_POLICIES))}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    pq = PrequalSettings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", type=_policies, default=_policies(DEFAULT_POLICIES), help=f"[{DEFAULT_POLICIES}]")
    p.add_argument("--load", type=_floats, default=[0.7], help="fractions of capacity, comma-separated [0.7]")
    p.add_argument("--replicas", type=int, help=f"[{defaults.replicas}; --quick {QUICK['replicas']}]")
    p.add_argument("--clients", type=int, help=f"[{defaults.clients}; --quick {QUICK['clients']}]")
    p.add_argument(
        "--seconds", type=float, help=f"simulated seconds [{defaults.seconds:g}; --quick {QUICK['seconds']:g}]"
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"[{defaults.seed}]")
    p.add_argument("--deadline-s", type=float, default=defaults.deadline_s, help=f"[{defaults.deadline_s:g}]")
    p.add_argument(
        "--network-delay-s",
        type=float,
        default=defaults.network_delay_s,
        help=f"one-way delay of every query, response and probe [{defaults.network_delay_s:g}]",
    )
    p.add_argument("--slots", type=int, default=defaults.slots, help=f"service slots per replica [{defaults.slots}]")
    p.add_argument("--work-mu-s", type=float, default=defaults.work_mu_s, help=f"work mu [{defaults.work_mu_s:g}]")
    p.add_argument("--q-rif", type=float, default=pq.q_rif, help=f"Prequal Q_RIF [{pq.q_rif:g}]")
    p.add_argument("--probes-per-query", type=float, default=pq.probes_per_query, help=f"[{pq.probes_per_query:g}]")
    p.add_argument(
        "--report-max-age-s",
        type=float,
        default=pq.report_max_age_s,
        help=f"fresh piggybacked reports answer probes; 0: every probe sent [{pq.report_max_age_s:g}]",
    )
    p.add_argument(
        "--report-max-queries",
        type=int,
        default=pq.report_max_queries,
        help=f"a report past --report-max-age-s answers while at most this many queries came since; "
        f"0: age only [{pq.report_max_queries}]",
    )
    p.add_argument(
        "--removals-per-query", type=float, default=pq.removals_per_query, help=f"[{pq.removals_per_query:g}]"
    )
    p.add_argument("--pool-size", type=int, default=pq.pool_size, help=f"Prequal m [{pq.pool_size}]")
    p.add_argument(
        "--sync-probes", type=int, default=pq.sync_probes, help=f"prequal_sync: d, probes per query [{pq.sync_probes}]"
    )
    p.add_argument(
        "--sync-wait-s",
        type=float,
        default=pq.sync_wait_s,
        help=f"prequal_sync: the longest wait for d-1 answers [{pq.sync_wait_s:g}]",
    )
    p.add_argument("--max-reuse", type=int, default=pq.max_reuse, help=f"Prequal max_reuse [{pq.max_reuse}]")
    fallbacks = ("least_in_flight", "random")
    p.add_argument("--fallback", choices=fallbacks, default=pq.fallback, help=f"Prequal fallback [{pq.fallback}]")
    p.add_argument(
        "--liars", type=int, default=defaults.liars, help=f"replicas that report RIF 0 / latency 0 [{defaults.liars}]"
    )
    p.add_argument("--liar-slowdown", type=float, default=defaults.liar_slowdown, help=f"[{defaults.liar_slowdown:g}]")
    p.add_argument(
        "--sinkholes",
        type=int,
        default=defaults.sinkholes,
        help=f"replicas that fail fast, reporting idle [{defaults.sinkholes}]",
    )
    p.add_argument(
        "--sinkhole-fail-s", type=float, default=defaults.sinkhole_fail_s, help=f"[{defaults.sinkhole_fail_s:g}]"
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=defaults.attempts,
        help=f"attempts per request, a 5xx retried on another replica within the retry budget [{defaults.attempts}]",
    )
    p.add_argument(
        "--warmup-fraction",
        type=float,
        default=defaults.warmup_fraction,
        help=f"share of the run not measured [{defaults.warmup_fraction:g}]",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply the work, deadline, antagonist periods and bursts, and --seconds by this [1]",
    )
    tracker = defaults.tracker
    p.add_argument(
        "--window-service-times",
        type=float,
        default=tracker.window_service_times,
        help=f"replicas' estimator window in median latencies; 0: fixed [{tracker.window_service_times:g}]",
    )
    outliers = defaults.outliers
    p.add_argument(
        "--consecutive-failures",
        type=int,
        default=outliers.consecutive_failures,
        help=f"failures in a row that eject a replica (OutlierSettings) [{outliers.consecutive_failures}]",
    )
    p.add_argument("--quick", action="store_true", help="a small fleet and a short run (a few seconds)")
    p.add_argument("--json", metavar="PATH", help="also write the config and results as JSON")
    p.add_argument("--plot", metavar="PNG", help="p99 and p99.9 against load per policy (needs matplotlib)")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        nargs="+",
        help="plot these --json outputs (e.g. one per seed: median and min-max) instead of simulating",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    base = SimConfig()

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return QUICK[name] if args.quick and name in QUICK else fallback

    prequal = PrequalSettings(
        pool_size=args.pool_size,
        max_reuse=args.max_reuse,
        q_rif=args.q_rif,
        probes_per_query=args.probes_per_query,
        removals_per_query=args.removals_per_query,
        fallback=args.fallback,
        report_max_age_s=args.report_max_age_s,
        report_max_queries=args.report_max_queries,
        sync_probes=args.sync_probes,
        sync_wait_s=args.sync_wait_s,
    )
    config = SimConfig(
        replicas=pick("replicas", base.replicas),
        clients=pick("clients", base.clients),
        seconds=pick("seconds", base.seconds),
        seed=args.seed,
        deadline_s=args.deadline_s,
        network_delay_s=args.network_delay_s,
        slots=args.slots,
        work_mu_s=args.work_mu_s,
        liars=args.liars,
        liar_slowdown=args.liar_slowdown,
        sinkholes=args.sinkholes,
        sinkhole_fail_s=args.sinkhole_fail_s,
        attempts=args.attempts,
        warmup_fraction=args.warmup_fraction,
        tracker=dataclasses.replace(LoadTrackerSettings(), window_service_times=args.window_service_times),
        outliers=dataclasses.replace(OutlierSettings(), consecutive_failures=args.consecutive_failures),
        prequal=prequal,
    )
    return config if args.time_scale == 1.0 else time_scaled(config, args.time_scale)


def _ms(value: float, deadline_ms: float) -> str:
    return "TO" if value >= deadline_ms else f"{value:.0f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


# --- the limit: excess over the oracle and the share of the best peer's excess Prequal removes -----------

PREQUAL = "prequal"
LIMIT_METRICS = ("p99_ms", "p999_ms")


def is_peer(policy: str) -> bool:
    """A policy Prequal is compared with: neither a Prequal variant nor an oracle."""
    return not policy.startswith((PREQUAL, ORACLE))


def removed_share(prequal: float, best_peer: float, oracle: float) -> float | None:
    """``1 - (prequal - oracle) / (best_peer - oracle)``; ``None`` (n/a) when the best peer is not above the oracle."""
    gap = best_peer - oracle
    if not gap > 0:
        return None
    return 1.0 - (prequal - oracle) / gap


def excess_over_oracle(results: Sequence[RunResult]) -> dict[tuple[str, float], dict[str, float]]:
    """Per (policy, load) of a run with the oracle: ``{"p99_ms": policy - oracle, "p999_ms": ...}``."""
    oracles = {r.load: r for r in results if r.policy == ORACLE}
    return {
        (r.policy, r.load): {m: getattr(r, m) - getattr(oracles[r.load], m) for m in LIMIT_METRICS}
        for r in results
        if r.load in oracles
    }


def limit_rows(results: Sequence[RunResult], deadline_ms: float) -> list[dict[str, Any]]:
    """Per load and metric with an oracle, Prequal and a peer: the figures, excesses and Prequal's share.

    A best peer at the deadline is censored (its true percentile is at least that): its excess, hence the
    share, is then a lower bound (``censored``).
    """
    rows: list[dict[str, Any]] = []
    for load in dict.fromkeys(r.load for r in results):
        at = {r.policy: r for r in results if r.load == load}
        peers = [r for r in at.values() if is_peer(r.policy)]
        if ORACLE not in at or PREQUAL not in at or not peers:
            continue
        for metric in LIMIT_METRICS:
            oracle = getattr(at[ORACLE], metric)
            prequal = getattr(at[PREQUAL], metric)
            best = min(peers, key=lambda r: float(getattr(r, metric)))
            best_value = getattr(best, metric)
            rows.append(
                {
                    "load": load,
                    "metric": metric,
                    "oracle_ms": oracle,
                    "prequal_ms": prequal,
                    "best_peer": best.policy,
                    "best_peer_ms": best_value,
                    "prequal_excess_ms": prequal - oracle,
                    "best_peer_excess_ms": best_value - oracle,
                    "share_removed": removed_share(prequal, best_value, oracle),
                    "censored": best_value >= deadline_ms,
                }
            )
    return rows


# --- sinkholes: what each policy avoided, what the clients saw, and the rest's p99 against no sinkholes --


def avoided_share(sinkhole_attempts: int, requests: int, sinkholes: int, replicas: int) -> float | None:
    """``1 - sinkhole_attempts / (requests * sinkholes / replicas)``: the share avoided of what round robin
    (without outlier detection: an even share) would send the sinkholes; ``None`` with no reference."""
    expected = requests * sinkholes / replicas
    return 1.0 - sinkhole_attempts / expected if expected > 0 else None


def baseline_config(config: SimConfig) -> SimConfig:
    """The same fleet without its sinkholes: the first ``replicas - sinkholes``, the same arrivals."""
    return dataclasses.replace(config, replicas=config.replicas - config.sinkholes, sinkholes=0)


def sinkhole_rows(
    results: Sequence[RunResult], baseline: Sequence[RunResult], config: SimConfig
) -> list[dict[str, Any]]:
    """Per (policy, load): sinkhole attempts, the avoided share (against an even share and against our
    ``round_robin``, which ejects), client-visible failures, and p99 / p99.9 of the successes against the
    baseline's."""
    base = {(r.policy, r.load): r for r in baseline}
    rr = {r.load: r for r in results if r.policy == "round_robin"}
    rows: list[dict[str, Any]] = []
    for r in results:
        b = base.get((r.policy, r.load))
        ours_rr = rr.get(r.load)
        rows.append(
            {
                "policy": r.policy,
                "load": r.load,
                "requests": r.requests,
                "attempts": r.attempts,
                "retries": r.retries,
                "sinkhole_attempts": r.sinkhole_attempts,
                "even_share_attempts": r.requests * config.sinkholes / config.replicas,
                "avoided": avoided_share(r.sinkhole_attempts, r.requests, config.sinkholes, config.replicas),
                "avoided_vs_round_robin": (
                    1.0 - r.sinkhole_attempts / ours_rr.sinkhole_attempts
                    if ours_rr is not None and ours_rr.sinkhole_attempts
                    else None
                ),
                "failed": r.failed,
                "failed_share": r.failed / r.requests if r.requests else 0.0,
                "p99_ok_ms": r.p99_ok_ms,
                "p999_ok_ms": r.p999_ok_ms,
                "baseline_p99_ms": b.p99_ok_ms if b else None,
                "baseline_p999_ms": b.p999_ok_ms if b else None,
                "p99_change": r.p99_ok_ms / b.p99_ok_ms - 1.0 if b and b.p99_ok_ms else None,
            }
        )
    return rows


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def format_sinkholes(rows: Sequence[dict[str, Any]]) -> str:
    """The sinkhole table."""
    header = (
        f"{'policy':<14} {'load':>5} {'requests':>9} {'sink_att':>8} {'avoided':>8} {'vs_rr':>7} {'retries':>7} "
        f"{'failed':>7} {'fail%':>7} {'p99_ok':>7} {'base':>7} {'change':>7} {'p999_ok':>8} {'base':>7}"
    )
    lines = ["sinkholes: avoided share of an even share, client-visible failures, successes' p99 vs none", header]
    lines.append("-" * len(header))
    for row in rows:
        base99, base999 = row["baseline_p99_ms"], row["baseline_p999_ms"]
        lines.append(
            f"{row['policy']:<14} {row['load']:>5.2f} {row['requests']:>9} {row['sinkhole_attempts']:>8} "
            f"{_pct(row['avoided'], 2):>8} {_pct(row['avoided_vs_round_robin']):>7} {row['retries']:>7} "
            f"{row['failed']:>7} {_pct(row['failed_share'], 3):>7} {row['p99_ok_ms']:>7.0f} "
            f"{'-' if base99 is None else f'{base99:.0f}':>7} {_pct(row['p99_change']):>7} "
            f"{row['p999_ok_ms']:>8.0f} {'-' if base999 is None else f'{base999:.0f}':>7}"
        )
    return "\n".join(lines)


def _share(row: dict[str, Any]) -> str:
    share = row["share_removed"]
    if share is None:
        return "n/a"
    return ("≥" if row["censored"] else "") + f"{100 * share:.0f}%"


def format_limit(rows: Sequence[dict[str, Any]]) -> str:
    """The table of Prequal's share of the best peer's excess over the oracle."""
    header = (
        f"{'load':>5} {'metric':<7} {'oracle':>7} {'prequal':>8} {'best_peer':<14} {'peer_ms':>8} "
        f"{'prequal-or':>10} {'peer-or':>8} {'share':>6}"
    )
    lines = ["share of the best peer's excess over the oracle that Prequal removes", header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['load']:>5.2f} {row['metric'][:-3]:<7} {row['oracle_ms']:>7.0f} {row['prequal_ms']:>8.0f} "
            f"{row['best_peer']:<14} {row['best_peer_ms']:>8.0f} {row['prequal_excess_ms']:>10.0f} "
            f"{row['best_peer_excess_ms']:>8.0f} {_share(row):>6}"
        )
    return "\n".join(lines)


def format_table(results: Sequence[RunResult], config: SimConfig) -> str:
    deadline_ms = 1000.0 * config.deadline_s
    excess = excess_over_oracle(results)
    header = (
        f"{'policy':<14} {'load':>5} {'requests':>9} {'errors':>7} {'p50_ms':>7} {'p90_ms':>7} {'p99_ms':>7} "
        f"{'p999_ms':>8}"
    )
    if excess:
        header += f" {'p99-or':>7} {'p999-or':>8}"
    header += f" {'probes/q':>8} {'fallback':>8} {'pool':>5} {'rif_p99':>7} {'share_x_n':>11} {'corr':>5}"
    liars = config.liars > 0
    if liars:
        header += f" {'liar_share':>10}"
    header += f" {'rif_fix':>7} {'lat_fix':>7} {'lat0':>6}"
    sync = any(r.sync_fallback_rate is not None for r in results)
    if sync:
        header += f" {'wait_ms':>7} {'sync_fb':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        n = len(r.replica_share)
        share = f"{min(r.replica_share) * n:.2f}-{max(r.replica_share) * n:.2f}"
        pool = "-" if r.mean_pool_size is None else f"{r.mean_pool_size:.1f}"
        over = excess.get((r.policy, r.load))
        lines.append(
            f"{r.policy:<14} {r.load:>5.2f} {r.requests:>9} {r.errors:>7} {_ms(r.p50_ms, deadline_ms):>7} "
            f"{_ms(r.p90_ms, deadline_ms):>7} {_ms(r.p99_ms, deadline_ms):>7} {_ms(r.p999_ms, deadline_ms):>8}"
            + (f" {over['p99_ms']:>+7.0f} {over['p999_ms']:>+8.0f}" if over else "")
            + f" {r.probes_per_query:>8.2f} {100 * r.fallback_rate:>7.1f}% {pool:>5} {r.rif_p99:>7.0f} {share:>11} "
            f"{r.share_speed_corr:>5.2f}"
            + (f" {100 * r.liar_share:>9.1f}%" if liars else "")
            + f" {_rate(r.rif_correction_rate):>7} {_rate(r.latency_correction_rate):>7}"
            + f" {_pct(r.zero_latency_share):>6}"
            + (f" {r.sync_wait_ms:>7.2f} {_rate(r.sync_fallback_rate):>7}" if sync else "")
        )
    return "\n".join(lines)


def plot_limit(documents: Sequence[dict[str, Any]], path: Path) -> Path:
    """p99 and p99.9 against load, one line per policy (median and min-max over ``documents``, e.g. seeds).

    The oracle is drawn black and dashed: the floor the others are read against.
    """
    plt = plotting.pyplot()
    deadline_ms = 1000.0 * float(documents[0]["config"]["deadline_s"])
    policies = list(dict.fromkeys(r["policy"] for d in documents for r in d["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in zip(axes, LIMIT_METRICS, ("p99", "p99.9"), strict=True):
        highest = 0.0
        for policy in policies:
            cells: dict[float, list[float]] = {}
            for d in documents:
                for r in d["results"]:
                    if r["policy"] == policy:
                        cells.setdefault(float(r["load"]), []).append(float(r[metric]))
            xs = sorted(cells)
            median = [statistics.median(cells[x]) for x in xs]
            low = [min(cells[x]) for x in xs]
            high = [max(cells[x]) for x in xs]
            highest = max(highest, *high)
            style: dict[str, Any] = {}
            if policy.startswith(ORACLE):
                style = plotting.ORACLE_STYLE if policy == ORACLE else {**plotting.ORACLE_STYLE, "color": "grey"}
            plotting.band(ax, xs, median, low, high, label=policy, **style)
        plotting.deadline_line(ax, deadline_ms, highest)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("load (fraction of the allocation)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = sorted({int(d["config"]["seed"]) for d in documents})
    c = documents[0]["config"]
    where = f"{c['replicas']} replicas x {c['clients']} clients, {c['seconds']:g} s"
    fig.suptitle(f"Simulator, {where}: the policies and the oracle (seeds {seeds})")
    return plotting.save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        if not args.plot:
            print("error: --from-json needs --plot", file=sys.stderr)
            return 2
        documents = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.from_json]
        print(plot_limit(documents, Path(args.plot)))
        return 0
    if args.plot and not plotting.have_matplotlib():
        print("error: --plot needs matplotlib (the bench extra)", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    capacity = fleet_for(config).capacity_qps
    runs = [(load, policy) for load in args.load for policy in args.policies]
    results: list[RunResult] = []
    records: list[dict[str, Any]] = []
    for i, (load, policy) in enumerate(runs, 1):
        started = time.perf_counter()
        result = simulate(config, policy, load)
        wall = time.perf_counter() - started
        results.append(result)
        records.append({**result.to_dict(), "wall_s": round(wall, 3)})
        print(
            f"[{i}/{len(runs)}] {policy} load={load:g} ({result.rate_qps:.0f} qps): requests={result.requests} "
            f"errors={result.errors} p99={result.p99_ms:.0f}ms wall={wall:.2f}s",
            file=sys.stderr,
            flush=True,
        )
    print(format_table(results, config))
    sinkholes: list[dict[str, Any]] = []
    if config.sinkholes:
        base_config = baseline_config(config)
        baseline = []
        for i, (load, policy) in enumerate(runs, 1):
            baseline.append(simulate(base_config, policy, load))
            print(f"[baseline {i}/{len(runs)}] {policy} load={load:g}", file=sys.stderr, flush=True)
        sinkholes = sinkhole_rows(results, baseline, config)
        print()
        print(format_sinkholes(sinkholes))
    limit = limit_rows(results, 1000.0 * config.deadline_s)
    if limit:
        print()
        print(format_limit(limit))
    excess = excess_over_oracle(results)
    for result, record in zip(results, records, strict=True):
        over = excess.get((result.policy, result.load))
        if over:
            record["p99_excess_ms"], record["p999_excess_ms"] = over["p99_ms"], over["p999_ms"]
    document: dict[str, Any] = {
        "config": {
            **dataclasses.asdict(config),
            "policies": args.policies,
            "loads": args.load,
            "quick": args.quick,
            "time_scale": args.time_scale,
            "mean_work_s": config.mean_work_s,
            "capacity_qps": capacity,
        },
        "results": records,
    }
    if limit:
        document["limit"] = limit
    if sinkholes:
        document["sinkholes"] = sinkholes
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        print(plot_limit([document], Path(args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

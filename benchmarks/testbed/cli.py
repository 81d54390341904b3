"""``python -m benchmarks.testbed``: the command line (see the package docstring and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from prequal_middleware.core.load_tracker import WINDOW_SERVICE_TIMES

from ..harness.procs import TASKSET, Supervisor
from .contenders import ALL_CONTENDERS, SETTINGS, VARIANT_GRAMMAR, contender, find_binary
from .fleet import FleetConfig
from .metrics import aggregate, cdf_points
from .oracle import replay_runs
from .report import detail_table, fmt, oracle_table, pivot_table, reports_pair_table, share_range, sinkhole_table
from .runner import Fleet, Options, Runner, TestbedError, options_json, schedule

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "testbed.json"
DEFAULT_LOADS = (0.5, 0.7, 0.9, 1.1, 1.3)
QUICK_CONTENDERS = ("prequal", "round_robin", "nginx_least_conn", "haproxy_leastconn")
FULL = {"replicas": 12, "replica_processes": 2, "seconds": 15.0, "warmup": 5.0, "rounds": 3}
QUICK = {"replicas": 6, "replica_processes": 1, "seconds": 4.0, "warmup": 2.0, "rounds": 1}
QUICK_LOADS = (0.7, 1.2)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < 10 for v in values):
        raise argparse.ArgumentTypeError(f"loads must be fractions of capacity in (0, 10), got {text!r}")
    return values


def _contender_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        try:
            contender(name)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected names among {', '.join(ALL_CONTENDERS)} or {VARIANT_GRAMMAR}, got {name!r}"
            ) from None
    if not names:
        raise argparse.ArgumentTypeError("expected at least one contender")
    return list(dict.fromkeys(names))


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two numbers), got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return low, high


def _names(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected names among {', '.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(names))

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.testbed",
        description="Load-balancing quality on real processes: Prequal vs other policies, nginx and haproxy.",
    )
    p.add_argument("--setup", action="store_true", help="install nginx and haproxy with apt-get when missing, exit")
    p.add_argument("--quick", action="store_true", help="6 replicas, loads 0.7,1.2, 4 s runs, 4 contenders, single")
    p.add_argument(
        "--contenders",
        type=_contender_names,
        help=f"[all: {','.join(ALL_CONTENDERS)}]; prequal_q<Q_RIF>[_random][_nocheck][_noreports]: Prequal with "
        "that Q_RIF (and the random fallback, cross_check off, piggybacked reports off); prequal_nocheck: Prequal "
        "with cross_check off; prequal_noreports: Prequal with report_max_age_s=0 (every probe on the network)",
    )
    p.add_argument("--settings", type=_names(SETTINGS), help="single,fleet [both; --quick: single]")
    p.add_argument("--loads", type=_floats, help=f"fractions of fleet capacity [{','.join(map(str, DEFAULT_LOADS))}]")
    p.add_argument("--seconds", type=float, help=f"measured seconds per run [{FULL['seconds']:g}]")
    p.add_argument("--warmup", type=float, help=f"warm-up seconds per run, not measured [{FULL['warmup']:g}]")
    p.add_argument("--rounds", type=int, help=f"repetitions, contender order rotated [{FULL['rounds']}]")
    p.add_argument("--seed", type=int, default=1, help="fleet, antagonists, arrivals and work [1]")
    p.add_argument("--replicas", type=int, help=f"[{FULL['replicas']}; --quick {QUICK['replicas']}]")
    p.add_argument("--replica-processes", type=int, help=f"[{FULL['replica_processes']}]")
    p.add_argument("--slots", type=int, default=4, help="service slots per replica [4]")
    p.add_argument("--work-mu-ms", type=float, default=80.0, help="work mu, ms at speed 1 [80]")
    p.add_argument(
        "--allocation", type=_range, default=(0.6, 1.4), help="MIN,MAX of the replicas' guaranteed speeds [0.6,1.4]"
    )
    p.add_argument(
        "--headroom", type=_range, default=(1.5, 2.0), help="MIN,MAX speed-up when the antagonist is idle [1.5,2.0]"
    )
    p.add_argument("--deadline-s", type=float, default=5.0, help="client deadline [5]")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply the work, the deadline and the antagonists' periods and bursts by this: a slow service [1]",
    )
    p.add_argument(
        "--window-service-times",
        type=float,
        default=WINDOW_SERVICE_TIMES,
        help=f"replicas' estimator window in median latencies (at least 1 s); 0: fixed 1 s [{WINDOW_SERVICE_TIMES:g}]",
    )
    p.add_argument("--balancer-cpu", type=int, default=1, help="CPU the balancers are pinned to [1]")
    p.add_argument("--load-cpu", type=int, default=0, help="CPU of the replicas and load generator [0]")
    p.add_argument("--max-cpu-pct", type=float, default=70.0, help="a balancer process above this is invalid [70]")
    p.add_argument(
        "--max-core-pct",
        type=float,
        default=80.0,
        help="the balancer CPU busier than this (all balancer processes plus anything else on it) is invalid [80]",
    )
    p.add_argument(
        "--sinkholes",
        type=int,
        default=0,
        help="the last K replicas fail every request with a 503 in ~1 ms, reporting no load; "
        "loads are fractions of the honest replicas' capacity [0]",
    )
    p.add_argument("--fleet-instances", type=int, default=4, help="balancer instances in the fleet setting [4]")
    p.add_argument("--prequal-q-rif", type=float, help="override Prequal's Q_RIF in the gateway [library default]")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--json", metavar="PATH", default=str(DEFAULT_JSON), help="[benchmarks/results/testbed.json]")
    p.add_argument("--plots", metavar="DIR", help="PNG directory [the JSON's directory]; needs matplotlib")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def setup() -> int:
    """Install nginx and haproxy with apt-get when they are missing."""
    missing = [name for name in ("nginx", "haproxy") if find_binary(name) is None]
    if not missing:
        print("nginx and haproxy are installed", file=sys.stderr)
        return 0
    apt = shutil.which("apt-get")
    if apt is None:
        print(f"missing {', '.join(missing)} and no apt-get here: install them yourself", file=sys.stderr)
        return 1
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            print(f"missing {', '.join(missing)}: run as root or install sudo", file=sys.stderr)
            return 1
        prefix = [sudo]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "-q", *missing]
    print("+ " + " ".join(install), file=sys.stderr)
    if subprocess.run(install, env=env, check=False).returncode != 0:
        update = [*prefix, apt, "update", "-q"]
        print("+ " + " ".join(update), file=sys.stderr)
        subprocess.run(update, env=env, check=False)
        print("+ " + " ".join(install), file=sys.stderr)
        if subprocess.run(install, env=env, check=False).returncode != 0:
            return 1
    still = [name for name in ("nginx", "haproxy") if find_binary(name) is None]
    if still:
        print(f"still missing: {', '.join(still)}", file=sys.stderr)
        return 1
    return 0


def options_from_args(args: argparse.Namespace) -> Options:
    base = QUICK if args.quick else FULL

    def pick(name: str, attr: str | None = None) -> Any:
        value = getattr(args, attr or name)
        return base[name] if value is None else value

    fleet = FleetConfig(
        replicas=pick("replicas"),
        slots=args.slots,
        work_mu_s=args.work_mu_ms / 1000.0,
        allocation_min=args.allocation[0],
        allocation_max=args.allocation[1],
        headroom_min=args.headroom[0],
        headroom_max=args.headroom[1],
        seed=args.seed,
        sinkholes=args.sinkholes,
        window_service_times=args.window_service_times,
    )
    if args.time_scale != 1.0:
        fleet = fleet.time_scaled(args.time_scale)
    contenders = args.contenders or list(QUICK_CONTENDERS if args.quick else ALL_CONTENDERS)
    settings = args.settings or (["single"] if args.quick else list(SETTINGS))
    loads = args.loads or list(QUICK_LOADS if args.quick else DEFAULT_LOADS)
    options = Options(
        contenders=contenders,
        settings=settings,
        loads=loads,
        seconds=pick("seconds"),
        warmup_s=pick("warmup"),
        rounds=pick("rounds"),
        seed=args.seed,
        deadline_s=args.deadline_s * args.time_scale,
        fleet=fleet,
        replica_processes=pick("replica_processes"),
        balancer_cpu=args.balancer_cpu,
        load_cpu=args.load_cpu,
        max_cpu_pct=args.max_cpu_pct,
        max_core_pct=args.max_core_pct,
        fleet_instances=args.fleet_instances,
        prequal_q_rif=args.prequal_q_rif,
        pin=not args.no_pin,
        quick=args.quick,
    )
    if options.seconds <= 0 or options.warmup_s < 0 or options.rounds < 1 or options.deadline_s <= 0:
        raise ValueError("--seconds and --deadline-s must be > 0, --warmup >= 0, --rounds >= 1")
    if not 1 <= options.fleet_instances <= 64:
        raise ValueError("--fleet-instances must be between 1 and 64")
    if options.prequal_q_rif is not None and not 0.0 <= options.prequal_q_rif <= 1.0:
        raise ValueError("--prequal-q-rif must be in [0, 1]")
    return options


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.setup:
        return setup()
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    available, skipped = [], {}
    for name in options.contenders:
        candidate = contender(name)
        if candidate.available():
            available.append(name)
        else:
            skipped[name] = f"{candidate.binary} is not installed (python -m benchmarks.testbed --setup installs it)"
            log(f"skipping {name}: {skipped[name]}")
    if not available:
        log("error: no contender to run")
        return 1
    if options.pin and TASKSET is None:
        log("taskset not found: processes are not pinned")
    if (os.cpu_count() or 1) <= max(options.balancer_cpu, options.load_cpu) and options.pin:
        log(f"only {os.cpu_count()} CPU(s): pinning to CPUs {options.load_cpu} and {options.balancer_cpu} is off")
        options = Options(**{**options.__dict__, "pin": False})

    runs = schedule(options, available)
    capacity = options.fleet.capacity_qps
    log(
        f"testbed: {options.fleet.replicas} replicas x {options.fleet.slots} slots, work mu "
        f"{options.fleet.work_mu_s * 1000:g} ms, capacity {capacity:.0f} req/s; {len(runs)} runs of "
        f"{options.warmup_s:g}+{options.seconds:g} s"
    )
    previous = signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    completed: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    interrupted = False
    try:
        with Supervisor(pin=options.pin) as supervisor:
            fleet = Fleet(options.fleet, options.replica_processes, supervisor, options.load_cpu)
            runner = Runner(options, supervisor, fleet, log)
            for i, (round_index, load, setting, name) in enumerate(runs, 1):
                t = time.monotonic()
                try:
                    result = runner.run(contender(name), setting, load, round_index)
                except TestbedError as exc:
                    failures.append({"policy": name, "setting": setting, "load": load, "round": round_index})
                    failures[-1]["error"] = str(exc)
                    log(f"[{i}/{len(runs)}] {name} {setting} load={load:g} round={round_index + 1}: FAILED: {exc}")
                    continue
                completed.append(result)
                log(
                    f"[{i}/{len(runs)}] round {round_index + 1} load {load:g} ({result['rate_rps']:.0f} req/s) "
                    f"{setting} {name}: requests={result['requests']} errors={result['errors']} "
                    f"p50={fmt(result['p50_ms'])} p99={fmt(result['p99_ms'])} p99.9={fmt(result['p999_ms'])} ms "
                    f"cpu={fmt(result['cpu_pct'])}% (max process {fmt(result['max_process_cpu_pct'])}%, "
                    f"core {fmt(result['balancer_core_pct'])}%) "
                    f"probes/req={fmt(result['probes_per_req'], 2)} shares x n={share_range(result['shares'])}"
                    + (f" fallback={fmt(result['fallback_pct'], 1)}%" if contender(name).method == "prequal" else "")
                    + (
                        f" sinkholes {result['sinkhole_attempts']} ({100 * result['sinkhole_avoided']:.1f}% avoided)"
                        if result.get("sinkhole_avoided") is not None
                        else ""
                    )
                    + f" others on CPUs {options.balancer_cpu}/{options.load_cpu}="
                    + f"{fmt(result['balancer_cpu_interference_pct'])}/{fmt(result['load_cpu_interference_pct'])}%"
                    + f"{'' if result['valid'] else ' INVALID'} [{time.monotonic() - t:.1f} s]"
                    + (f" ({'; '.join(result['notes'])})" if result["notes"] else "")
                )
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: every process stopped; writing what was measured")
    except TestbedError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    runtime = time.monotonic() - started

    results = []
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in completed:
        groups.setdefault((r["setting"], r["policy"], r["load"]), []).append(r)
    order = {name: i for i, name in enumerate(options.contenders)}
    for key in sorted(groups, key=lambda k: (options.settings.index(k[0]), k[2], order[k[1]])):
        runs_of = groups[key]
        entry = aggregate(runs_of)
        entry["cdf_ms"] = cdf_points(sorted(v for r in runs_of for v in r["cdf_ms"]))
        results.append(entry)
    config = options_json(options)
    config.update(
        {
            "contenders_run": available,
            "skipped": skipped,
            "runtime_s": round(runtime, 1),
            "interrupted": interrupted,
            "failures": failures,
            "cpus": os.cpu_count(),
            "nginx": find_binary("nginx"),
            "haproxy": find_binary("haproxy"),
            "taskset": TASKSET,
            "gateway_fleet": f"{options.fleet_instances} gateway processes, one port each, clients_per_pool=1",
            "nginx_fleet": f"one nginx, {options.fleet_instances} workers, listen reuseport, no upstream zone",
            "haproxy_fleet": f"{options.fleet_instances} haproxy processes (nbthread 1), one port each",
        }
    )
    # The oracle (and round robin) replayed offline over each (round, load)'s queries: oracle.py.
    rounds_run = sorted({r["round"] for r in completed})
    replays = replay_runs(
        options.fleet,
        options.loads,
        max(rounds_run, default=-1) + 1,
        options.seed,
        options.warmup_s,
        options.seconds,
        options.deadline_s,
    )
    replays = [r for r in replays if r["round"] in rounds_run]
    document = sanitize({"config": config, "results": results, "replays": replays})
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")

    deadline_ms = 1000.0 * options.deadline_s
    print(detail_table(results, deadline_ms))
    for setting in options.settings:
        for column, label in (("p99_ms", "p99"), ("p999_ms", "p99.9")):
            table = pivot_table(results, setting, column, deadline_ms)
            if table:
                print(f"\n{label} ms, {setting} (median of {options.rounds} round(s); errors summed):\n{table}")
    against = oracle_table(results, replays, deadline_ms)
    if against:
        print(f"\nagainst the oracle replayed over the same queries (median of {options.rounds} round(s)):\n{against}")
    sinkholes = sinkhole_table(results)
    if sinkholes:
        print(f"\nsinkholes ({options.fleet.sinkholes} of {options.fleet.replicas} replicas):\n{sinkholes}")
    pairs = reports_pair_table(results, deadline_ms)
    if pairs:
        print(f"\npiggybacked reports on / off (median of {options.rounds} round(s); ratios per round):\n{pairs}")
    log(f"results: {path}; runtime {runtime:.0f} s")
    if not args.no_plots and results:
        try:
            from .plots import plot_all
        except ImportError as exc:
            log(f"no plots ({exc}): pip install matplotlib")
        else:
            for png in plot_all(document, Path(args.plots) if args.plots else path.parent):
                log(f"plot: {png}")
    if interrupted:
        return 130
    return 1 if failures and not completed else 0


def sanitize(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value

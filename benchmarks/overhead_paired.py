"""Saturated overhead in paired short slices: the contenders' ratios with the machine's drift cancelled.

    python -m benchmarks.overhead_paired                     # 3 targets, 16 and 64 conns, 20 slices of 2 s (~6 min)
    python -m benchmarks.overhead_paired --slices 30 --json /tmp/paired.json

``benchmarks.overhead`` runs each contender in a fresh process for 8-10 s, one after the other: the two
halves of a ratio are measured 10-30 s apart, and on a shared machine its speed moves by ±25% over such
spans (steal, neighbours), so one run's ratios spread by as much as the goals' margins. Here every
target is started once and stays up (each on the proxy CPU, idle while another is measured); then, per
connection count, slice after slice, each target gets ``--slice-s`` seconds of ``wrk`` in turn (the order
rotated each slice). A slice's ratios compare measurements seconds apart; the report gives, per pair,
the median of the per-slice ratios and their interquartile range, over the slices in which no member
had more than ``--max-interference`` % of the proxy CPU taken by other load.

The same processes, upstreams, pinning and ``wrk`` settings as ``benchmarks.overhead`` (its targets,
``LaunchContext`` and ``Process``); a target's CPU per request is its whole process's (all threads,
``/proc/<pid>/task/*/schedstat``) over the slice. Long-lived processes also see what a gateway sees in
service: their heaps grow and the collector runs as it would.

Pairs reported: every target against ``aiohttp_raw`` (when run), and ``gateway_prequal`` against
``gateway_round_robin`` (issue 13's goals: >= 1.1 and >= 0.85). A table goes to stdout, progress to
stderr, everything (each slice too) to ``--json`` (default ``benchmarks/results/overhead-paired.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .harness.cpu import CLK_TCK, CpuStat, cpu_ticks, process_cpu_s
from .harness.ports import free_port
from .harness.progress import progress as progress_line
from .harness.results import write_results
from .harness.rounds import rotated
from .harness.stats import median, percentile
from .overhead import (
    BASELINE,
    HOST,
    PATH,
    REPO,
    TARGETS_BY_NAME,
    LaunchContext,
    Process,
    Settings,
    core_compiled,
    library_revision,
    parse_wrk,
    run_wrk,
    upstream_counters,
    upstreams_running,
    versions,
    wait_ready,
)

DEFAULT_JSON = REPO / "benchmarks" / "results" / "overhead-paired.json"
BOOTSTRAP_ROUNDS = 5000
DEFAULT_TARGETS = ["aiohttp_raw", "gateway_round_robin", "gateway_prequal"]
TWINS = [("gateway_prequal", "gateway_round_robin")]  # (target, the one it is compared with) besides the baseline
LOAD_CPU, PROXY_CPU = 0, 1


@dataclass
class Slice:
    """One target's share of one slice: ``wrk`` for ``slice_s`` seconds at ``connections``."""

    target: str
    connections: int
    slice: int
    requests: int
    rps: float
    p99_ms: float
    cpu_us_per_req: float
    interference_pct: float  # of the proxy CPU, taken by anything but this target (idle targets included)
    errors: int
    # Explicit probes the upstreams received, per request (None: not a proxy, or a run before they were
    # counted), and both upstreams' CPU (all threads) per request (None: not counted).
    probes_per_req: float | None = None
    upstream_cpu_us_per_req: float | None = None


@dataclass
class Running:
    name: str
    process: Process
    url: str
    proxies: bool


def measure_slice(running: Running, connections: int, index: int, slice_s: int, settings: Settings) -> Slice:
    """One ``wrk`` run of ``slice_s`` seconds at one running target: its CPU, the proxy CPU's and the
    upstreams' (CPU, probes) around it."""
    pid = running.process.pid
    before_probes, _ = upstream_counters(settings.upstreams)
    before_upstream_s = sum(process_cpu_s(p) for p in settings.upstream_pids)
    before_cpu_s, before_ticks, before_stat = process_cpu_s(pid), cpu_ticks(pid), CpuStat.read(PROXY_CPU)
    output = run_wrk(running.url, connections, slice_s, LOAD_CPU)
    after_cpu_s, after_ticks, after_stat = process_cpu_s(pid), cpu_ticks(pid), CpuStat.read(PROXY_CPU)
    after_upstream_s = sum(process_cpu_s(p) for p in settings.upstream_pids)
    after_probes, _ = upstream_counters(settings.upstreams)
    if not running.process.alive():
        raise RuntimeError(f"{running.name} died during a slice:\n{running.process.log_tail()}")
    wrk = parse_wrk(output)
    busy = after_stat.busy - before_stat.busy
    requests = max(wrk.requests, 1)
    others = max(0, busy - (after_ticks - before_ticks)) + (after_stat.steal - before_stat.steal)
    return Slice(
        target=running.name,
        connections=connections,
        slice=index,
        requests=wrk.requests,
        rps=wrk.rps,
        p99_ms=wrk.p99_ms,
        cpu_us_per_req=(after_cpu_s - before_cpu_s) / requests * 1e6,
        interference_pct=after_stat.pct_since(before_stat, others),
        errors=wrk.non_2xx + wrk.socket_errors,
        probes_per_req=(after_probes - before_probes) / requests if running.proxies else None,
        upstream_cpu_us_per_req=(after_upstream_s - before_upstream_s) / requests * 1e6,
    )


def run(
    targets: Sequence[str], connections: Sequence[int], slices: int, slice_s: int, warmup_s: int, log_dir: Path
) -> list[Slice]:
    """Start the upstreams and every target once; then, per connection count, warm each target and run
    ``slices`` slices, each target in turn (order rotated per slice). Everything is stopped on the way out."""
    settings = Settings(
        rounds=1,
        duration_s=slice_s,
        warmup_s=warmup_s,
        connections=list(connections),
        targets=list(targets),
        load_cpu=LOAD_CPU,
        proxy_cpu=PROXY_CPU,
    )
    out: list[Slice] = []
    with upstreams_running(settings, log_dir), contextlib.ExitStack() as stack:
        running: dict[str, Running] = {}
        for name in targets:
            target = TARGETS_BY_NAME[name]
            port = free_port(HOST)
            ctx = LaunchContext(port, list(settings.upstreams) if target.proxies else [], log_dir, None)
            process = Process(name, target.command(ctx), PROXY_CPU, log_dir, target.cwd)
            stack.callback(process.stop)
            url = f"http://{HOST}:{port}{PATH}"
            wait_ready(process, url)
            running[name] = Running(name, process, url, target.proxies)
        for conns in connections:
            for name in targets:
                if warmup_s > 0:
                    run_wrk(running[name].url, conns, warmup_s, LOAD_CPU)
            for index in range(slices):
                for name in rotated(list(targets), index):
                    piece = measure_slice(running[name], conns, index + 1, slice_s, settings)
                    out.append(piece)
                    progress_line(
                        f"[slice {index + 1}/{slices}] {name:<20} c={conns:<3} {piece.rps:>9,.0f} req/s  "
                        f"p99 {piece.p99_ms:7.2f} ms  cpu {piece.cpu_us_per_req:6.1f} us/req  "
                        f"upstreams {piece.upstream_cpu_us_per_req:6.1f} us/req  probes/req {piece.probes_per_req}  "
                        f"other load {piece.interference_pct:.0f}%"
                    )
    return out


def pairs(targets: Sequence[str]) -> list[tuple[str, str]]:
    """(target, compared with): each target against the baseline, then the twins, when both ran."""
    out = [(t, BASELINE) for t in targets if t != BASELINE and BASELINE in targets]
    out += [(a, b) for a, b in TWINS if a in targets and b in targets]
    return out


def median_interval(values: Sequence[float], level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """A percentile-bootstrap confidence interval of the median (``BOOTSTRAP_ROUNDS`` resamples, seeded:
    the same slices give the same interval); None for fewer than 2 values."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_ROUNDS))
    tail = (1.0 - level) / 2
    return percentile(medians, tail), percentile(medians, 1.0 - tail)


def summarize(slices: Sequence[Slice], targets: Sequence[str], max_interference_pct: float) -> list[dict[str, Any]]:
    """Per pair and connection count: the median and interquartile range of the per-slice ratios (req/s,
    CPU per request, p99), over the slices where neither member saw more than ``max_interference_pct``."""
    by = {(s.target, s.connections, s.slice): s for s in slices}
    out: list[dict[str, Any]] = []
    for conns in dict.fromkeys(s.connections for s in slices):
        indices = sorted({s.slice for s in slices if s.connections == conns})
        for this, that in pairs(targets):
            both = [
                (by[this, conns, i], by[that, conns, i])
                for i in indices
                if (this, conns, i) in by and (that, conns, i) in by
            ]
            quiet = [(a, b) for a, b in both if max(a.interference_pct, b.interference_pct) <= max_interference_pct]
            row: dict[str, Any] = {"ratio": f"{this} / {that}", "connections": conns, "slices": len(quiet)}
            row["contended_slices"] = len(both) - len(quiet)
            for key, field in (
                ("rps", "rps"),
                ("cpu", "cpu_us_per_req"),
                ("p99", "p99_ms"),
                ("upstream_cpu", "upstream_cpu_us_per_req"),
            ):
                values = sorted(
                    getattr(a, field) / getattr(b, field)
                    for a, b in quiet
                    if getattr(a, field) is not None and getattr(b, field) is not None and getattr(b, field) > 0
                )
                middle = median(values)
                row[f"{key}_median"] = round(middle, 4) if middle is not None else None
                row[f"{key}_p25"] = round(percentile(values, 0.25), 4) if values else None
                row[f"{key}_p75"] = round(percentile(values, 0.75), 4) if values else None
            interval = median_interval(
                [a.rps / b.rps for a, b in quiet if b.rps > 0]
            )  # how far the median itself may be off
            row["rps_median_ci95"] = [round(interval[0], 4), round(interval[1], 4)] if interval else None
            # The pooled ratio: all quiet slices' requests over all their time (each slice lasts slice_s).
            total_a, total_b = sum(a.requests for a, _ in quiet), sum(b.requests for _, b in quiet)
            row["rps_pooled"] = round(total_a / total_b, 4) if total_b else None
            row["errors"] = sum(a.errors + b.errors for a, b in both)
            out.append(row)
    return out


def per_target(slices: Sequence[Slice], max_interference_pct: float) -> list[dict[str, Any]]:
    """Per target and connection count, over its quiet slices: medians of req/s, CPU and the upstreams'
    CPU per request, and explicit probes per request over those that counted them (sum of probes / sum of
    requests)."""
    out: list[dict[str, Any]] = []
    for key in dict.fromkeys((s.target, s.connections) for s in slices):
        quiet = [s for s in slices if (s.target, s.connections) == key and s.interference_pct <= max_interference_pct]
        counted = [s for s in quiet if s.probes_per_req is not None]  # proxies, in runs that counted probes
        probes = sum((s.probes_per_req or 0.0) * max(s.requests, 1) for s in counted)
        requests = sum(max(s.requests, 1) for s in counted)
        out.append(
            {
                "target": key[0],
                "connections": key[1],
                "slices": len(quiet),
                "rps": median(s.rps for s in quiet),
                "cpu_us_per_req": median(s.cpu_us_per_req for s in quiet),
                "upstream_cpu_us_per_req": median(s.upstream_cpu_us_per_req for s in quiet),
                "probes_per_req": round(probes / requests, 4) if counted else None,
                "errors": sum(s.errors for s in quiet),
            }
        )
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def targets_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| target | conns | slices | req/s (median) | CPU µs/req | upstreams' CPU µs/req | probes/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        probes = "-" if r["probes_per_req"] is None else f"{r['probes_per_req']:.3f}"
        lines.append(
            f"| {r['target']} | {r['connections']} | {r['slices']} | {r['rps'] or 0:,.0f} "
            f"| {r['cpu_us_per_req'] or 0:.0f} | {r['upstream_cpu_us_per_req'] or 0:.0f} | {probes} | {r['errors']} |"
        )
    return "\n".join(lines)


def table(summary: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| ratio | conns | slices (contended) | req/s: median (p25-p75) | median's 95% CI | pooled "
        "| CPU/req: median (p25-p75) | p99: median | upstreams' CPU/req: median |",
        "|---|---:|---:|---|---|---:|---|---:|---:|",
    ]
    for r in summary:
        interval = r.get("rps_median_ci95")
        ci = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "-"
        lines.append(
            f"| {r['ratio']} | {r['connections']} | {r['slices']} ({r['contended_slices']}) "
            f"| **{_fmt(r['rps_median'])}** ({_fmt(r['rps_p25'])}-{_fmt(r['rps_p75'])}) | {ci} "
            f"| {_fmt(r['rps_pooled'])} "
            f"| {_fmt(r['cpu_median'])} ({_fmt(r['cpu_p25'])}-{_fmt(r['cpu_p75'])}) | {_fmt(r['p99_median'])} "
            f"| {_fmt(r['upstream_cpu_median'])} |"
        )
    return "\n".join(lines)


def combined(paths: Sequence[Path]) -> tuple[list[Slice], list[str]]:
    """The slices of several runs' JSON files as one run: each file's slices keep their pairs (renumbered
    so that no two files' slices pair), the targets in the order they first appear."""
    slices: list[Slice] = []
    targets: list[str] = []
    for k, path in enumerate(paths):
        data = json.loads(path.read_text(encoding="utf-8"))
        offset = k * 1_000_000
        for item in data["slices"]:
            piece = Slice(**item)
            piece.slice += offset
            slices.append(piece)
        targets += [t for t in data["config"]["targets"] if t not in targets]
    return slices, targets


def report(slices: Sequence[Slice], targets: Sequence[str], max_interference_pct: float) -> dict[str, Any]:
    """Print both tables; the figures for the JSON."""
    summary = summarize(slices, targets, max_interference_pct)
    figures = per_target(slices, max_interference_pct)
    print(targets_table(figures))
    print()
    print(table(summary))
    return {"targets": figures, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead_paired", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated overhead targets")
    parser.add_argument("--connections", default="16,64", help="comma-separated wrk connections [16,64]")
    parser.add_argument("--slices", type=int, default=20, help="slices per connection count [20]")
    parser.add_argument("--slice-s", type=int, default=2, help="seconds of wrk per target per slice [2]")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk per target before the slices [2]")
    parser.add_argument(
        "--max-interference",
        type=float,
        default=20.0,
        help="%% of the proxy CPU taken by other load above which a slice is left out [20]",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="RUN_JSON",
        help="run nothing: report the slices of these runs' JSON files together (written to --json)",
    )
    args = parser.parse_args(argv)
    if args.combine:
        slices, targets = combined(args.combine)
        result = {
            "config": {"combined": [str(p) for p in args.combine], "max_interference_pct": args.max_interference},
            **report(slices, targets, args.max_interference),
        }
        write_results(args.json, result)
        return 0
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS_BY_NAME]
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)} (known: {', '.join(sorted(TARGETS_BY_NAME))})")
    if len(targets) < 2 or len(set(targets)) != len(targets):
        parser.error("--targets: at least two, each once")
    try:
        connections = [int(c) for c in args.connections.split(",") if c]
    except ValueError:
        parser.error("--connections: comma-separated integers")
    if not connections or min(connections) < 1 or args.slices < 1 or args.slice_s < 1 or args.warmup < 0:
        parser.error("--connections, --slices and --slice-s must be >= 1, --warmup >= 0")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install wrk util-linux)")
    started_at = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="overhead-paired-") as tmp:
        slices = run(targets, connections, args.slices, args.slice_s, args.warmup, Path(tmp))
    figures = report(slices, targets, args.max_interference)
    result = {
        "config": {
            "targets": targets,
            "connections": connections,
            "slices": args.slices,
            "slice_s": args.slice_s,
            "warmup_s": args.warmup,
            "max_interference_pct": args.max_interference,
            "clk_tck": CLK_TCK,
            "core_compiled": core_compiled(),
            "versions": versions(),
            "revision": library_revision(),
            "elapsed_s": round(time.monotonic() - started_at, 1),
        },
        **figures,
        "slices": [asdict(s) for s in slices],
    }
    write_results(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

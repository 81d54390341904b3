"""``python -m benchmarks.overhead --rates 100,400,1600``: CPU per request at fixed open-loop rates.

The saturated figures of ``benchmarks.overhead`` (wrk, closed loop) say what a request costs when the
event loop always has work queued; at a moderate rate each request wakes the loop on its own, and the
gateway's timers (health checks, Prequal's idle probes) are spread over fewer requests. This mode
drives each target at fixed rates with the open-loop generator ``benchmarks.openloop`` (Poisson
arrivals, seeded: every target of one round and rate gets the same schedule) over ``--backends``
upstreams (4 by default), and reports, per (target, rate), medians over rounds of:

- the target's CPU per request (µs) and as % of a core;
- the backends' CPU per proxied request (all of them together), and the probes they answered per request;
- the ratios Prequal / round robin of both (``gateway_prequal*`` against ``gateway_round_robin*`` of the
  same transport and revision, median of the per-round ratios), and with ``--baseline-rev`` current /
  baseline of both; with ``gateway_prequal_sync`` beside ``gateway_prequal``, latency p50 / p99 of sync mode
  over the asynchronous default (median of the per-round ratios, and the milliseconds added);
- the load generator's own CPU per request (measured apart, never counted), its lateness (lag p99) and
  the rate it achieved; latency p50 / p99 from the scheduled time; errors.

CPU is read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on the CPU, every thread of the
process) just before and after the measured window, ``/proc/<pid>/stat`` ticks (10 ms) when schedstat
is missing; the window is the requests *scheduled* in it, after ``--warmup`` s at the same rate.
"""

from __future__ import annotations

import contextlib
import json
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import overhead as oh
from .harness.cpu import CLK_TCK, CPU_CLOCK, CpuStat, process_cpu_s
from .harness.ports import free_port
from .harness.procs import Supervisor
from .harness.rounds import rotated
from .harness.stats import median as _median

OPENLOOP_TIMEOUT_S = 5.0
LEAD_S = 0.3  # between the generator's "ready" and arrival 0
LATE_LAG_P99_MS = 5.0  # a generator later than this at p99 flags the result (it may be the bottleneck)


# --- CPU ------------------------------------------------------------------------------------------------
# Per process: ``benchmarks.harness.cpu.process_cpu_s`` (schedstat, else stat ticks).


def per_request_us(cpu_before_s: float, cpu_after_s: float, requests: int) -> float | None:
    """CPU µs per request over a window: the CPU used in it over the requests in it (None without any)."""
    if requests <= 0:
        return None
    return (cpu_after_s - cpu_before_s) / requests * 1e6


@dataclass(frozen=True)
class Snapshot:
    """Everything read at one edge of the measured window."""

    target_cpu_s: float
    upstream_cpu_s: float  # all upstreams together
    client_cpu_s: float
    proxy_cpu: CpuStat
    load_cpu: CpuStat
    probes: int
    upstream_requests: int
    wall_s: float

    @classmethod
    def take(cls, target: int, upstreams: Sequence[int], client: int, settings: oh.Settings, first: bool) -> Snapshot:
        """Before the window (``first``) counters come first, after it last: their own requests stay out."""
        counts = oh.upstream_counters(settings.upstreams) if first else (0, 0)
        snap = cls(
            target_cpu_s=process_cpu_s(target),
            upstream_cpu_s=sum(process_cpu_s(pid) for pid in upstreams),
            client_cpu_s=process_cpu_s(client),
            proxy_cpu=CpuStat.read(settings.proxy_cpu),
            load_cpu=CpuStat.read(settings.load_cpu),
            probes=counts[0],
            upstream_requests=counts[1],
            wall_s=time.perf_counter(),
        )
        if not first:
            counts = oh.upstream_counters(settings.upstreams)
            snap = Snapshot(**{**snap.__dict__, "probes": counts[0], "upstream_requests": counts[1]})
        return snap


# --- one measurement ------------------------------------------------------------------------------------


@dataclass
class RateSample:
    """One measurement: a fresh target process driven at one rate for one window."""

    target: str
    rate: float
    round: int
    scheduled: int  # requests scheduled in the window
    answered: int
    achieved_rps: float  # answers to those requests over the window's length
    p50_ms: float | None
    p99_ms: float | None
    lag_p99_ms: float | None  # how late the generator dispatched (its own lateness)
    cpu_us_per_req: float | None  # the target's
    cpu_pct: float  # the target's, of one core
    upstream_cpu_us_per_req: float | None  # all backends together, per proxied request
    upstream_cpu_pct: float
    client_cpu_us_per_req: float | None  # the load generator's (not counted anywhere else)
    client_cpu_pct: float
    steal_pct: float
    others_pct: float  # of the proxy CPU, used by other processes (a busy machine)
    load_cpu_busy_pct: float
    probes: int | None
    upstream_requests: int | None
    probes_per_req: float | None
    upstream_requests_per_req: float | None
    non_2xx: int
    timeouts: int
    connection_errors: int
    generator: dict[str, Any]
    gateway_stats: dict[str, Any] | None = None
    attempts: int = 1
    contended: bool = False

    @property
    def interference_pct(self) -> float:
        return self.others_pct + self.steal_pct

    @property
    def errors(self) -> int:
        return self.scheduled - self.answered + self.non_2xx

    @property
    def late(self) -> bool:
        return self.lag_p99_ms is not None and self.lag_p99_ms > LATE_LAG_P99_MS


def rate_sample(
    target: str,
    rate: float,
    round_no: int,
    before: Snapshot,
    after: Snapshot,
    generator: dict[str, Any],
    proxies: bool,
    gateway_stats: dict[str, Any] | None = None,
) -> RateSample:
    """The figures of one window from its two snapshots and the generator's summary (no I/O: testable)."""
    answered = int(generator["answered"])
    elapsed = max(after.wall_s - before.wall_s, 1e-9)
    target_s = after.target_cpu_s - before.target_cpu_s
    upstream_s = after.upstream_cpu_s - before.upstream_cpu_s
    client_s = after.client_cpu_s - before.client_cpu_s
    proxy_busy = after.proxy_cpu.busy - before.proxy_cpu.busy
    probes = after.probes - before.probes if proxies else None
    upstream_requests = after.upstream_requests - before.upstream_requests if proxies else None
    return RateSample(
        target=target,
        rate=rate,
        round=round_no,
        scheduled=int(generator["scheduled"]),
        answered=answered,
        achieved_rps=float(generator["answered_rps"] or 0.0),
        p50_ms=generator.get("p50_ms"),
        p99_ms=generator.get("p99_ms"),
        lag_p99_ms=generator.get("lag_p99_ms"),
        cpu_us_per_req=per_request_us(before.target_cpu_s, after.target_cpu_s, answered),
        cpu_pct=100.0 * target_s / elapsed,
        upstream_cpu_us_per_req=per_request_us(before.upstream_cpu_s, after.upstream_cpu_s, answered),
        upstream_cpu_pct=100.0 * upstream_s / elapsed,
        client_cpu_us_per_req=per_request_us(before.client_cpu_s, after.client_cpu_s, answered),
        client_cpu_pct=100.0 * client_s / elapsed,
        steal_pct=after.proxy_cpu.pct_since(before.proxy_cpu, after.proxy_cpu.steal - before.proxy_cpu.steal),
        others_pct=after.proxy_cpu.pct_since(before.proxy_cpu, max(0, round(proxy_busy - target_s * CLK_TCK))),
        load_cpu_busy_pct=after.load_cpu.pct_since(before.load_cpu, after.load_cpu.busy - before.load_cpu.busy),
        probes=probes,
        upstream_requests=upstream_requests,
        probes_per_req=probes / answered if probes is not None and answered else None,
        upstream_requests_per_req=upstream_requests / answered if upstream_requests is not None and answered else None,
        non_2xx=int(generator["non_2xx"]),
        timeouts=int(generator["timeouts"]),
        connection_errors=int(generator["connection_errors"]) + int(generator.get("unsent", 0)),
        generator=generator,
        gateway_stats=gateway_stats,
    )


def _read_json_line(proc: subprocess.Popen[str], timeout_s: float, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise RuntimeError(f"{what}: no answer within {timeout_s:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: the load generator exited ({proc.poll()})")
    result: dict[str, Any] = json.loads(line)
    return result


def _send(proc: subprocess.Popen[str], payload: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(payload) + "\n")
    proc.stdin.flush()


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)


@contextlib.contextmanager
def generator_process(cpu: int, log_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -m benchmarks.openloop`` pinned to ``cpu``; stopped by its PID on the way out."""
    with (log_dir / f"openloop-{time.monotonic_ns()}.log").open("w") as log, Supervisor() as supervisor:
        proc = supervisor.spawn(
            [sys.executable, "-m", "benchmarks.openloop"],
            cpu=cpu,
            cwd=oh.REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            yield proc
        finally:
            supervisor.stop(proc, oh.STOP_TIMEOUT_S)


def measure_rate(target: oh.Target, rate: float, round_no: int, settings: oh.Settings, log_dir: Path) -> RateSample:
    port = free_port(oh.HOST)
    url = f"http://{oh.HOST}:{port}{oh.PATH}"
    ctx = oh.LaunchContext(port, list(settings.upstreams) if target.proxies else [], log_dir, None)
    spec = {
        "host": oh.HOST,
        "port": port,
        "path": oh.PATH,
        "rate": rate,
        "warmup_s": float(settings.warmup_s),
        "duration_s": float(settings.duration_s),
        "arrivals": settings.arrivals,
        "seed": settings.seed * 1000 + round_no,  # the same schedule for every target of a round and rate
        "timeout_s": OPENLOOP_TIMEOUT_S,
    }
    with oh.started(target.name, target.command(ctx), settings.proxy_cpu, log_dir, url, target.cwd) as process:
        with generator_process(settings.load_cpu, log_dir) as gen:
            _send(gen, spec)
            _read_json_line(gen, oh.STARTUP_TIMEOUT_S, "load generator startup")
            t0 = time.time() + LEAD_S
            _send(gen, {"t0": t0})
            _sleep_until(t0 + settings.warmup_s)
            before = Snapshot.take(process.pid, settings.upstream_pids, gen.pid, settings, first=True)
            _sleep_until(t0 + settings.warmup_s + settings.duration_s)
            after = Snapshot.take(process.pid, settings.upstream_pids, gen.pid, settings, first=False)
            result = _read_json_line(gen, OPENLOOP_TIMEOUT_S + 30.0, "load generator")
        if not process.alive():
            raise RuntimeError(f"{target.name} died during the run:\n{process.log_tail()}")
    return rate_sample(target.name, rate, round_no, before, after, result, target.proxies, process.stats())


def progress(sample: RateSample, rounds: int) -> str:
    line = (
        f"[round {sample.round}/{rounds}] {sample.target:<24} {sample.rate:>6g} req/s "
        f"(achieved {sample.achieved_rps:,.0f}) cpu {_f(sample.cpu_us_per_req, '.0f')} us/req "
        f"({sample.cpu_pct:.0f}% core; others {sample.others_pct:.0f}%, steal {sample.steal_pct:.0f}%)  "
        f"backends {_f(sample.upstream_cpu_us_per_req, '.0f')} us/req  client {_f(sample.client_cpu_us_per_req, '.0f')}"
        f" us/req ({sample.client_cpu_pct:.0f}%), lag p99 {_f(sample.lag_p99_ms, '.1f')} ms  "
        f"p50 {_f(sample.p50_ms, '.2f')} p99 {_f(sample.p99_ms, '.2f')} ms"
    )
    if sample.probes_per_req is not None:
        line += f"  probes/req {sample.probes_per_req:.2f}"
    if sample.errors:
        line += f"  ERRORS: {sample.errors} ({sample.timeouts} timeouts, {sample.non_2xx} non-2xx)"
    if sample.late:
        line += "  LATE GENERATOR"
    return line


def run_rates(settings: oh.Settings, log_dir: Path) -> list[RateSample]:
    """Every (round, rate, target) measurement, the target order rotated each round."""
    samples: list[RateSample] = []
    with oh.upstreams_running(settings, log_dir) as backends:
        for round_index in range(settings.rounds):
            for rate in settings.rates:
                for name in rotated(settings.targets, round_index):
                    target = oh.TARGETS_BY_NAME[name]

                    def once(target: oh.Target = target, rate: float = rate, r: int = round_index + 1) -> RateSample:
                        return measure_rate(target, rate, r, settings, log_dir)

                    samples.append(oh.quietest(once, lambda s: progress(s, settings.rounds), settings))
            oh.check_alive(backends)
    return samples


# --- summary ---------------------------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


SETTINGS_VARIANT = "_agebound"  # a Prequal target with other settings, on the default transport


def round_robin_twin(name: str) -> str | None:
    """The round-robin target a Prequal target is compared with: same transport, same revision."""
    base, at, rev = name.partition("@")
    if "prequal" not in base:
        return None
    base = base.removesuffix(SETTINGS_VARIANT)  # the same transport: compared with the plain round robin
    return base.replace("prequal", "round_robin", 1) + at + rev


def _paired(samples: Sequence[RateSample], ours: Sequence[RateSample], other: str, key: str) -> float | None:
    """Median over rounds of ours[key] / other's[key] in the same round and rate."""
    theirs = {(s.round, s.rate): s for s in samples if s.target == other}
    ratios = []
    for s in ours:
        b = theirs.get((s.round, s.rate))
        a_value, b_value = getattr(s, key), getattr(b, key) if b is not None else None
        if a_value is not None and b_value:
            ratios.append(a_value / b_value)
    return statistics.median(ratios) if ratios else None


def summarize_rates(samples: list[RateSample], settings: oh.Settings) -> list[dict[str, Any]]:
    """Per (rate, target): medians over rounds, min-max of the target's CPU per request, ratios."""
    results: list[dict[str, Any]] = []
    for rate in settings.rates:
        for name in settings.targets:
            group = [s for s in samples if s.target == name and s.rate == rate]
            if not group:
                continue
            twin = round_robin_twin(name) or ""
            has_twin = bool(twin) and any(s.target == twin for s in samples)
            cpu = [s.cpu_us_per_req for s in group if s.cpu_us_per_req is not None]
            errors = sum(s.errors for s in group)
            results.append(
                {
                    "target": name,
                    "rate": rate,
                    "achieved_rps": statistics.median(s.achieved_rps for s in group),
                    "cpu_us_per_req": _median([s.cpu_us_per_req for s in group]),
                    "cpu_us_per_req_min": min(cpu) if cpu else None,
                    "cpu_us_per_req_max": max(cpu) if cpu else None,
                    "cpu_pct": statistics.median(s.cpu_pct for s in group),
                    "upstream_cpu_us_per_req": _median([s.upstream_cpu_us_per_req for s in group]),
                    "upstream_cpu_pct": statistics.median(s.upstream_cpu_pct for s in group),
                    "client_cpu_us_per_req": _median([s.client_cpu_us_per_req for s in group]),
                    "client_cpu_pct": statistics.median(s.client_cpu_pct for s in group),
                    "lag_p99_ms": _median([s.lag_p99_ms for s in group]),
                    "p50_ms": _median([s.p50_ms for s in group]),
                    "p99_ms": _median([s.p99_ms for s in group]),
                    "probes_per_req": _median([s.probes_per_req for s in group]),
                    "upstream_requests_per_req": _median([s.upstream_requests_per_req for s in group]),
                    "vs_round_robin": twin if has_twin else None,
                    "cpu_vs_round_robin": _paired(samples, group, twin, "cpu_us_per_req") if has_twin else None,
                    "upstream_cpu_vs_round_robin": (
                        _paired(samples, group, twin, "upstream_cpu_us_per_req") if has_twin else None
                    ),
                    "steal_pct": statistics.median(s.steal_pct for s in group),
                    "others_pct": statistics.median(s.others_pct for s in group),
                    "load_cpu_busy_pct": statistics.median(s.load_cpu_busy_pct for s in group),
                    "errors": errors,
                    "late_rounds": sum(s.late for s in group),
                    "flagged": errors > 0 or any(s.late for s in group),
                    "contended_rounds": sum(s.contended for s in group),
                    "rounds": len(group),
                    "samples": [{**asdict(s), "errors": s.errors} for s in group],
                }
            )
    return results


def rates_against_baseline_rev(samples: list[RateSample], settings: oh.Settings) -> list[dict[str, Any]]:
    """Per gateway target and rate: median over rounds of (current / ``@rev``), same round."""
    out: list[dict[str, Any]] = []
    for name in settings.targets:
        current, at, rev = name.partition("@")
        if not at:
            continue
        for rate in settings.rates:
            ours = [s for s in samples if s.target == current and s.rate == rate]
            rounds = {s.round for s in samples if s.target == name and s.rate == rate} & {s.round for s in ours}
            out.append(
                {
                    "target": current,
                    "rev": rev,
                    "rate": rate,
                    "cpu_ratio": _paired(samples, ours, name, "cpu_us_per_req"),
                    "upstream_cpu_ratio": _paired(samples, ours, name, "upstream_cpu_us_per_req"),
                    "rounds": len(rounds),
                }
            )
    return out


def async_twin(name: str) -> str | None:
    """The asynchronous Prequal target a sync-mode one is compared with: same revision."""
    base, at, rev = name.partition("@")
    if "prequal_sync" not in base:
        return None
    return base.replace("prequal_sync", "prequal", 1) + at + rev


def sync_against_async(samples: list[RateSample], settings: oh.Settings) -> list[dict[str, Any]]:
    """Per sync-mode target and rate: latency p50 and p99 as (sync / async), the median of the ratios of
    rounds where both ran (interleaved, same arrivals), and the added milliseconds likewise."""
    out: list[dict[str, Any]] = []
    for name in settings.targets:
        twin = async_twin(name)
        if twin is None or twin not in settings.targets:
            continue
        for rate in settings.rates:
            ours = [s for s in samples if s.target == name and s.rate == rate]
            theirs = {s.round: s for s in samples if s.target == twin and s.rate == rate}
            row: dict[str, Any] = {"target": name, "vs": twin, "rate": rate}
            for key in ("p50_ms", "p99_ms"):
                ratios, added = [], []
                for s in ours:
                    a, b = getattr(s, key), getattr(theirs[s.round], key) if s.round in theirs else None
                    if a is not None and b:
                        ratios.append(a / b)
                        added.append(a - b)
                row[key.replace("_ms", "_ratio")] = statistics.median(ratios) if ratios else None
                row[key.replace("_ms", "_added_ms")] = statistics.median(added) if added else None
            row["rounds"] = len([s for s in ours if s.round in theirs])
            out.append(row)
    return out


def sync_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| target vs async | req/s | p50 sync / async | p50 added ms | p99 sync / async | p99 added ms | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} vs {r['vs']} | {r['rate']:,.0f} | {_f(r['p50_ratio'], '.2f')} "
            f"| {_f(r['p50_added_ms'], '.2f')} | {_f(r['p99_ratio'], '.2f')} | {_f(r['p99_added_ms'], '.2f')} "
            f"| {r['rounds']} |"
        )
    return "\n".join(lines)


def rates_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the medians, one row per (rate, target)."""
    head = (
        "| target | req/s offered (achieved) | gateway CPU µs/req (min-max) | gateway CPU % core "
        "| backends CPU µs/req | Prequal / round robin: gateway, backends | probes/req "
        "| p50 ms | p99 ms | client CPU µs/req (not counted) | client lag p99 ms | errors |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        cpu = f"{_f(r['cpu_us_per_req'], ',.0f')} ({_f(r['cpu_us_per_req_min'], ',.0f')}-"
        cpu += f"{_f(r['cpu_us_per_req_max'], ',.0f')})"
        versus = "-"
        if r["vs_round_robin"] is not None:
            versus = f"{_f(r['cpu_vs_round_robin'], '.2f')}×, {_f(r['upstream_cpu_vs_round_robin'], '.2f')}×"
        errors = str(r["errors"])
        if r["flagged"]:
            errors = f"**{r['errors']}**" + (" (late generator)" if r["late_rounds"] else "")
        lines.append(
            f"| {r['target']} | {r['rate']:,.0f} ({r['achieved_rps']:,.0f}) | {cpu} | {r['cpu_pct']:.1f} "
            f"| {_f(r['upstream_cpu_us_per_req'], ',.0f')} | {versus} | {_f(r['probes_per_req'], '.2f')} "
            f"| {_f(r['p50_ms'], '.2f')} | {_f(r['p99_ms'], '.2f')} | {_f(r['client_cpu_us_per_req'], ',.0f')} "
            f"| {_f(r['lag_p99_ms'], '.1f')} | {errors} |"
        )
    return "\n".join(lines)


def versus_table(versus: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| target | req/s | gateway CPU µs/req current / baseline rev | backends CPU µs/req current / baseline rev "
        "| rounds |",
        "|---|---|---|---|---|",
    ]
    for v in versus:
        lines.append(
            f"| {v['target']} vs @{v['rev']} | {v['rate']:,.0f} | {_f(v['cpu_ratio'], '.3f')} "
            f"| {_f(v['upstream_cpu_ratio'], '.3f')} | {v['rounds']} |"
        )
    return "\n".join(lines)


def config_json(settings: oh.Settings) -> dict[str, Any]:
    return {
        "mode": "rates",
        "rates": settings.rates,
        "arrivals": settings.arrivals,
        "seed": settings.seed,
        "open_loop_client": (
            "python -m benchmarks.openloop: keep-alive HTTP/1.1 on asyncio protocols + httptools, uvloop, "
            f"1 ms timer resolution, {OPENLOOP_TIMEOUT_S:g} s timeout from the scheduled time"
        ),
        "cpu_clock": CPU_CLOCK,
        "cpu_per_request": "CPU used in the measured window / answers to the requests scheduled in it",
        "late_lag_p99_ms": LATE_LAG_P99_MS,
    }

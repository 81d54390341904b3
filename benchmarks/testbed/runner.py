"""The testbed's orchestration: the replica fleet, then one fresh contender and load generator per run.

Per run (one contender, one setting, one load, one round):

1. start the contender's processes (pinned to the balancer CPU) and wait until ``GET /healthz`` through
   every instance answers 200;
2. wait until every replica is idle (nothing left from the previous run);
3. start the load generator (pinned to the load CPU), let it draw its schedule, then set the run's
   epoch ``t0`` on every replica (antagonist clock and counters restart) and start the load at ``t0``;
4. read the contender's CPU (its processes and their descendants) at ``t0 + warmup`` and at the end of
   the measured window, and the balancer CPU's steal time;
5. collect the load generator's records and the replicas' counters for the measured window, stop the
   contender by PID.

Requests scheduled during the warm-up are sent but not measured.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..harness.cpu import cpu_jiffies, cpu_times
from ..harness.ports import free_port
from ..harness.procs import Supervisor
from ..harness.stats import percentile
from .contenders import DEFAULT_FLEET_INSTANCES, Contender, plan
from .fleet import FleetConfig, mean_speeds
from .metrics import pearson, summarize_records

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 20.0
IDLE_TIMEOUT_S = 20.0
EPOCH_LEAD_S = 0.3


class TestbedError(RuntimeError):
    """Something the benchmark cannot go on without (a process that would not start or answer)."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """What one benchmark invocation runs."""

    contenders: list[str]
    settings: list[str]
    loads: list[float]
    seconds: float
    warmup_s: float
    rounds: int
    seed: int
    deadline_s: float
    fleet: FleetConfig
    replica_processes: int
    balancer_cpu: int = 1
    load_cpu: int = 0
    max_cpu_pct: float = 70.0
    # The balancers share one CPU: four processes each under ``max_cpu_pct`` can still keep it saturated,
    # and then the run measures queueing for that CPU, not the policy. The whole CPU's busy share (their
    # work plus anything else scheduled there) must stay under this too.
    max_core_pct: float = 80.0
    fleet_instances: int = DEFAULT_FLEET_INSTANCES
    prequal_q_rif: float | None = None
    pin: bool = True
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def read_line(proc: subprocess.Popen[Any], timeout_s: float, what: str) -> dict[str, Any]:
    """The next JSON line ``proc`` prints, within ``timeout_s``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TestbedError(f"{what}: no answer within {timeout_s:g} s")
    line = proc.stdout.readline()
    if not line:
        raise TestbedError(f"{what}: the process exited (status {proc.poll()})")
    result: dict[str, Any] = json.loads(line)
    return result


def send_line(proc: subprocess.Popen[Any], payload: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(payload) + "\n")
    proc.stdin.flush()


class Fleet:
    """The replica processes (alive for the whole benchmark)."""

    def __init__(self, config: FleetConfig, processes: int, supervisor: Supervisor, cpu: int) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[Any]] = []
        self.ports: list[int] = [0] * config.replicas
        processes = max(1, min(processes, config.replicas))
        for p in range(processes):
            indices = [i for i in range(config.replicas) if i % processes == p]
            spec = json.dumps({"fleet": config.to_dict() | {"specs": []}, "indices": indices})
            proc = supervisor.spawn(
                [sys.executable, "-m", "benchmarks.testbed.replica", spec],
                cpu=cpu,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=str(REPO),
            )
            self.procs.append(proc)
            ports = read_line(proc, STARTUP_TIMEOUT_S, "replica process startup")["ports"]
            for index, port in zip(indices, ports, strict=True):
                self.ports[index] = int(port)

    def command(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        for proc in self.procs:
            send_line(proc, payload)
        return [read_line(proc, 10.0, f"replica command {payload['cmd']}") for proc in self.procs]

    def stats(self, window: tuple[float, float]) -> list[dict[str, Any]]:
        replicas = [r for reply in self.command({"cmd": "stats", "window": list(window)}) for r in reply["replicas"]]
        return sorted(replicas, key=lambda r: r["index"])

    def wait_idle(self, timeout_s: float) -> int:
        """Wait until no replica has a request in flight; returns what is still in flight at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            busy = sum(int(r["in_flight"]) for r in self.stats((0.0, 0.0)))
            if busy == 0 or time.monotonic() > deadline:
                return busy
            time.sleep(0.2)


def _http_ok(port: int, timeout_s: float, procs: Sequence[subprocess.Popen[Any]]) -> bool:
    """``GET /work`` (no work) through ``port`` answers 200 within ``timeout_s`` (False if a process died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/work", timeout=2.0) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def _sleep_until(unix: float) -> None:
    delay = unix - time.time()
    if delay > 0:
        time.sleep(delay)


class Runner:
    """Runs the benchmark's runs one by one on a started fleet."""

    def __init__(self, options: Options, supervisor: Supervisor, fleet: Fleet, log: Callable[[str], None]) -> None:
        self.options = options
        self.supervisor = supervisor
        self.fleet = fleet
        self.log = log

    def run(self, contender: Contender, setting: str, load: float, round_index: int) -> dict[str, Any]:
        o = self.options
        fleet_config = self.fleet.config
        rate = load * fleet_config.capacity_qps
        key = f"round{round_index}:load{load:g}"
        horizon = o.warmup_s + o.seconds + o.deadline_s + 10.0
        window = (o.warmup_s, o.warmup_s + o.seconds)
        instances = o.fleet_instances if setting == "fleet" else 1
        with tempfile.TemporaryDirectory(prefix="prequal-testbed-") as tmp:
            workdir = Path(tmp)
            workdir.chmod(0o755)  # nginx workers may run as another user
            ports = [free_port() for _ in range(instances)]
            seed = o.seed * 1000 + round_index
            launch = plan(contender, instances, self.fleet.ports, ports, workdir, seed, o.prequal_q_rif)
            procs: list[subprocess.Popen[Any]] = []
            loadgen: subprocess.Popen[Any] | None = None
            try:
                for i, argv in enumerate(launch.commands):
                    with open(workdir / f"contender-{i}.log", "w", encoding="utf-8") as log_file:
                        procs.append(
                            self.supervisor.spawn(
                                argv, cpu=o.balancer_cpu, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(REPO)
                            )
                        )
                for port in launch.ports:
                    if not _http_ok(port, STARTUP_TIMEOUT_S, procs):
                        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in workdir.glob("*.log"))
                        raise TestbedError(f"{contender.name} ({setting}) did not answer on port {port}:\n{logs}")
                for proc in procs:
                    self.supervisor.note_descendants(proc)
                leftover = self.fleet.wait_idle(IDLE_TIMEOUT_S)

                out = workdir / "records.json"
                spec = {
                    "targets": [f"http://127.0.0.1:{p}" for p in launch.ports],
                    "rate": rate,
                    "warmup_s": o.warmup_s,
                    "seconds": o.seconds,
                    "deadline_s": o.deadline_s,
                    "work_mu_s": fleet_config.work_mu_s,
                    "seed_key": f"{o.seed}:{key}",
                    "out": str(out),
                }
                loadgen = self.supervisor.spawn(
                    [sys.executable, "-m", "benchmarks.testbed.loadgen"],
                    cpu=o.load_cpu,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=str(REPO),
                )
                send_line(loadgen, spec)
                read_line(loadgen, STARTUP_TIMEOUT_S, "load generator startup")
                t0 = time.time() + EPOCH_LEAD_S
                self.fleet.command({"cmd": "epoch", "t0": t0, "key": key, "horizon_s": horizon})
                send_line(loadgen, {"t0": t0})

                pids = [p.pid for p in procs]
                others = [p.pid for p in self.fleet.procs] + [loadgen.pid]
                _sleep_until(t0 + window[0])
                cpu_before, others_before = cpu_times(pids), cpu_times(others)
                jiffies_before = cpu_jiffies(o.balancer_cpu), cpu_jiffies(o.load_cpu)
                wall_before = time.monotonic()
                _sleep_until(t0 + window[1])
                cpu_after, others_after = cpu_times(pids), cpu_times(others)
                jiffies_after = cpu_jiffies(o.balancer_cpu), cpu_jiffies(o.load_cpu)
                wall = time.monotonic() - wall_before
                crashed = [p.pid for p in procs if p.poll() is not None]
                crash_logs = {
                    p.pid: (workdir / f"contender-{i}.log").read_text(errors="replace")[-3000:]
                    for i, p in enumerate(procs)
                    if p.pid in crashed
                }
                exit_codes = {p.pid: p.returncode for p in procs if p.pid in crashed}

                read_line(loadgen, o.deadline_s + 60.0, "load generator")
                loadgen.wait(30.0)
                document = json.loads(out.read_text(encoding="utf-8"))
                replica_stats = self.fleet.stats(window)
            finally:
                if loadgen is not None:
                    self.supervisor.stop(loadgen)
                for proc in reversed(procs):
                    self.supervisor.stop(proc)
            gateway_counters = _gateway_counters(workdir)

        summary, latencies = summarize_records(document["records"], window, o.deadline_s, fleet_config.replicas)
        deltas = {pid: cpu_after[pid] - cpu_before.get(pid, cpu_after[pid]) for pid in cpu_after}
        cpu_pct = 100.0 * sum(deltas.values()) / wall
        max_process = 100.0 * max(deltas.values(), default=0.0) / wall
        (busy1, steal1, total1), (busy0, _, _) = jiffies_after
        balancer_busy, balancer_steal, balancer_total = (
            busy1 - jiffies_before[0][0],
            steal1 - jiffies_before[0][1],
            total1 - jiffies_before[0][2],
        )
        load_busy = busy0 - jiffies_before[1][0]
        probes = sum(r["probes"] for r in replica_stats)
        routed = [int(r["requests"]) for r in replica_stats]
        summary["served_shares"] = summary.pop("shares")
        summary["shares"] = [n / sum(routed) if sum(routed) else 0.0 for n in routed]
        summary["routed_requests"] = routed
        if fleet_config.sinkholes:
            # What plain round robin would send them: their even share of the attempts, one per request.
            even = summary["requests"] * fleet_config.sinkholes / fleet_config.replicas
            summary["sinkhole_attempts"] = sum(routed[fleet_config.honest :])
            summary["sinkhole_avoided"] = 1.0 - summary["sinkhole_attempts"] / even if even else None
        rif_samples = sorted(n for r in replica_stats for n in r["rif_samples"])
        speeds = mean_speeds(fleet_config, key, horizon, window[0], window[1])
        core_pct = 100.0 * balancer_busy / wall
        notes = cpu_limits_broken(o, max_process, core_pct)
        valid = not notes and not crashed
        if crashed:
            notes.append(f"balancer process(es) exited during the run (pid: status {exit_codes})")
        if leftover:
            notes.append(f"{leftover} requests were still in flight at the replicas before the run")
        if summary["loadgen_lag_p99_ms"] > 20.0:
            notes.append(f"the load generator ran late (p99 lag {summary['loadgen_lag_p99_ms']:.0f} ms)")
        replicas_cpu = sum(others_after.get(p.pid, 0.0) - others_before.get(p.pid, 0.0) for p in self.fleet.procs)
        loadgen_cpu = others_after.get(loadgen.pid, 0.0) - others_before.get(loadgen.pid, 0.0)
        return {
            "policy": contender.name,
            "setting": setting,
            "load": load,
            "round": round_index,
            "rate_rps": rate,
            **summary,
            "cpu_pct": cpu_pct,
            "max_process_cpu_pct": max_process,
            "balancer_core_pct": core_pct,
            "balancer_processes": len(deltas),
            "cpu_us_per_req": 1e6 * sum(deltas.values()) / max(1, summary["requests"]),
            "steal_pct": 100.0 * balancer_steal / balancer_total if balancer_total > 0 else None,
            # What else ran on each CPU during the window (other jobs on a shared machine), % of that CPU.
            "balancer_cpu_interference_pct": 100.0 * max(0.0, balancer_busy - sum(deltas.values())) / wall,
            "load_cpu_interference_pct": 100.0 * max(0.0, load_busy - replicas_cpu - loadgen_cpu) / wall,
            "replicas_cpu_pct": 100.0 * replicas_cpu / wall,
            "loadgen_cpu_pct": 100.0 * loadgen_cpu / wall,
            "loadgen_max_in_flight": document.get("max_in_flight"),
            "probes_per_req": probes / summary["requests"] if summary["requests"] else None,
            "health_checks": sum(r["health_checks"] for r in replica_stats),
            "expired_at_replicas": sum(r["expired"] for r in replica_stats),
            "rif_p99": percentile(rif_samples, 0.99) if rif_samples else None,
            "rif_max": rif_samples[-1] if rif_samples else None,
            "mean_speeds": speeds,
            "share_speed_corr": pearson(summary["shares"], speeds),
            "gateway": gateway_counters,
            **_gateway_rates(gateway_counters),
            "valid": valid,
            "notes": notes,
            "crash_logs": crash_logs,
            "cdf_ms": latencies,
        }


def _gateway_counters(workdir: Path) -> dict[str, dict[str, float]] | None:
    """The counters our gateway processes wrote at shutdown, summed over instances (None for nginx, haproxy)."""
    files = sorted(workdir.glob("gateway-*.json"))
    if not files:
        return None
    total: dict[str, dict[str, float]] = {}
    for path in files:
        for name, values in json.loads(path.read_text(encoding="utf-8")).items():
            bucket = total.setdefault(name, {})
            for key, value in values.items():
                bucket[key] = bucket.get(key, 0.0) + value
    return total


def _gateway_rates(counters: dict[str, dict[str, float]] | None) -> dict[str, float | None]:
    """Shares over the whole run (warm-up included): fallback choices, probes failed and skipped."""
    if counters is None:
        return {"fallback_pct": None, "probe_failed_pct": None, "probe_skipped_pct": None, "ejections": None}
    selections = counters.get("selections", {})
    probes = counters.get("probes", {})
    chosen = sum(selections.values())
    asked = sum(probes.values())
    return {
        "fallback_pct": 100.0 * selections.get("fallback", 0.0) / chosen if chosen else None,
        "probe_failed_pct": 100.0 * probes.get("failed", 0.0) / asked if asked else None,
        "probe_skipped_pct": 100.0 * probes.get("skipped", 0.0) / asked if asked else None,
        "ejections": sum(counters.get("ejections", {}).values()),
    }


def schedule(options: Options, available: Sequence[str]) -> list[tuple[int, float, str, str]]:
    """(round, load, setting, contender) in run order: contenders interleaved, the order rotated."""
    runs = []
    block = 0
    for r in range(options.rounds):
        for load in options.loads:
            for setting in options.settings:
                names = list(available)
                shift = block % len(names) if names else 0
                block += 1
                for name in names[shift:] + names[:shift]:
                    runs.append((r, load, setting, name))
    return runs


def cpu_limits_broken(options: Options, max_process_pct: float, core_pct: float) -> list[str]:
    """Why a run is invalid on CPU grounds (empty: valid): one balancer process above ``max_cpu_pct`` of a
    core, or the balancers' shared CPU busier than ``max_core_pct`` (their work plus anything else on it)."""
    notes = []
    if max_process_pct > options.max_cpu_pct:
        notes.append(f"a balancer process used {max_process_pct:.0f}% of a core (> {options.max_cpu_pct:g}%)")
    if core_pct > options.max_core_pct:
        notes.append(f"the balancers' CPU was {core_pct:.0f}% busy (> {options.max_core_pct:g}%)")
    return notes


def options_json(options: Options) -> dict[str, Any]:
    data = asdict(options)
    data["fleet"] = options.fleet.to_dict()
    data["capacity_rps"] = options.fleet.capacity_qps
    data["mean_work_s"] = options.fleet.mean_work_s
    return data

"""Smoke test of ``python -m benchmarks.testbed``: a tiny real run (replicas, load generator, contenders).

    pytest tests/test_benchmark_testbed.py

Runs the benchmark as a subprocess with a small configuration (6 replicas, one load, 1 + 2 s runs) and
checks the JSON it writes and that no process it started is left behind. nginx and haproxy contenders
are included when installed, and always under ``CI`` (where their absence then fails the test:
``python -m benchmarks.testbed --setup`` installs them). Linux only (/proc). About 20-40 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GATEWAY_CONTENDERS = ["prequal", "round_robin"]
EXTERNAL_CONTENDERS = {"nginx_least_conn": "nginx", "haproxy_leastconn": "haproxy"}
RESULT_KEYS: dict[str, type | tuple[type, ...]] = {
    "policy": str,
    "setting": str,
    "load": (int, float),
    "requests": int,
    "errors": int,
    "p50_ms": (int, float),
    "p90_ms": (int, float),
    "p99_ms": (int, float),
    "p999_ms": (int, float),
    "cpu_pct": (int, float),
    "valid": bool,
    "shares": list,
}

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the testbed reads /proc (Linux)")


def _installed(binary: str) -> bool:
    return any(shutil.which(binary) or Path(d, binary).is_file() for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"))


def _stat(pid: str) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) of a process."""
    text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _tagged_processes(tag: str, scratch: Path, started_after: int) -> list[str]:
    """Processes the benchmark started that are still alive.

    They carry ``tag`` in their environment, except nginx, which rewrites that memory for its process
    titles: its master names the benchmark's temporary directory (under ``scratch``, this test's own
    ``TMPDIR``: another testbed running on the machine is never matched), and a worker has such a master as
    parent, or init if orphaned (then it started after ``started_after``, in clock ticks since boot, and is
    reported, not killed: it cannot be told apart from another run's).
    """
    needle = f"TESTBED_SMOKE_TAG={tag}".encode()
    found: dict[int, str] = {}
    workers: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid, start = _stat(entry)
        except (OSError, ValueError):
            continue
        if needle in environ.split(b"\0") or str(scratch) in cmdline:
            found[int(entry)] = cmdline.strip()
        elif cmdline.startswith("nginx: worker process"):
            workers[int(entry)] = (ppid, start, cmdline.strip())
    for pid, (ppid, start, cmdline) in workers.items():
        if ppid in found or (ppid == 1 and start >= started_after):
            found[pid] = cmdline
    return [f"{pid}: {cmdline}" for pid, cmdline in found.items()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _orphan(line: str) -> bool:
    return line.split(": ", 1)[1].startswith("nginx: worker process") and _stat(line.split(":", 1)[0])[0] == 1


def test_quick_run_writes_results_and_leaves_no_process(tmp_path: Path) -> None:
    contenders = list(GATEWAY_CONTENDERS)
    for name, binary in EXTERNAL_CONTENDERS.items():
        if _installed(binary) or os.environ.get("CI"):
            contenders.append(name)
    out = tmp_path / "testbed.json"
    command = [sys.executable, "-m", "benchmarks.testbed", "--quick", "--loads", "0.8", "--seconds", "2"]
    command += ["--warmup", "1", "--contenders", ",".join(contenders), "--no-plots", "--json", str(out)]
    tag = uuid.uuid4().hex
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TESTBED_SMOKE_TAG": tag, "TMPDIR": str(scratch)}
    started_after = _stat("self")[1]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False)
    leftover = _tagged_processes(tag, scratch, started_after)
    for line in leftover:  # never leave them running, even when the test fails (but only ours, by PID)
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _orphan(line):
                continue
        pid = int(line.split(":", 1)[0])
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert not leftover, f"processes left behind: {leftover}"

    data = json.loads(out.read_text())
    config = data["config"]
    assert config["loads"] == [0.8] and config["settings"] == ["single"] and config["rounds"] == 1
    assert config["capacity_rps"] > 0 and not config["interrupted"] and not config["failures"]
    assert config["contenders_run"] == contenders, (config["skipped"], done.stderr)
    results = {r["policy"]: r for r in data["results"]}
    assert set(results) == set(contenders)
    for name, result in results.items():
        for key, kind in RESULT_KEYS.items():
            assert isinstance(result[key], kind), (name, key, result[key])
        assert result["setting"] == "single" and result["load"] == 0.8
        assert result["requests"] > 0
        assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["p999_ms"]
        assert len(result["shares"]) == config["fleet"]["replicas"]
        assert abs(sum(result["shares"]) - 1.0) < 1e-6
    assert results["prequal"]["probes_per_req"] > 0  # counted at the replicas
    assert results["round_robin"]["probes_per_req"] == 0
    assert "| single | 0.8 | prequal |" in done.stdout  # the summary table
    # The oracle replayed offline over the very queries the load generator sent (same count), below them.
    replays = {r["policy"]: r for r in data["replays"]}
    assert set(replays) == {"oracle", "round_robin"}
    assert replays["oracle"]["requests"] == results["prequal"]["requests"]
    assert replays["oracle"]["p99_ms"] <= min(r["p99_ms"] for r in results.values())
    assert "| single | 0.8 | **oracle** (replay) |" in done.stdout
    from benchmarks.testbed.oracle import oracle_points  # what the tail plot draws as its floor

    assert oracle_points(data, "p99_ms") == [(0.8, replays["oracle"]["p99_ms"])]
    from benchmarks.testbed.oracle import oracle_cdf  # the CDF plot's oracle, replayed from the config alone

    cdf = dict((q, ms) for q, ms in oracle_cdf(data, 0.8))
    assert cdf[0.99] == pytest.approx(replays["oracle"]["p99_ms"]) and cdf[0.5] == pytest.approx(
        replays["oracle"]["p50_ms"]
    )


def test_prequal_variants_run_the_gateway_with_their_own_q_rif(tmp_path: Path) -> None:
    from benchmarks.testbed.cli import build_parser
    from benchmarks.testbed.contenders import contender, gateway_app, plan

    variant = contender("prequal_q0.6")
    assert (variant.kind, variant.method, variant.q_rif) == ("gateway", "prequal", 0.6)
    argv = plan(variant, 2, [9001, 9002], [8001, 8002], tmp_path, seed=1, q_rif=0.9).commands
    assert [a[a.index("--q-rif") + 1] for a in argv] == ["0.6", "0.6"]  # the variant wins over the run's setting
    plain = plan(contender("prequal"), 1, [9001], [8001], tmp_path, seed=1, q_rif=0.9).commands[0]
    assert plain[plain.index("--q-rif") + 1] == "0.9"
    assert "--q-rif" not in plan(contender("prequal"), 1, [9001], [8001], tmp_path, seed=1).commands[0]
    assert "--fallback" not in plain
    old = contender("prequal_q0.84_random")
    assert (old.q_rif, old.fallback) == (0.84, "random")
    old_argv = plan(old, 1, [9001], [8001], tmp_path, seed=1).commands[0]
    assert old_argv[old_argv.index("--fallback") + 1] == "random"
    app = gateway_app(["http://127.0.0.1:9"], "prequal", 1, q_rif=0.84, fallback="random")
    settings = app.gateway.pools["/work"].config.prequal
    assert (settings.q_rif, settings.fallback) == (0.84, "random")
    parser = build_parser()
    assert parser.parse_args(["--contenders", "prequal,prequal_q0"]).contenders == ["prequal", "prequal_q0"]
    for bad in ("prequal_q1.5", "prequal_qx", "prequal_q0.6_rand", "nginx"):
        with pytest.raises(ValueError, match="unknown contender"):
            contender(bad)
        with pytest.raises(SystemExit):
            parser.parse_args(["--contenders", bad])


def test_nocheck_variants_run_the_gateway_without_the_cross_check(tmp_path: Path) -> None:
    from benchmarks.testbed.cli import build_parser
    from benchmarks.testbed.contenders import contender, gateway_app, gateway_counters, plan

    plain = contender("prequal")
    nocheck = contender("prequal_nocheck")
    assert (plain.kind, plain.method, plain.q_rif, plain.fallback, plain.cross_check) == (
        "gateway",
        "prequal",
        None,
        None,
        True,
    )
    assert (nocheck.kind, nocheck.method, nocheck.q_rif, nocheck.fallback, nocheck.cross_check) == (
        "gateway",
        "prequal",
        None,
        None,
        False,
    )
    both = contender("prequal_q0.84_random_nocheck")
    assert (both.q_rif, both.fallback, both.cross_check) == (0.84, "random", False)
    assert contender("prequal_q0.6_nocheck").cross_check is False
    assert (contender("prequal_q0.6_nocheck").q_rif, contender("prequal_q0.6_nocheck").fallback) == (0.6, None)
    assert contender("prequal_q0.84_random").cross_check is True  # the older names keep their meaning

    argv = plan(nocheck, 2, [9001, 9002], [8001, 8002], tmp_path, seed=1).commands
    assert [a.count("--no-cross-check") for a in argv] == [1, 1]
    assert [a[a.index("--policy") + 1] for a in argv] == ["prequal", "prequal"]
    assert "--q-rif" not in argv[0] and "--fallback" not in argv[0]
    with_q = plan(nocheck, 1, [9001], [8001], tmp_path, seed=1, q_rif=0.9).commands[0]
    assert with_q[with_q.index("--q-rif") + 1] == "0.9"  # the run's Q_RIF still applies
    assert "--no-cross-check" not in plan(plain, 1, [9001], [8001], tmp_path, seed=1).commands[0]
    both_argv = plan(both, 1, [9001], [8001], tmp_path, seed=1).commands[0]
    assert both_argv[both_argv.index("--q-rif") + 1] == "0.84"
    assert both_argv[both_argv.index("--fallback") + 1] == "random"
    assert "--no-cross-check" in both_argv

    off = gateway_app(["http://127.0.0.1:9"], "prequal", 1, cross_check=False)
    off_settings = off.gateway.pools["/work"].config.prequal
    assert (off_settings.cross_check, off_settings.q_rif, off_settings.fallback) == (False, 0.6, "least_in_flight")
    assert off.gateway.pools["/work"].clients[0].settings.cross_check is False
    on = gateway_app(["http://127.0.0.1:9"], "prequal", 1)
    assert on.gateway.pools["/work"].config.prequal.cross_check is True
    assert gateway_counters(on.gateway)["cross_check"] == {"rif": 0.0, "latency": 0.0}

    parser = build_parser()
    names = parser.parse_args(["--contenders", "prequal,prequal_nocheck,round_robin"]).contenders
    assert names == ["prequal", "prequal_nocheck", "round_robin"]
    for bad in ("prequal_nocheck_random", "prequal_random", "prequal_no_check", "prequal_q2_nocheck", "nocheck"):
        with pytest.raises(ValueError, match="unknown contender"):
            contender(bad)
        with pytest.raises(SystemExit):
            parser.parse_args(["--contenders", bad])


def test_fleet_speed_ranges_come_from_the_command_line() -> None:
    from benchmarks.testbed.cli import build_parser, options_from_args

    parser = build_parser()
    fleet = options_from_args(parser.parse_args(["--allocation", "0.3,1.7", "--headroom", "2,4"])).fleet
    assert (fleet.allocation_min, fleet.allocation_max, fleet.headroom_min, fleet.headroom_max) == (0.3, 1.7, 2.0, 4.0)
    assert all(
        0.3 <= s.allocation <= 1.7 and 2.0 * s.allocation <= s.fast_speed <= 4.0 * s.allocation for s in fleet.specs
    )
    default = options_from_args(parser.parse_args([])).fleet
    assert (default.allocation_min, default.headroom_max) == (0.6, 2.0)
    for bad in (["--allocation", "1.4,0.6"], ["--headroom", "2"], ["--allocation", "0,1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_sinkholes_are_the_last_replicas_and_add_no_capacity() -> None:
    from benchmarks.testbed.cli import build_parser, options_from_args
    from benchmarks.testbed.fleet import FleetConfig

    parser = build_parser()
    fleet = options_from_args(parser.parse_args(["--replicas", "20", "--sinkholes", "2"])).fleet
    honest = FleetConfig(replicas=18)
    assert fleet.sinkholes == 2 and fleet.honest == 18
    assert [fleet.is_sinkhole(i) for i in (0, 17, 18, 19)] == [False, False, True, True]
    # The first 18 replicas are the 18-replica fleet (the baseline run), and the load refers to them alone.
    assert fleet.specs[:18] == honest.specs
    assert fleet.capacity_qps == pytest.approx(honest.capacity_qps)
    assert FleetConfig.from_dict(fleet.to_dict()) == fleet
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="sinkholes"):
            FleetConfig(replicas=20, sinkholes=bad)


def test_a_busy_balancer_cpu_invalidates_a_run_even_when_each_process_is_under_its_limit() -> None:
    from benchmarks.testbed.cli import build_parser, options_from_args
    from benchmarks.testbed.runner import cpu_limits_broken

    options = options_from_args(build_parser().parse_args([]))
    assert (options.max_cpu_pct, options.max_core_pct) == (70.0, 80.0)
    assert cpu_limits_broken(options, 60.0, 79.0) == []
    assert cpu_limits_broken(options, 60.0, 90.0) == ["the balancers' CPU was 90% busy (> 80%)"]
    assert cpu_limits_broken(options, 71.0, 75.0) == ["a balancer process used 71% of a core (> 70%)"]
    strict = options_from_args(build_parser().parse_args(["--max-core-pct", "50"]))
    assert len(cpu_limits_broken(strict, 60.0, 55.0)) == 1


def test_a_sinkhole_run_counts_the_attempts_that_reached_them(tmp_path: Path) -> None:
    """Real processes: the sinkhole answers 503 fast; the gateway retries it (retry_on_status), so the
    client sees no failure, and the JSON and the table say how many attempts reached the sinkhole."""
    out = tmp_path / "sinkholes.json"
    command = [sys.executable, "-m", "benchmarks.testbed", "--quick", "--loads", "0.5", "--seconds", "2"]
    command += ["--warmup", "0", "--sinkholes", "1", "--contenders", "prequal,round_robin", "--no-plots"]
    command += ["--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    data = json.loads(out.read_text())
    assert data["config"]["fleet"]["sinkholes"] == 1
    for result in data["results"]:
        (run,) = result["runs"]
        assert run["served_shares"][-1] == 0.0 < run["shares"][-1]  # routed to, never served by, the sinkhole
        assert result["sinkhole_attempts"] == run["routed_requests"][-1] >= 1  # tried before known to fail
        assert result["errors"] == 0, result  # every 503 was retried on an honest replica
        assert result["p99_ok_ms"] > 0
    assert "sinkholes (1 of 6 replicas)" in done.stdout


def test_a_slow_fleet_scales_the_service_time_constants_and_the_replicas_get_the_estimator_window() -> None:
    from benchmarks.testbed.cli import build_parser, options_from_args
    from benchmarks.testbed.fleet import FleetConfig
    from benchmarks.testbed.replica import ReplicaProcess

    parser = build_parser()
    base = options_from_args(parser.parse_args(["--replicas", "6"]))
    slow_args = ["--replicas", "6", "--time-scale", "10", "--window-service-times", "0"]
    slow = options_from_args(parser.parse_args(slow_args))
    f, g = base.fleet, slow.fleet
    assert g.work_mu_s == pytest.approx(10 * f.work_mu_s) and slow.deadline_s == pytest.approx(10 * base.deadline_s)
    assert (g.antagonist_period_min_s, g.antagonist_period_max_s) == pytest.approx((50.0, 300.0))
    assert (g.burst_min_s, g.burst_max_s, g.burst_rate_hz) == pytest.approx((5.0, 15.0, 0.005))
    assert g.specs == f.specs and g.capacity_qps == pytest.approx(f.capacity_qps / 10)
    assert (f.window_service_times, g.window_service_times) == (8.0, 0.0)
    assert FleetConfig.from_dict(g.to_dict()) == g
    for fleet, window in ((f, 8.0), (g, 0.0)):
        process = ReplicaProcess(fleet, [0], "127.0.0.1")
        app = process.app_for(process.replicas[0])
        assert app.app.tracker.settings.window_service_times == window
    with pytest.raises(ValueError, match="time scale"):
        f.time_scaled(0)


def test_the_oracle_replay_serves_the_fleet_model_and_never_uses_a_sinkhole() -> None:
    from benchmarks.testbed.fleet import FleetConfig
    from benchmarks.testbed.loadgen import LoadSpec, schedule
    from benchmarks.testbed.oracle import replay

    def queries(fleet: FleetConfig, load: float, key: str) -> tuple[list[float], list[float]]:
        spec = LoadSpec(
            targets=["-"],
            rate=load * fleet.capacity_qps,
            warmup_s=2.0,
            seconds=20.0,
            deadline_s=5.0,
            work_mu_s=fleet.work_mu_s,
            seed_key=f"1:{key}",
            out="",
        )
        times, _, works = schedule(spec)
        return times, works

    honest = FleetConfig(replicas=8)
    with_sinkholes = FleetConfig(replicas=10, sinkholes=2)
    times, works = queries(honest, 0.9, "k")
    a = replay(honest, "k", 40.0, times, works, 5.0, (2.0, 22.0))
    b = replay(with_sinkholes, "k", 40.0, times, works, 5.0, (2.0, 22.0))
    assert a == b and a.errors == 0 and len(a.latencies_ms) > 1000  # the sinkholes are never chosen
    rr = replay(honest, "k", 40.0, times, works, 5.0, (2.0, 22.0), policy="round_robin")
    assert len(rr.latencies_ms) == len(a.latencies_ms)
    assert a.summary()["p99_ms"] < 0.7 * rr.summary()["p99_ms"]  # it sees queues and speeds; rr does not
    assert a.summary()["p50_ms"] < rr.summary()["p50_ms"]

    # One replica, one query: served at once for work / speed, the speed of its start.
    single = FleetConfig(replicas=1)
    one = replay(single, "k", 40.0, [3.0], [0.1], 5.0, (0.0, 10.0))
    spec, schedule_ = single.specs[0], single.schedule(0, "k", 40.0)
    speed = spec.allocation if schedule_.busy(3.0) else spec.fast_speed
    assert one.latencies_ms == [pytest.approx(100.0 / speed)]
    # Overload: the queue grows past the deadline; those queries are errors, counted at the deadline.
    times, works = queries(honest, 3.0, "k")
    over = replay(honest, "k", 40.0, times, works, 5.0, (2.0, 22.0))
    assert over.errors > 0 and max(over.latencies_ms) == 5000.0
    with pytest.raises(ValueError, match="replay policy"):
        replay(honest, "k", 40.0, times, works, 5.0, (2.0, 22.0), policy="least_request")


def test_the_leftover_check_matches_this_runs_processes_only(tmp_path: Path) -> None:
    """Another testbed on the machine (another run's nginx master) is never taken for this run's leftover."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    started_after = _stat("self")[1]
    procs = [
        subprocess.Popen(["bash", "-c", f'exec -a "nginx: master process -p {d}/prequal-testbed-x" sleep 30'])
        for d in (ours, theirs)
    ]
    try:
        # Wait until both have exec'd: a scan during the exec can read an empty command line (CI once
        # found nothing after a first scan had matched the shell that was about to exec).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_cmdline(p.pid).startswith("nginx: master") for p in procs):
            time.sleep(0.02)
        found = _tagged_processes("no-such-tag", ours, started_after)
        assert [int(line.split(":", 1)[0]) for line in found] == [procs[0].pid], found
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

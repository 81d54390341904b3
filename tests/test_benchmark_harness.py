"""``benchmarks.harness``: processes stopped by PID, free ports, the percentile definition, CPU accounting.

Real subprocesses (``sleep``, ``sh``, a busy Python), Linux only (/proc). A few seconds.
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.harness.cpu import CpuStat, cpu_jiffies, cpu_ticks, cpu_times, process_cpu_s
from benchmarks.harness.ports import FIXED_PORTS, free_fixed_port, free_port, wait_port
from benchmarks.harness.procfs import descendants, read_stat
from benchmarks.harness.procs import Supervisor
from benchmarks.harness.progress import progress
from benchmarks.harness.rounds import rotated
from benchmarks.harness.stats import median, percentile
from prequal_middleware.core import simulator
from tests.helpers import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody waits for)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def outsider() -> Iterator[subprocess.Popen[bytes]]:
    """A process no supervisor started (ours to clean up)."""
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    proc.kill()
    proc.wait()


# --- processes ----------------------------------------------------------------------------------------------


def test_every_child_is_stopped_in_reverse_order_of_start(tmp_path: Path) -> None:
    log = tmp_path / "stopped.txt"
    pids: list[int] = []
    with Supervisor(pin=False) as supervisor:
        for name in ("first", "second", "third"):
            # sh writes its name when SIGTERMed; its 'sleep' is a descendant the supervisor must stop too.
            # The ready file says the trap is set and the sleep forked.
            script = f'trap "echo {name} >> {log}; exit 0" TERM; sleep 30 & : > {tmp_path / name}.ready; wait'
            proc = supervisor.spawn(["sh", "-c", script])
            pids.append(proc.pid)
        # Polled, not slept: a SIGTERM before the trap would kill sh with no line written.
        wait_for(lambda: all((tmp_path / f"{n}.ready").exists() for n in ("first", "second", "third")), 10, "the traps")
        sleeps = [kid for pid in pids for kid in descendants(pid)]
        assert len(sleeps) == 3
        assert [p.pid for p in supervisor.running()] == pids
    assert supervisor.running() == []
    assert log.read_text().split() == ["third", "second", "first"]
    assert all(_gone(pid) for pid in [*pids, *sleeps])


def test_children_are_stopped_when_the_block_raises() -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), Supervisor(pin=False) as supervisor:
        for _ in range(3):
            pids.append(supervisor.spawn(["sleep", "30"]).pid)
        raise RuntimeError("boom")
    assert all(_gone(pid) for pid in pids)


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with Supervisor(pin=False) as supervisor:
        proc = supervisor.spawn(["sh", "-c", f"trap '' TERM; : > {ready}; sleep 30"])
        # Polled, not slept: a SIGTERM before the trap would end sh at once, not by SIGKILL.
        wait_for(ready.exists, 10, "sh to ignore SIGTERM")
        started = time.monotonic()
        supervisor.stop(proc, timeout_s=0.5)
        assert proc.returncode == -signal.SIGKILL
        assert time.monotonic() - started < 5.0


def test_stop_all_leaves_processes_it_did_not_start(outsider: subprocess.Popen[bytes]) -> None:
    with Supervisor(pin=False) as supervisor:
        supervisor.spawn(["sleep", "30"])
    assert outsider.poll() is None


def test_a_recycled_pid_is_never_signalled(outsider: subprocess.Popen[bytes]) -> None:
    """A descendant seen earlier whose PID now belongs to another process (other start time) is left alone."""
    with Supervisor(pin=False) as supervisor:
        proc = supervisor.spawn(["sh", "-c", "sleep 30 & wait"])
        time.sleep(0.2)
        supervisor.note_descendants(proc)
        stat = read_stat(outsider.pid)
        assert stat is not None
        # As if a descendant had exited and the kernel had given its PID to ``outsider`` meanwhile.
        supervisor._seen[proc.pid][outsider.pid] = stat.start_ticks - 1
    assert proc.poll() is not None
    time.sleep(0.2)
    assert outsider.poll() is None
    # The same PID with its own start time is the process seen: that one is stopped.
    with Supervisor(pin=False) as supervisor:
        holder = supervisor.spawn(["sleep", "30"])
        supervisor._seen[holder.pid] = {outsider.pid: stat.start_ticks}
    assert outsider.wait(5) == -signal.SIGTERM


def test_spawn_pins_to_the_cpu_asked() -> None:
    cpu = min(os.sched_getaffinity(0))
    with Supervisor() as supervisor:
        if not supervisor.pin:
            pytest.skip("no taskset")
        proc = supervisor.spawn(["sleep", "30"], cpu=cpu)
        deadline = time.monotonic() + 5.0
        while os.sched_getaffinity(proc.pid) != {cpu} and time.monotonic() < deadline:
            time.sleep(0.02)  # taskset sets the mask, then execs sleep under the same PID
        assert os.sched_getaffinity(proc.pid) == {cpu}


# --- ports -------------------------------------------------------------------------------------------------


def test_free_ports_are_bindable() -> None:
    for port in (free_port(), free_fixed_port()):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert FIXED_PORTS[0] <= free_fixed_port() < FIXED_PORTS[1]


def test_wait_port_sees_a_listener_and_times_out_without_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert wait_port(server.getsockname()[1], 1.0)
    started = time.monotonic()
    assert not wait_port(free_port(), 0.3)
    assert time.monotonic() - started < 2.0


# --- percentiles ---------------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert [percentile(values, q) for q in (0.0, 0.25, 0.26, 0.5, 0.75, 0.99, 1.0)] == [1, 1, 2, 2, 3, 4, 4]
    hundred = [float(i) for i in range(1, 101)]
    assert (percentile(hundred, 0.5), percentile(hundred, 0.99), percentile(hundred, 0.999)) == (50, 99, 100)
    thousand = [float(i) for i in range(1, 1001)]
    assert percentile(thousand, 0.999) == 999
    assert math.isnan(percentile([], 0.5))


def test_percentile_agrees_with_the_simulator() -> None:
    rng = random.Random(7)
    for _ in range(200):
        values = sorted(rng.random() for _ in range(rng.randint(1, 50)))
        q = rng.choice([0.0, 0.5, 0.9, 0.99, 0.999, 1.0, rng.random()])
        assert percentile(values, q) == simulator.percentile(values, q)


def test_median_skips_missing_figures() -> None:
    assert median([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert median([None, math.nan]) is None
    assert median([1.0, 4.0]) == 2.5


def test_rounds_rotate() -> None:
    assert [rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rotated([], 3) == []


# --- CPU -------------------------------------------------------------------------------------------------------

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"


def _wait_cpu(pid: int, at_least_s: float) -> float:
    deadline = time.monotonic() + 10.0
    while (used := process_cpu_s(pid)) < at_least_s and time.monotonic() < deadline:
        time.sleep(0.05)
    return used


def test_a_busy_child_is_accounted() -> None:
    with Supervisor(pin=False) as supervisor:
        busy = supervisor.spawn([sys.executable, "-c", BUSY])
        idle = supervisor.spawn(["sleep", "30"])
        assert _wait_cpu(busy.pid, 0.3) >= 0.3
        assert cpu_ticks(busy.pid) > 0
        times = cpu_times([busy.pid, idle.pid])
        assert times[busy.pid] >= 0.2 and times[idle.pid] < 0.1
        # Through a shell: the busy grandchild is counted under the shell's descendants.
        shell = supervisor.spawn(["sh", "-c", f'{sys.executable} -c "{BUSY}" & wait'])
        deadline = time.monotonic() + 10.0
        while sum(cpu_times([shell.pid]).values()) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        times = cpu_times([shell.pid])
        assert len(times) == 2 and sum(times.values()) >= 0.2
    with pytest.raises(ProcessLookupError):
        cpu_ticks(busy.pid)


def test_per_cpu_jiffies() -> None:
    cpu = min(os.sched_getaffinity(0))
    first = CpuStat.read(cpu)
    sum(i * i for i in range(300_000))
    later = CpuStat.read(cpu)
    assert later.total >= first.total and later.busy >= first.busy
    assert 0.0 <= later.pct_since(first, later.busy - first.busy) <= 100.0
    busy, steal, total = cpu_jiffies(cpu)
    assert 0 <= steal <= busy <= total and total > 0
    assert busy == pytest.approx((later.busy + later.steal) / os.sysconf("SC_CLK_TCK"), abs=50.0)
    assert cpu_jiffies(10_000) == (0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError):
        CpuStat.read(10_000)


# --- progress -----------------------------------------------------------------------------------------------


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    progress("[1/2] step")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "[1/2] step\n")

"""Processes the testbed starts: pinned with ``taskset``, tied to our life, stopped by PID, CPU read from /proc.

- ``spawn`` starts a process in its own session (a Ctrl-C in the terminal reaches only the benchmark,
  which then stops everything in order), pinned to a CPU when ``taskset`` exists, with
  ``PR_SET_PDEATHSIG`` so that it gets SIGTERM if the benchmark dies without cleaning up.
- ``Supervisor`` remembers every process it started and stops them by PID (SIGTERM, then SIGKILL after a
  timeout), together with the descendants it saw (nginx workers), checking each PID's start time first
  so that a recycled PID is never signalled.
- ``cpu_times`` reads ``utime + stime + cutime + cstime`` of a process and its descendants.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
TASKSET = shutil.which("taskset")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    """Poll until ``host:port`` accepts a connection."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.05)
    return False


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/<pid>/stat says about one process."""

    pid: int
    ppid: int
    start_ticks: int
    cpu_s: float  # utime + stime + cutime + cstime


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ProcStat(pid, int(fields[1]), int(fields[19]), ticks / CLK_TCK)


def descendants(pid: int) -> list[int]:
    """``pid``'s live descendants (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                children.setdefault(stat.ppid, []).append(stat.pid)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_times(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds (children included) of each process in ``pids`` and of their descendants."""
    out: dict[int, float] = {}
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            stat = read_stat(p)
            if stat is not None:
                out[p] = stat.cpu_s
    return out


def cpu_jiffies(cpu: int) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of one CPU since boot, from /proc/stat (busy excludes idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                values = [int(x) for x in line.split()[1:9]]
                values += [0] * (8 - len(values))
                total = sum(values)
                busy = total - values[3] - values[4]
                return busy / CLK_TCK, values[7] / CLK_TCK, total / CLK_TCK
    return 0.0, 0.0, 0.0


class Supervisor:
    """Starts processes and guarantees they are stopped, by PID, in reverse order of start."""

    def __init__(self, *, pin: bool = True) -> None:
        self.pin = pin and TASKSET is not None
        self._procs: list[tuple[subprocess.Popen[Any], int]] = []  # (process, its start time in ticks)
        self._seen: dict[int, dict[int, int]] = {}  # process pid -> {descendant pid: its start ticks}

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[Any]:
        command = list(argv)
        if cpu is not None and self.pin and TASKSET is not None:
            command = [TASKSET, "-c", str(cpu), *command]  # taskset execs: the PID stays the process's
        proc = subprocess.Popen(
            command,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            text=True,
            bufsize=1,
        )
        stat = read_stat(proc.pid)
        self._procs.append((proc, stat.start_ticks if stat else -1))
        return proc

    def note_descendants(self, proc: subprocess.Popen[Any]) -> None:
        """Remember ``proc``'s current descendants so that ``stop`` can make sure they are gone too."""
        seen = self._seen.setdefault(proc.pid, {})
        for pid in descendants(proc.pid):
            stat = read_stat(pid)
            if stat is not None:
                seen[pid] = stat.start_ticks

    def stop(self, proc: subprocess.Popen[Any], timeout_s: float = 5.0, sig: int = signal.SIGTERM) -> None:
        """Signal ``proc`` by PID, wait, SIGKILL it if needed, then any descendant of it still alive."""
        entry = next((e for e in self._procs if e[0] is proc), None)
        if proc.poll() is None:
            self.note_descendants(proc)
        kids = self._seen.pop(proc.pid, {})
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout_s)
        for pid, ticks in kids.items():
            self._kill_if_same(pid, ticks)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if entry is not None:
            self._procs.remove(entry)

    def _kill_if_same(self, pid: int, ticks: int) -> None:
        stat = read_stat(pid)
        if stat is not None and stat.start_ticks == ticks:
            deadline = time.monotonic() + 2.0
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            while time.monotonic() < deadline:
                stat = read_stat(pid)
                if stat is None or stat.start_ticks != ticks:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every process still running, the last started first."""
        for proc, _ in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout_s=3.0)
        for kids in list(self._seen.values()):
            for pid, ticks in kids.items():
                self._kill_if_same(pid, ticks)
        self._seen.clear()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

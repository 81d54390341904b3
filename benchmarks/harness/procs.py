"""Processes a benchmark starts: pinned, tied to our life, and always stopped, by PID.

- ``Supervisor.spawn`` starts a process in its own session (a Ctrl-C in the terminal reaches only the
  benchmark, which then stops everything in order), pinned to a CPU when ``taskset`` exists, with
  ``PR_SET_PDEATHSIG`` so that it gets a signal (SIGTERM unless told) if the benchmark dies without
  cleaning up.
- ``Supervisor`` remembers every process it started and stops them by PID (the signal, then SIGKILL
  after a timeout), together with the descendants it saw (nginx workers), checking each descendant's
  start time first so that a recycled PID is never signalled. Leaving its ``with`` block, by an
  exception or not, stops whatever is still running, the last started first.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from .procfs import descendants, read_stat

PR_SET_PDEATHSIG = 1
TASKSET = shutil.which("taskset")


def _libc_prctl() -> Callable[..., int] | None:
    # Looked up here, in the parent: the child runs only the call between fork and exec.
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    return prctl


_PRCTL = _libc_prctl()


def _die_with_parent(sig: int) -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        with contextlib.suppress(Exception):
            _PRCTL(PR_SET_PDEATHSIG, sig)


class Supervisor:
    """Starts processes and guarantees they are stopped, by PID, in reverse order of start."""

    def __init__(self, *, pin: bool = True, death_signal: int = signal.SIGTERM) -> None:
        """``pin``: honour ``spawn(cpu=...)`` (when taskset exists); ``death_signal``: what a child gets if we die."""
        self.pin = pin and TASKSET is not None
        self.death_signal = death_signal
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
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` (text mode, line-buffered pipes), pinned to ``cpu`` if given, and remember it."""
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
            preexec_fn=functools.partial(_die_with_parent, self.death_signal),
            text=True,
            bufsize=1,
        )
        stat = read_stat(proc.pid)
        self._procs.append((proc, stat.start_ticks if stat else -1))
        return proc

    def running(self) -> list[subprocess.Popen[Any]]:
        """The processes started and not stopped yet, in order of start."""
        return [proc for proc, _ in self._procs]

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
        # Popen signals only a child it has not reaped: its PID cannot have been reused yet.
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
        """SIGTERM (then SIGKILL) ``pid`` only while it is the process that started at ``ticks``."""
        stat = read_stat(pid)
        if stat is not None and stat.start_ticks == ticks:
            deadline = time.monotonic() + 2.0
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            while time.monotonic() < deadline:
                stat = read_stat(pid)
                if stat is None or stat.start_ticks != ticks:
                    return
                if stat.state == "Z":
                    # Exited, waiting to be reaped by its parent (often not us; in a container maybe
                    # never): no use waiting. SIGKILL anyway: a leader zombie can still have live threads.
                    break
                time.sleep(0.05)
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

"""Processes for the reliability suite: backends, gateways and redis-server, each a subprocess known by PID.

Every child gets ``PR_SET_PDEATHSIG`` (SIGKILL): if the test run dies, its children die with it.
Output goes to a log file per process (never a pipe, which a chatty child could fill and block on);
a failed wait quotes the log's tail. Memory and file descriptors are read from ``/proc/<pid>``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.helpers import consecutive_free_ports

REPO = Path(__file__).resolve().parents[2]
PR_SET_PDEATHSIG = 1
_libc: Any = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_ports_given: set[int] = set()


def die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def pick_port() -> int:
    """A bindable loopback port below the ephemeral range, never handed out twice in this run."""
    for _ in range(100):
        port = consecutive_free_ports(1)
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError("no free port")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without its PREQUAL_* settings (but ``PREQUAL_TRANSPORT``), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if (k == "PREQUAL_TRANSPORT" or not k.startswith("PREQUAL_")) and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (peak RSS) and friends from ``/proc/<pid>/status``, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Vm"):
                out[key] = int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Proc:
    """A child process started from argv, logging to ``log_dir/<name>.log``; stopped by PID."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self._log: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is running"
        self.close_log()
        self._log = open(self.log_path, "ab")  # kept open for the child's lifetime
        self.popen = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this PID (never by name)."""
        assert self.popen is not None
        os.kill(self.popen.pid, sig)

    def kill(self) -> float:
        """SIGKILL, reap; returns the wall-clock time of the kill."""
        assert self.popen is not None
        at = time.time()
        self.popen.kill()
        self.popen.wait(timeout=10)
        return at

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; reaps the child and closes its log."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            popen.terminate()
            try:
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10)
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise AssertionError(f"{self.name} exited while waiting for {what}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if condition():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: timed out after {timeout_s} s waiting for {what}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_http(self, url: str, timeout_s: float = 20.0) -> None:
        self.wait_until(lambda: httpx.get(url, timeout=1.0).status_code < 500, f"{url} to answer", timeout_s)


class HttpProc(Proc):
    """A child serving HTTP on ``127.0.0.1:port``."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, port: int, env: dict[str, str] | None = None
    ) -> None:
        super().__init__(name, argv, log_dir, env)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def backend_proc(
    name: str,
    log_dir: Path,
    *,
    port: int | None = None,
    register: str | None = None,
    ttl_s: float = 30.0,
    interval_s: float | None = None,
    extra_args: Sequence[str] = (),
) -> HttpProc:
    """A ``tests.reliability.backend_app`` process (not started)."""
    port = port if port is not None else pick_port()
    argv = [sys.executable, "-m", "tests.reliability.backend_app", "--port", str(port), "--name", name]
    if register:
        argv += ["--register", register, "--ttl", str(ttl_s)]
        if interval_s is not None:
            argv += ["--interval", str(interval_s)]
    argv += list(extra_args)
    return HttpProc(name, argv, log_dir, port, child_env())


def gateway_proc(
    name: str,
    log_dir: Path,
    env: dict[str, str],
    *,
    port: int | None = None,
    record_attempts: bool = False,
    http: str = "auto",
    proxy_headers: bool = False,
    host: str = "127.0.0.1",
) -> HttpProc:
    """A ``tests.reliability.gateway_app`` process (not started), configured by ``PREQUAL_*`` in ``env``."""
    port = port if port is not None else pick_port()
    argv = [sys.executable, "-m", "tests.reliability.gateway_app", "--port", str(port), "--http", http, "--host", host]
    if record_attempts:
        argv.append("--record-attempts")
    if proxy_headers:
        argv.append("--proxy-headers")
    return HttpProc(name, argv, log_dir, port, child_env(env))


@contextlib.contextmanager
def running(*procs: HttpProc, ready_path: str = "/healthz") -> Iterator[tuple[HttpProc, ...]]:
    """Start every process, wait until each answers ``ready_path``, stop them all at the end."""
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_http(p.url + ready_path)
        yield procs
    finally:
        for p in procs:
            p.stop()


# --- redis ---------------------------------------------------------------------------------------


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server not installed (CI must install it)")
        pytest.skip("redis-server not installed: apt-get install redis-server")
    return binary


class RedisProc(Proc):
    """``redis-server`` on a port of its own; with ``persistent`` an append-only file in ``data_dir``."""

    def __init__(self, log_dir: Path, data_dir: Path, *, persistent: bool) -> None:
        self.port = pick_port()
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data_dir)]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        super().__init__(f"redis-{self.port}", argv, log_dir, child_env())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        super().start()
        self.wait_until(self._answers_ping, "redis to answer PING", timeout_s=10)
        return self

    def _answers_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")

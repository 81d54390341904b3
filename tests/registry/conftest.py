"""Registry fixtures: a real ``redis-server`` on a free loopback port, fake clocks, a registry of each kind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from prequal_middleware.registry import MemoryRegistry, Registry, SqliteRegistry

REDIS_MISSING = "redis-server not installed: apt-get install redis-server"
START_TIMEOUT_S = 10.0


class RedisServer:
    """A ``redis-server`` subprocess without persistence, stopped and restarted by PID on one port."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()  # SIGTERM to this PID only
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class FakeClock:
    """Wall and monotonic clocks that move only when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.123456789
        self.mono = 1_000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{REDIS_MISSING} (CI must install it)")
        pytest.skip(REDIS_MISSING)
    return binary


def new_redis_server() -> RedisServer:
    server = RedisServer(redis_binary(), free_port())
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the whole session; tests keep apart by namespace."""
    server = new_redis_server()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop and restart it."""
    server = new_redis_server()
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def unique_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(params=["memory", "sqlite", "redis"])
async def registry(request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path) -> AsyncIterator[Registry]:
    """A fresh, started registry of each kind, on the fake clock."""
    reg: Registry
    if request.param == "memory":
        reg = MemoryRegistry(wall=clock.wall, monotonic=clock.monotonic)
    elif request.param == "sqlite":
        reg = SqliteRegistry(tmp_path / "registry.db", wall=clock.wall, monotonic=clock.monotonic)
    else:
        from prequal_middleware.registry.redis import RedisRegistry

        server: RedisServer = request.getfixturevalue("redis_server")
        reg = RedisRegistry(server.url, namespace=unique_namespace(), wall=clock.wall, monotonic=clock.monotonic)
    await reg.start()
    yield reg
    await reg.aclose()

"""``SqliteRegistry`` as the workers of one host use it: another process's writes, locks, bad rows, outages."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prequal_middleware.registry import BackendRecord, RegistryUnavailable, SqliteRegistry

from .conftest import FakeClock

API = "/api"
URL = "http://10.0.0.5:8000"
URL2 = "http://10.0.0.6:8000"


async def test_a_write_in_one_registry_shows_in_another_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    a, b = SqliteRegistry(path, poll_s=0.02), SqliteRegistry(path, poll_s=0.02)
    await a.start()
    await b.start()
    try:
        started = time.perf_counter()
        await asyncio.gather(b.wait_for_change(5.0), a.register(BackendRecord(API, URL, 2.0, {"z": 1}), ttl_s=30))
        assert time.perf_counter() - started < 1.0  # woken by the poll, not the timeout
        assert await b.sync() is True
        assert b.snapshot().pool(API)[URL].weight == 2.0
        assert b.snapshot().pool(API)[URL].metadata == {"z": 1}
        assert await a.sync() is True  # its own write

        await b.unregister(API, URL)
        await a.wait_for_change(5.0)
        assert await a.sync() is True
        assert a.snapshot().records == {}
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_write_from_another_process_shows(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    registry = SqliteRegistry(path, poll_s=0.02)
    await registry.start()
    try:
        writer = textwrap.dedent(f"""
            import asyncio
            from prequal_middleware.registry import BackendRecord, SqliteRegistry
            async def main():
                r = SqliteRegistry({str(path)!r})
                await r.start()
                await r.register(BackendRecord("/api", {URL2!r}), ttl_s=60)
                await r.aclose()
            asyncio.run(main())
        """)
        waiter = asyncio.create_task(registry.wait_for_change(10.0))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", writer)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await asyncio.wait_for(waiter, 5)
        assert await registry.sync() is True
        assert list(registry.snapshot().pool(API)) == [URL2]
    finally:
        await registry.aclose()


async def test_unchanged_version_skips_the_read(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "r.db")
    await registry.start()
    await registry.register(BackendRecord(API, URL), ttl_s=None)
    assert await registry.sync() is True
    snap = registry.snapshot()
    # Rows written behind the version's back are not read while the version row stays put.
    with sqlite3.connect(tmp_path / "r.db") as conn:
        conn.execute(
            "INSERT INTO members VALUES (?, ?, 1.0, '{}', NULL, 0.0)",
            (API, URL2),
        )
    assert await registry.sync() is False
    assert registry.snapshot().records == snap.records
    await registry.aclose()


async def test_malformed_rows_are_skipped_and_the_rest_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "r.db"
    registry = SqliteRegistry(path)
    await registry.start()
    await registry.register(BackendRecord(API, URL), ttl_s=None)
    assert await registry.sync() is True
    with sqlite3.connect(path) as conn:  # a hostile or broken writer of the shared file
        rows = [
            (API, "http://bad-json:1", 1.0, "{not json", None, 0.0),
            (API, "http://not-object:1", 1.0, "[1]", None, 0.0),
            (API, "http://inf:1", float("inf"), "{}", None, 0.0),
            (API, "http://text-weight:1", "heavy", "{}", None, 0.0),
        ]
        conn.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'")
    assert await registry.sync() is False  # the good member is all that is left: no change
    assert list(registry.snapshot().pool(API)) == [URL]
    assert registry.snapshot().stale_since is None
    assert caplog.text.count("ignoring a malformed SQLite row") == 4
    await registry.aclose()


async def test_expired_leases_leave_the_view_and_the_file(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "r.db"
    registry = SqliteRegistry(path, wall=clock.wall, monotonic=clock.monotonic)
    await registry.start()
    await registry.register(BackendRecord(API, URL), ttl_s=10)
    await registry.register(BackendRecord(API, URL2), ttl_s=None)
    await registry.sync()
    clock.advance(11)

    assert await registry.sync() is True
    assert list(registry.snapshot().pool(API)) == [URL2]
    with sqlite3.connect(path) as conn:
        assert [row[0] for row in conn.execute("SELECT url FROM members")] == [URL2]
    await registry.aclose()


async def test_a_held_write_lock_fails_the_write_cleanly_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    registry = SqliteRegistry(path, busy_timeout_s=0.3)
    await registry.start()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(3)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(RegistryUnavailable, match="register"):
            await registry.register(BackendRecord(API, URL), ttl_s=30)
        task.cancel()
        assert ticks >= 10  # the loop kept running through the 0.3 s wait (in a thread)
    finally:
        holder.terminate()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    await registry.sync()
    assert registry.snapshot().records == {}  # nothing half-applied
    stored = await registry.register(BackendRecord(API, URL), ttl_s=30)  # and the lock gone, writes work
    assert stored.url == URL
    await registry.aclose()


async def test_an_unopenable_file_is_stale_and_refuses_writes(tmp_path: Path) -> None:
    registry = SqliteRegistry(tmp_path / "missing-dir" / "r.db")
    await registry.start()  # never raises
    assert registry.snapshot().stale_since is not None
    with pytest.raises(RegistryUnavailable, match="SQLite registry unavailable"):
        await registry.register(BackendRecord(API, URL), ttl_s=30)
    started = time.perf_counter()
    await registry.wait_for_change(0.2)  # no busy loop while the file is unreadable
    assert time.perf_counter() - started >= 0.15
    (tmp_path / "missing-dir").mkdir()
    await registry.register(BackendRecord(API, URL), ttl_s=30)
    assert await registry.sync() is True
    assert registry.snapshot().stale_since is None
    await registry.aclose()


@pytest.mark.parametrize("name", ["poll_s", "busy_timeout_s", "full_refresh_s"])
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_bad_settings_are_refused_naming_the_field(tmp_path: Path, name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"SqliteRegistry.{name}"):
        SqliteRegistry(tmp_path / "r.db", **{name: value})  # type: ignore[arg-type]

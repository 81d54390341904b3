"""``SqliteRegistry``: membership shared by every worker process of one host, in one SQLite file.

Why SQLite: ``uvicorn --workers N`` runs N gateways that must agree on who exists, and the standard
library already carries an embedded store that several processes can write safely (file locks, atomic
transactions). In WAL mode readers never block the writer and a commit costs no fsync
(``synchronous=NORMAL``: a power cut may lose the last registrations, which backends re-send with their
next heartbeat anyway). Nothing to install or run; Redis stays the choice across hosts.

Each process keeps its own snapshot, refreshed by :meth:`SqliteRegistry.sync`, which reads one row when
nothing changed; requests never touch the file. Every write that changes membership bumps a version row
in the same transaction; :meth:`SqliteRegistry.wait_for_change` polls that row (a few microseconds per
poll) every ``poll_s``, so another worker's write shows within about ``poll_s`` plus one sync.

Database work runs in a worker thread (``asyncio.to_thread``), one statement batch at a time per
registry, so a slow disk never stalls the event loop. While the file cannot be read the last snapshot
serves as it is and ``stale_since`` is set (as with Redis); writes then raise ``RegistryUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prequal_middleware.exceptions import RegistryUnavailable
from prequal_middleware.registry.base import (
    EMPTY_RECORDS,
    BackendRecord,
    Records,
    RegistrySnapshot,
    earliest_expiry,
    freeze,
    lease_expiry,
    normalise_metadata,
    same_entry,
    same_membership,
)

logger = logging.getLogger("prequal_middleware.registry")

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS members (
        pool TEXT NOT NULL,
        url TEXT NOT NULL,
        weight REAL NOT NULL,
        metadata TEXT NOT NULL,
        lease_expires_at REAL,
        registered_at REAL NOT NULL,
        PRIMARY KEY (pool, url)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0)",
)
_BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'version'"
_VERSION = "SELECT value FROM meta WHERE key = 'version'"


class SqliteRegistry:
    """Registry in a SQLite file shared by the processes of one host, with a local snapshot per process.

    Parameters:
        path: the database file (created with its tables if missing); every worker names the same one.
        wall: wall-clock epoch seconds, for leases.
        monotonic: monotonic seconds, for ``stale_since`` and ``synced_at``.
        poll_s: how often :meth:`wait_for_change` looks for another process's write.
        busy_timeout_s: how long a statement waits for another process's write lock before failing.
        full_refresh_s: re-read everything at least this often, even if the version did not move.
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        poll_s: float = 0.1,
        busy_timeout_s: float = 2.0,
        full_refresh_s: float = 30.0,
    ) -> None:
        for name, value in (("poll_s", poll_s), ("busy_timeout_s", busy_timeout_s), ("full_refresh_s", full_refresh_s)):
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"SqliteRegistry.{name} must be a positive number of seconds, got {value!r}")
        self.path = Path(path)
        self._wall = wall
        self._monotonic = monotonic
        self._poll_s = float(poll_s)
        self._busy_timeout_s = float(busy_timeout_s)
        self._full_refresh_s = float(full_refresh_s)
        self._conn: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()  # one statement batch at a time on the shared connection
        self._sync_lock = asyncio.Lock()

        self._records: Records = EMPTY_RECORDS
        self._version = 0
        self._snapshot: RegistrySnapshot | None = None
        self._stale_since: float | None = None
        self._synced_at = monotonic()
        self._store_version: int | None = None  # the version row as of the last full read
        self._next_expiry = math.inf
        self._last_full = -math.inf
        self._changed = asyncio.Event()  # set by this process's own writes
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the file and take the first snapshot; logs (never raises) if it cannot."""
        await self.sync()

    async def aclose(self) -> None:
        """Close the connection (idempotent); the registry cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(self._close, conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        with self._db_lock:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        # Called in the worker thread with _db_lock held.
        if self._closed:
            raise sqlite3.ProgrammingError("the registry is closed")
        if self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._db_lock:
                conn = self._connection()
                try:
                    return work(conn)
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

        return await asyncio.to_thread(locked)

    async def _write(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            result = await self._run(work)
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"SQLite registry unavailable ({operation}): {exc}") from exc
        self._changed.set()
        self._changed = asyncio.Event()
        return result

    # --- writes -----------------------------------------------------------------------------------

    async def register(self, record: BackendRecord, ttl_s: float | None) -> BackendRecord:
        """Insert or replace a record (see :meth:`Registry.register`)."""
        now = self._wall()
        lease = lease_expiry(now, ttl_s)
        weight, metadata = float(record.weight), normalise_metadata(record.metadata)
        encoded = json.dumps(metadata, separators=(",", ":"), allow_nan=False)

        def work(conn: sqlite3.Connection) -> BackendRecord:
            conn.execute("BEGIN IMMEDIATE")
            old = _row_record(conn.execute(_SELECT_ONE, (record.pool, record.url)).fetchone(), record.pool, record.url)
            if old is not None and old.expired(now):
                old = None  # an expired lease nobody pruned yet: this is a new registration
            stored = BackendRecord(
                record.pool, record.url, weight, metadata, lease, now if old is None else old.registered_at
            )
            conn.execute(
                "INSERT OR REPLACE INTO members (pool, url, weight, metadata, lease_expires_at, registered_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (stored.pool, stored.url, weight, encoded, lease, stored.registered_at),
            )
            if old is None or not same_entry(old, stored):
                conn.execute(_BUMP)
            conn.execute("COMMIT")
            return stored

        return await self._write("register", work)

    async def heartbeat(self, pool: str, url: str, ttl_s: float | None) -> BackendRecord | None:
        """Renew a lease (see :meth:`Registry.heartbeat`)."""
        now = self._wall()
        lease = lease_expiry(now, ttl_s)

        def work(conn: sqlite3.Connection) -> BackendRecord | None:
            conn.execute("BEGIN IMMEDIATE")
            old = _row_record(conn.execute(_SELECT_ONE, (pool, url)).fetchone(), pool, url)
            if old is None or old.expired(now):
                conn.execute("COMMIT")
                return None
            conn.execute("UPDATE members SET lease_expires_at = ? WHERE pool = ? AND url = ?", (lease, pool, url))
            if (old.lease_expires_at is None) != (lease is None):
                conn.execute(_BUMP)
            conn.execute("COMMIT")
            return BackendRecord(pool, url, old.weight, old.metadata, lease, old.registered_at)

        return await self._write("heartbeat", work)

    async def unregister(self, pool: str, url: str) -> bool:
        """Remove a record (see :meth:`Registry.unregister`)."""
        now = self._wall()

        def work(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            old = _row_record(conn.execute(_SELECT_ONE, (pool, url)).fetchone(), pool, url)
            if old is None:
                conn.execute("COMMIT")
                return False
            conn.execute("DELETE FROM members WHERE pool = ? AND url = ?", (pool, url))
            conn.execute(_BUMP)
            conn.execute("COMMIT")
            return not old.expired(now)

        return await self._write("unregister", work)

    # --- the local view ---------------------------------------------------------------------------

    def snapshot(self) -> RegistrySnapshot:
        """The records as of the last successful sync (see :meth:`Registry.snapshot`)."""
        if self._snapshot is None:
            self._snapshot = RegistrySnapshot(self._records, self._version, self._stale_since, self._synced_at)
        return self._snapshot

    async def sync(self) -> bool:
        """Refresh from the file (see :meth:`Registry.sync`); one row read when the version did not move."""
        async with self._sync_lock:
            now = self._wall()
            full = now >= self._next_expiry or self._monotonic() - self._last_full >= self._full_refresh_s
            known = None if full else self._store_version
            try:
                read = await self._run(lambda conn: _read(conn, known, now))
            except (sqlite3.Error, OSError) as exc:
                self._went_stale(exc)
                return False
            if self._stale_since is not None:
                logger.info("registry: SQLite file %s readable again", self.path)
            self._stale_since = None
            self._synced_at = self._monotonic()
            self._snapshot = None
            if read is None:
                return False  # the version row did not move
            store_version, members = read
            self._store_version, self._last_full = store_version, self._monotonic()
            changed = not same_membership(self._records, members)
            self._records, self._next_expiry = members, earliest_expiry(members)
            if changed:
                self._version += 1
            return changed

    def _went_stale(self, exc: BaseException) -> None:
        if self._stale_since is None:
            logger.warning("registry: SQLite file %s unreadable (%s); serving the last snapshot", self.path, exc)
            self._stale_since = self._monotonic()
            self._snapshot = None
        self._store_version = None  # read everything once it answers again

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return at this process's next write, when another process's write shows, or after ``timeout_s``."""
        # Real time, not the injected clocks: this is an actual wait.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        changed = self._changed
        while not self._closed:
            try:
                if await self._run(_store_version) != self._store_version:
                    return
            except (sqlite3.Error, OSError):
                pass  # the next sync reports it (stale)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self._poll_s, remaining)):
                    await changed.wait()
                    return


_SELECT_ONE = "SELECT weight, metadata, lease_expires_at, registered_at FROM members WHERE pool = ? AND url = ?"


def _store_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(_VERSION).fetchone()
    return int(row[0]) if row is not None else 0


def _read(conn: sqlite3.Connection, known: int | None, now: float) -> tuple[int, Records] | None:
    """``None`` when the version row still says ``known``; else (version, unexpired records), pruning
    the expired ones in the same transaction."""
    conn.execute("BEGIN")
    try:
        version = _store_version(conn)
        if known is not None and version == known:
            return None
        records: dict[str, dict[str, BackendRecord]] = {}
        expired = False
        rows = conn.execute("SELECT pool, url, weight, metadata, lease_expires_at, registered_at FROM members")
        for pool, url, weight, metadata, lease, registered_at in rows:
            record = _record(pool, url, weight, metadata, lease, registered_at)
            if record is None:
                continue
            if record.expired(now):
                expired = True
                continue
            records.setdefault(pool, {})[url] = record
    finally:
        conn.execute("COMMIT")
    if expired:
        # Housekeeping only: expired records are already out of this view. Not a membership change for
        # the version row (every reader drops them by their lease), so no other worker re-reads for it.
        with contextlib.suppress(sqlite3.Error):  # busy: the next full read prunes them
            conn.execute("DELETE FROM members WHERE lease_expires_at IS NOT NULL AND lease_expires_at <= ?", (now,))
    return version, freeze(records)


def _row_record(row: tuple[Any, ...] | None, pool: str, url: str) -> BackendRecord | None:
    if row is None:
        return None
    return _record(pool, url, *row)


def _record(pool: Any, url: Any, weight: Any, metadata: Any, lease: Any, registered_at: Any) -> BackendRecord | None:
    """A row as a record; ``None`` (and a warning) for a row no writer of ours could have made."""
    try:
        if not (isinstance(pool, str) and isinstance(url, str) and isinstance(metadata, str)):
            raise ValueError("pool, url and metadata must be text")
        decoded = json.loads(metadata)
        if not isinstance(decoded, dict):
            raise ValueError("metadata must be a JSON object")
        numbers = [weight, registered_at] + ([] if lease is None else [lease])
        if not all(isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) for n in numbers):
            raise ValueError("weight, lease and registration time must be finite numbers")
        return BackendRecord(
            pool, url, float(weight), decoded, None if lease is None else float(lease), float(registered_at)
        )
    except ValueError as exc:
        logger.warning("registry: ignoring a malformed SQLite row for %r in pool %r: %s", url, pool, exc)
        return None

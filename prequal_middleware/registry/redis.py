"""``RedisRegistry``: membership shared by every gateway process that points at one Redis (extra ``redis``).

Each gateway keeps its own snapshot and refreshes it from Redis in :meth:`RedisRegistry.sync`, which
costs one round trip when nothing changed; requests never touch Redis. Key layout and scripts:
:mod:`.redis_layout`. While Redis is unreachable the last snapshot is served as it is (fail-static: no
lease expires, since no backend could have renewed one), and writes raise ``RegistryUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    same_membership,
)
from prequal_middleware.registry.redis_layout import (
    HEARTBEAT,
    PRUNE,
    REGISTER,
    UNREGISTER,
    RedisKeys,
    decode_payload,
    encode_payload,
    score,
)

try:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    raise ImportError("RedisRegistry needs the 'redis' extra: pip install 'prequal-middleware[redis]'") from exc

logger = logging.getLogger("prequal_middleware.registry")

# What a failing store raises: redis-py's errors, socket errors, and our own deadlines.
_STORE_ERRORS = (RedisError, OSError, TimeoutError)


class RedisRegistry:
    """Registry in Redis, with a local snapshot per process.

    Parameters:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        namespace: prefix of every key, so several registries can share one Redis.
        client: an existing ``redis.asyncio.Redis`` to use (its owner closes it); ``url`` is then ignored.
        wall: wall-clock epoch seconds, for leases (shared with other hosts: keep clocks in sync).
        monotonic: monotonic seconds, for ``stale_since`` and ``synced_at``.
        socket_timeout_s: connect and read timeout of each Redis call; a write gives up after twice this.
        full_refresh_s: re-read everything at least this often, even if the version key did not move.
        max_connections: size of the connection pool (one of them is held by the pub/sub subscription).
    """

    kind = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "prequal",
        client: Redis | None = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        socket_timeout_s: float = 1.0,
        full_refresh_s: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=socket_timeout_s,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # One retry covers a pooled connection that a Redis restart closed; more would only delay
                # the RegistryUnavailable that callers need quickly.
                retry=Retry(NoBackoff(), 1),
                decode_responses=True,
            )
            client = Redis.from_pool(pool)
        self._client = client
        self._keys = RedisKeys(namespace)
        self._wall = wall
        self._monotonic = monotonic
        self._op_timeout_s = 2 * socket_timeout_s
        self._full_refresh_s = full_refresh_s
        self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}

        self._records: Records = EMPTY_RECORDS
        self._version = 0
        self._snapshot: RegistrySnapshot | None = None
        self._stale_since: float | None = None
        self._synced_at = monotonic()
        self._store_version: object = None  # the version key as last read
        self._next_expiry = math.inf  # earliest lease in our copy: past it, our copy may be out of date
        self._last_full = -math.inf
        self._force_full = True  # after any error: messages may have been missed
        self._sync_lock = asyncio.Lock()

        self._pubsub: PubSub | None = None
        self._pubsub_lock = asyncio.Lock()
        self._changed = asyncio.Event()  # lets concurrent waiters share one subscription
        self._closed = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to changes, then take the first snapshot; logs (never raises) if Redis is down."""
        # Subscribe first: a change made between the first sync and the subscription would go unseen.
        await self._subscribe()
        await self.sync()

    async def aclose(self) -> None:
        """Close the subscription and, if this registry created it, the connection pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        await self._drop_pubsub()
        if self._owns_client:
            await self._client.aclose()

    # --- writes -----------------------------------------------------------------------------------

    async def register(self, record: BackendRecord, ttl_s: float | None) -> BackendRecord:
        """Insert or replace a record (see :meth:`Registry.register`)."""
        now = self._wall()
        lease = lease_expiry(now, ttl_s)
        weight, metadata = float(record.weight), normalise_metadata(record.metadata)
        keys = self._keys
        registered_at = await self._run(
            "register",
            [keys.pools, *keys.pool(record.pool), keys.version],
            [record.pool, record.url, encode_payload(weight, metadata), repr(now), score(lease), keys.changes],
        )
        return BackendRecord(record.pool, record.url, weight, metadata, lease, float(registered_at))

    async def heartbeat(self, pool: str, url: str, ttl_s: float | None) -> BackendRecord | None:
        """Renew a lease (see :meth:`Registry.heartbeat`)."""
        now = self._wall()
        lease = lease_expiry(now, ttl_s)
        keys = self._keys
        args = [url, repr(now), score(lease), keys.changes]
        found = await self._run("heartbeat", [*keys.pool(pool), keys.version], args)
        if found is None:
            return None
        payload, registered_at = found
        weight, metadata = decode_payload(_text(payload))
        return BackendRecord(pool, url, weight, metadata, lease, 0.0 if registered_at is None else float(registered_at))

    async def unregister(self, pool: str, url: str) -> bool:
        """Remove a record (see :meth:`Registry.unregister`)."""
        keys = self._keys
        removed = await self._run(
            "unregister", [keys.pools, *keys.pool(pool), keys.version], [pool, url, repr(self._wall()), keys.changes]
        )
        return bool(removed)

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await self._scripts[script](keys=keys, args=args)
        except _STORE_ERRORS as exc:
            raise RegistryUnavailable(f"Redis registry unavailable ({script}): {exc}") from exc

    # --- the local view ---------------------------------------------------------------------------

    def snapshot(self) -> RegistrySnapshot:
        """The records as of the last successful sync (see :meth:`Registry.snapshot`)."""
        if self._snapshot is None:
            self._snapshot = RegistrySnapshot(self._records, self._version, self._stale_since, self._synced_at)
        return self._snapshot

    async def sync(self) -> bool:
        """Refresh from Redis (see :meth:`Registry.sync`); one round trip when the version key did not move."""
        async with self._sync_lock:
            try:
                async with asyncio.timeout(self._op_timeout_s):
                    changed = await self._sync()
            except _STORE_ERRORS as exc:
                self._went_stale(exc)
                return False
            if self._stale_since is not None:
                logger.info("registry: Redis reachable again")
            self._stale_since = None
            self._synced_at = self._monotonic()
            self._snapshot = None
            return changed

    async def _sync(self) -> bool:
        now = self._wall()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._keys.version)
            pipe.smembers(self._keys.pools)
            store_version, pools = await pipe.execute()
        if (
            not self._force_full
            and store_version == self._store_version
            and now < self._next_expiry
            and self._monotonic() - self._last_full < self._full_refresh_s
        ):
            return False
        members, expired = await self._read(sorted(_text(p) for p in pools), now)
        self._store_version, self._force_full, self._last_full = store_version, False, self._monotonic()
        changed = not same_membership(self._records, members)
        self._records, self._next_expiry = members, earliest_expiry(members)
        if changed:
            self._version += 1
        if expired:
            await self._prune(expired, now)
        return changed

    async def _read(self, pools: list[str], now: float) -> tuple[Records, list[str]]:
        # One MULTI/EXEC, so a pool's hash and zsets are read at the same instant as each other.
        async with self._client.pipeline(transaction=True) as pipe:
            for pool in pools:
                hash_key, leases_key, since_key = self._keys.pool(pool)
                pipe.hgetall(hash_key)
                pipe.zrange(leases_key, 0, -1, withscores=True)
                pipe.zrange(since_key, 0, -1, withscores=True)
            replies = await pipe.execute()
        records: dict[str, dict[str, BackendRecord]] = {}
        expired: list[str] = []
        for index, pool in enumerate(pools):
            payloads, leases, since = replies[3 * index : 3 * index + 3]
            expiries = {_text(url): float(s) for url, s in leases}
            registered = {_text(url): float(s) for url, s in since}
            for raw_url, payload in payloads.items():
                url = _text(raw_url)
                expiry = expiries.get(url, -math.inf)  # no lease entry cannot happen: treat it as expired
                if expiry <= now:
                    expired.append(pool)
                    continue
                try:
                    weight, metadata = decode_payload(_text(payload))
                except ValueError:
                    logger.warning("registry: ignoring a malformed record for %s in pool %s", url, pool)
                    continue
                lease = None if math.isinf(expiry) else expiry
                records.setdefault(pool, {})[url] = BackendRecord(
                    pool, url, weight, metadata, lease, registered.get(url, 0.0)
                )
        return freeze(records), sorted(set(expired))

    async def _prune(self, pools: list[str], now: float) -> None:
        # Housekeeping only: the expired records are already out of every view, so a failure here is harmless.
        try:
            for pool in pools:
                await self._scripts["prune"](keys=[self._keys.pools, *self._keys.pool(pool)], args=[pool, repr(now)])
        except _STORE_ERRORS as exc:
            logger.debug("registry: pruning expired leases failed: %s", exc)

    def _went_stale(self, exc: BaseException) -> None:
        if self._stale_since is None:
            reason = str(exc) or type(exc).__name__
            logger.warning("registry: Redis unreachable (%s); serving the last snapshot", reason)
            self._stale_since = self._monotonic()
            self._snapshot = None
        self._force_full = True

    # --- change notifications ---------------------------------------------------------------------

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when a change is published on Redis, else after ``timeout_s`` (never raises)."""
        # Real time, not the injected clocks: this is an actual wait, and a fake clock would never end it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._closed:
            return
        if self._pubsub_lock.locked():
            # Another task is reading the subscription; it wakes us when it sees a change.
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await changed.wait()
            return
        async with self._pubsub_lock:
            if await self._listen(deadline):
                self._changed.set()
                self._changed = asyncio.Event()
                return
        # Timed out, or no subscription (Redis down): then the rest of the wait is a plain sleep.
        remaining = deadline - loop.time()
        if remaining > 0 and not self._closed:
            await asyncio.sleep(remaining)

    async def _listen(self, deadline: float) -> bool:
        """Wait on the subscription until a message (``True``) or ``deadline``; ``False`` at once without one."""
        pubsub = self._pubsub or await self._subscribe()
        if pubsub is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            while (remaining := deadline - loop.time()) > 0:
                if await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining) is not None:
                    # Several writes in a burst are one change for the caller: take what is already queued.
                    while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0) is not None:
                        pass
                    return True
            return False
        except _STORE_ERRORS as exc:
            logger.debug("registry: change subscription lost: %s", exc)
            self._force_full = True
            await self._drop_pubsub()
            return False

    async def _subscribe(self) -> PubSub | None:
        if self._closed:
            return None
        pubsub = self._client.pubsub()
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await pubsub.subscribe(self._keys.changes)
        except _STORE_ERRORS as exc:
            logger.debug("registry: cannot subscribe to changes: %s", exc)
            await pubsub.aclose()
            return None
        self._pubsub = pubsub
        self._force_full = True  # anything published before this moment was missed
        return pubsub

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*_STORE_ERRORS):
                await pubsub.aclose()


_SCRIPTS = {"register": REGISTER, "heartbeat": HEARTBEAT, "unregister": UNREGISTER, "prune": PRUNE}


def _text(value: str | bytes) -> str:
    # A caller's own client may not decode responses.
    return value.decode() if isinstance(value, bytes) else value

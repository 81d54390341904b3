"""``RedisRegistry`` as several gateways use it: propagation, outage and recovery, isolation, no KEYS/SCAN."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from prequal_middleware.registry import BackendRecord, RegistryUnavailable
from prequal_middleware.registry.redis import RedisRegistry

from .conftest import FakeClock, RedisServer, unique_namespace

API = "/api"
URL = "http://10.0.0.5:8000"
URL2 = "http://10.0.0.6:8000"

# A change arrived by pub/sub: well under the 5 s timed wait that ends ``propagate`` (and the waits
# below) without it, with room for a loaded machine.
PUBSUB_BOUND_S = 2.5
# A call to a hung Redis gives up after the registry's op timeout (2 x socket_timeout_s = 2 s); without
# one it hangs.
HUNG_BOUND_S = 4.0

Gateways = Callable[..., Awaitable[tuple[RedisRegistry, RedisRegistry]]]


@pytest_asyncio.fixture
async def gateways() -> AsyncIterator[Callable[..., Awaitable[tuple[RedisRegistry, RedisRegistry]]]]:
    """Two started registries ("gateways") on one server and namespace; closed at teardown."""
    opened: list[RedisRegistry] = []

    async def make(server: RedisServer, **options: object) -> tuple[RedisRegistry, RedisRegistry]:
        namespace = unique_namespace()
        pair = [RedisRegistry(server.url, namespace=namespace, **options) for _ in range(2)]  # type: ignore[arg-type]
        opened.extend(pair)
        for registry in pair:
            await registry.start()
        return pair[0], pair[1]

    yield make
    for registry in opened:
        await registry.aclose()


@pytest_asyncio.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def propagate(writer: Awaitable[object], reader: RedisRegistry) -> float:
    """Seconds from the write until ``reader``'s snapshot has it, as the gateway's loop would see it."""
    started = time.perf_counter()
    await asyncio.gather(reader.wait_for_change(5.0), writer)
    await reader.sync()
    return time.perf_counter() - started


async def test_a_registration_reaches_the_other_gateway_by_pub_sub(
    redis_server: RedisServer, gateways: Gateways
) -> None:
    a, b = await gateways(redis_server)

    elapsed = await propagate(a.register(BackendRecord(API, URL, 2.0, {"zone": "a"}), ttl_s=30), b)

    assert elapsed < PUBSUB_BOUND_S
    assert b.snapshot().pool(API)[URL].metadata == {"zone": "a"}

    elapsed = await propagate(a.unregister(API, URL), b)

    assert elapsed < PUBSUB_BOUND_S
    assert b.snapshot().records == {}


async def test_concurrent_waiters_share_the_subscription(redis_server: RedisServer, gateways: Gateways) -> None:
    a, b = await gateways(redis_server)
    started = time.perf_counter()

    await asyncio.gather(b.wait_for_change(5.0), b.wait_for_change(5.0), a.register(BackendRecord(API, URL), 30))

    assert time.perf_counter() - started < PUBSUB_BOUND_S


async def test_outage_serves_the_last_snapshot_then_both_converge(
    own_redis_server: RedisServer, gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await gateways(own_redis_server)
    await a.register(BackendRecord(API, URL, metadata={"n": 1}), ttl_s=0.5)
    await b.sync()
    before = b.snapshot()

    own_redis_server.stop()
    await asyncio.sleep(0.6)  # past the lease: fail-static must keep the record anyway

    with caplog.at_level(logging.WARNING, logger="prequal_middleware.registry"):
        assert await b.sync() is False
    assert "unreachable" in caplog.text
    stale = b.snapshot()
    assert stale.records == before.records
    assert stale.version == before.version
    assert stale.stale_since is not None
    assert await b.sync() is False
    assert b.snapshot().stale_since == stale.stale_since  # stale since the first failure
    for write in (
        lambda: a.register(BackendRecord(API, URL2), ttl_s=30),
        lambda: a.heartbeat(API, URL, ttl_s=30),
        lambda: a.unregister(API, URL),
    ):
        started = time.perf_counter()
        with pytest.raises(RegistryUnavailable):
            await write()
        assert time.perf_counter() - started < 2.0
    started = time.perf_counter()
    await b.wait_for_change(0.3)  # falls back to a timed wait
    assert 0.2 < time.perf_counter() - started < 1.5

    own_redis_server.start()  # same port, empty: nothing was persisted
    assert await a.heartbeat(API, URL, ttl_s=30) is None  # so the backend re-registers, as after a 404
    stored = await a.register(BackendRecord(API, URL, metadata={"n": 1}), ttl_s=30)
    for registry in (a, b):
        await registry.sync()
        assert registry.snapshot().stale_since is None
        assert registry.snapshot().records == {API: {URL: stored}}

    elapsed = await propagate(a.register(BackendRecord(API, URL2), ttl_s=30), b)  # subscription is back
    assert elapsed < PUBSUB_BOUND_S
    assert set(b.snapshot().pool(API)) == {URL, URL2}


async def test_start_with_redis_down_is_stale_not_an_error(own_redis_server: RedisServer) -> None:
    own_redis_server.stop()
    registry = RedisRegistry(own_redis_server.url, namespace=unique_namespace())
    try:
        started = time.perf_counter()
        await registry.start()
        assert time.perf_counter() - started < 2.0
        assert registry.snapshot().stale_since is not None
        assert registry.snapshot().records == {}
        with pytest.raises(RegistryUnavailable):
            await registry.register(BackendRecord(API, URL), ttl_s=30)

        own_redis_server.start()
        await registry.sync()
        assert registry.snapshot().stale_since is None
        assert await propagate(registry.register(BackendRecord(API, URL), ttl_s=30), registry) < PUBSUB_BOUND_S
        assert URL in registry.snapshot().pool(API)
    finally:
        await registry.aclose()


async def test_a_hung_redis_times_out_instead_of_hanging(own_redis_server: RedisServer, gateways: Gateways) -> None:
    a, b = await gateways(own_redis_server)
    await a.register(BackendRecord(API, URL), ttl_s=30)
    await b.sync()
    assert own_redis_server.process is not None
    pid = own_redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)  # accepts nothing, answers nothing: like a partitioned network
    try:
        started = time.perf_counter()
        with pytest.raises(RegistryUnavailable):
            await a.register(BackendRecord(API, URL2), ttl_s=30)
        assert time.perf_counter() - started < HUNG_BOUND_S
        started = time.perf_counter()
        assert await b.sync() is False
        assert time.perf_counter() - started < HUNG_BOUND_S
        assert b.snapshot().stale_since is not None
        assert URL in b.snapshot().pool(API)
        started = time.perf_counter()
        await b.wait_for_change(0.3)
        assert time.perf_counter() - started < 1.5
    finally:
        os.kill(pid, signal.SIGCONT)

    await b.sync()
    assert b.snapshot().stale_since is None


async def test_namespaces_are_isolated(redis_server: RedisServer) -> None:
    one = RedisRegistry(redis_server.url, namespace=unique_namespace())
    two = RedisRegistry(redis_server.url, namespace=unique_namespace())
    try:
        for registry in (one, two):
            await registry.start()
        await one.register(BackendRecord(API, URL), ttl_s=30)
        await two.wait_for_change(0.2)

        assert await two.sync() is False
        assert two.snapshot().records == {}
        assert await two.heartbeat(API, URL, ttl_s=30) is None
        assert await two.unregister(API, URL) is False
        await one.sync()
        assert URL in one.snapshot().pool(API)
    finally:
        for registry in (one, two):
            await registry.aclose()


async def test_another_gateways_renewal_is_seen_not_expired(redis_server: RedisServer, raw: Redis) -> None:
    clock = FakeClock()
    namespace = unique_namespace()
    a, b = (
        RedisRegistry(redis_server.url, namespace=namespace, wall=clock.wall, monotonic=clock.monotonic) for _ in "ab"
    )
    try:
        for registry in (a, b):
            await registry.start()
        await a.register(BackendRecord(API, URL), ttl_s=10)
        await b.sync()
        version = await raw.get(f"{namespace}:version")
        clock.advance(8)

        renewed = await a.heartbeat(API, URL, ttl_s=10)
        assert await raw.get(f"{namespace}:version") == version  # renewals do not make every gateway re-read
        clock.advance(5)  # past b's copy of the lease, inside the renewed one

        assert await b.sync() is False
        assert b.snapshot().pool(API)[URL] == renewed
        clock.advance(6)
        assert await b.sync() is True
        assert b.snapshot().records == {}
        # b pruned the expired record from Redis too
        assert await raw.hlen(f"{namespace}:pool:{API}") == 0
        assert await raw.smembers(f"{namespace}:pools") == set()
    finally:
        for registry in (a, b):
            await registry.aclose()


async def test_never_keys_nor_scan(redis_server: RedisServer, raw: Redis) -> None:
    clock = FakeClock()
    registry = RedisRegistry(redis_server.url, namespace=unique_namespace(), wall=clock.wall, monotonic=clock.monotonic)
    seen: list[str] = []
    try:
        async with raw.monitor() as monitor:
            await registry.start()
            await registry.register(BackendRecord(API, URL), ttl_s=10)
            await registry.register(BackendRecord("/search", URL2), ttl_s=None)
            await registry.wait_for_change(0.1)
            await registry.sync()
            await registry.sync()  # the cheap path
            await registry.heartbeat(API, URL, ttl_s=10)
            clock.advance(11)
            await registry.sync()  # expiry and pruning
            await registry.unregister("/search", URL2)
            await raw.echo("end-of-check")
            while not (command := (await monitor.next_command())["command"]).endswith("end-of-check"):
                seen.append(command.split()[0].upper())
    finally:
        await registry.aclose()

    assert "EVALSHA" in seen and "HGETALL" in seen and "ZRANGEBYSCORE" in seen
    assert not {"KEYS", "SCAN", "HSCAN", "SSCAN", "ZSCAN"} & set(seen)


async def test_a_callers_client_is_used_and_left_open(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)  # bytes responses
    try:
        registry = RedisRegistry(client=client, namespace=unique_namespace())
        await registry.start()
        stored = await registry.register(BackendRecord(API, URL, 1.5, {"a": "ü"}), ttl_s=30)
        await registry.sync()
        assert registry.snapshot().records == {API: {URL: stored}}
        assert await registry.heartbeat(API, URL, ttl_s=30) is not None
        await registry.aclose()

        assert await client.ping()
    finally:
        await client.aclose()


async def test_aclose_leaves_no_task_behind(redis_server: RedisServer, gateways: Gateways) -> None:
    a, b = await gateways(redis_server)
    await propagate(a.register(BackendRecord(API, URL), ttl_s=30), b)
    for registry in (a, b):
        await registry.aclose()

    assert asyncio.all_tasks() == {asyncio.current_task()}


def test_registry_package_imports_without_redis() -> None:
    code = (
        "import sys\n"
        "sys.modules['redis'] = None\n"  # makes `import redis` fail, as when the extra is not installed
        "import prequal_middleware.registry as registry\n"
        "print(registry.MemoryRegistry.kind)\n"
        "try:\n"
        "    registry.RedisRegistry\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)

    assert result.stdout.splitlines() == [
        "memory",
        "RedisRegistry needs the 'redis' extra: pip install 'prequal-middleware[redis]'",
    ]

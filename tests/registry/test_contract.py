"""One contract every registry meets (run against memory, SQLite and a real Redis), plus the record's JSON form."""

from __future__ import annotations

import asyncio
import inspect
import json
import time

import pytest

from prequal_middleware.registry import BackendRecord, Registry, RegistrySnapshot

from .conftest import FakeClock

API = "/api"
URL = "http://10.0.0.5:8000"


def record(url: str = URL, pool: str = API, **fields: object) -> BackendRecord:
    return BackendRecord(pool, url, **fields)  # type: ignore[arg-type]


async def synced(registry: Registry) -> RegistrySnapshot:
    await registry.sync()
    return registry.snapshot()


async def test_register_shows_in_snapshot_after_sync(registry: Registry, clock: FakeClock) -> None:
    stored = await registry.register(record(weight=2.0, metadata={"zone": "a"}), ttl_s=30)

    assert stored == BackendRecord(API, URL, 2.0, {"zone": "a"}, clock.now + 30, clock.now)
    snap = await synced(registry)
    assert snap.records == {API: {URL: stored}}
    assert snap.pool(API)[URL] == stored
    assert snap.pool("/other") == {}
    assert snap.stale_since is None


async def test_reregister_updates_in_place_and_keeps_registered_at(registry: Registry, clock: FakeClock) -> None:
    first = await registry.register(record(weight=1.0, metadata={"v": 1}), ttl_s=30)
    clock.advance(5)

    second = await registry.register(record(weight=3.5, metadata={"v": 2}), ttl_s=30)

    assert second.registered_at == first.registered_at
    assert (second.weight, second.metadata, second.lease_expires_at) == (3.5, {"v": 2}, clock.now + 30)
    snap = await synced(registry)
    assert list(snap.pool(API).values()) == [second]


async def test_heartbeat_renews_the_lease_only(registry: Registry, clock: FakeClock) -> None:
    stored = await registry.register(record(weight=2.0, metadata={"k": [1, 2]}), ttl_s=10)
    clock.advance(8)

    renewed = await registry.heartbeat(API, URL, ttl_s=10)

    assert renewed is not None
    assert renewed.lease_expires_at == clock.now + 10
    assert (renewed.weight, renewed.metadata, renewed.registered_at) == (2.0, {"k": [1, 2]}, stored.registered_at)
    clock.advance(8)  # past the first lease, inside the renewed one
    snap = await synced(registry)
    assert snap.pool(API)[URL] == renewed
    clock.advance(2.5)
    assert URL not in (await synced(registry)).pool(API)


async def test_heartbeat_of_unknown_returns_none(registry: Registry) -> None:
    await registry.register(record(), ttl_s=10)

    assert await registry.heartbeat(API, "http://10.0.0.9:8000", ttl_s=10) is None
    assert await registry.heartbeat("/other", URL, ttl_s=10) is None


async def test_expired_lease_disappears_at_sync(registry: Registry, clock: FakeClock) -> None:
    first = await registry.register(record(), ttl_s=10)
    await registry.register(record("http://10.0.0.6:8000"), ttl_s=None)
    await registry.sync()
    clock.advance(10)

    assert await registry.sync() is True
    assert list(registry.snapshot().pool(API)) == ["http://10.0.0.6:8000"]
    assert await registry.heartbeat(API, URL, ttl_s=10) is None  # must re-register
    again = await registry.register(record(), ttl_s=10)
    assert again.registered_at == clock.now != first.registered_at


async def test_no_lease_never_expires(registry: Registry, clock: FakeClock) -> None:
    stored = await registry.register(record(), ttl_s=None)
    assert stored.lease_expires_at is None

    clock.advance(10 * 365 * 86400)

    assert (await synced(registry)).pool(API)[URL] == stored


async def test_unregister(registry: Registry) -> None:
    await registry.register(record(), ttl_s=30)
    await registry.sync()

    assert await registry.unregister(API, URL) is True
    assert await registry.unregister(API, URL) is False
    assert await registry.unregister("/nowhere", URL) is False
    assert (await synced(registry)).records == {}


async def test_pools_are_independent(registry: Registry) -> None:
    in_api = await registry.register(record(pool=API, weight=1.0), ttl_s=30)
    in_search = await registry.register(record(pool="/search", weight=5.0), ttl_s=30)
    assert (await synced(registry)).records == {API: {URL: in_api}, "/search": {URL: in_search}}

    await registry.unregister(API, URL)

    assert (await synced(registry)).records == {"/search": {URL: in_search}}
    assert await registry.heartbeat(API, URL, ttl_s=30) is None
    assert await registry.heartbeat("/search", URL, ttl_s=30) is not None


async def test_version_moves_on_membership_changes_only(registry: Registry, clock: FakeClock) -> None:
    versions = [(await synced(registry)).version]

    async def step(expect_change: bool) -> None:
        changed = await registry.sync()
        version = registry.snapshot().version
        assert changed is expect_change
        assert (version != versions[-1]) is expect_change
        versions.append(version)

    await registry.register(record(weight=1.0), ttl_s=10)
    await step(True)  # new member
    await registry.register(record(weight=1.0), ttl_s=10)
    await step(False)  # same content: only the lease moved
    await registry.heartbeat(API, URL, ttl_s=10)
    await step(False)
    await registry.heartbeat(API, "http://nobody:1", ttl_s=10)
    await step(False)
    await registry.register(record(weight=2.0), ttl_s=10)
    await step(True)  # weight
    await registry.register(record(weight=2.0, metadata={"a": 1}), ttl_s=10)
    await step(True)  # metadata
    await registry.register(record(weight=2.0, metadata={"a": 1}), ttl_s=None)
    await step(True)  # lease -> no lease
    await registry.unregister(API, "http://nobody:1")
    await step(False)
    await registry.unregister(API, URL)
    await step(True)
    await registry.register(record(), ttl_s=5)
    await step(True)
    clock.advance(6)
    await step(True)  # expiry
    await step(False)
    assert versions == sorted(versions)


async def test_records_round_trip_exactly(registry: Registry) -> None:
    metadata = {"zone": "eu-west-1", "ünï": "cödé ✓", "n": 0.1 + 0.2, "big": 2**53 + 1, "list": [1, "x", None, True]}
    metadata["nested"] = {"deep": {"deeper": [1.5e-300, -0.0]}}
    stored = await registry.register(record(weight=0.1 + 0.2, metadata=metadata), ttl_s=12.345678901)

    got = (await synced(registry)).pool(API)[URL]

    assert got == stored
    assert got.weight == 0.1 + 0.2
    assert got.metadata == metadata
    assert json.dumps(got.metadata, sort_keys=True) == json.dumps(metadata, sort_keys=True)
    assert repr(got.registered_at) == repr(stored.registered_at)
    assert repr(got.lease_expires_at) == repr(stored.lease_expires_at)


async def test_metadata_is_copied_through_json(registry: Registry) -> None:
    metadata: dict[str, object] = {"tags": ("a", "b")}
    stored = await registry.register(record(metadata=metadata), ttl_s=30)
    metadata["tags"] = "changed later by the caller"

    assert stored.metadata == {"tags": ["a", "b"]}
    assert (await synced(registry)).pool(API)[URL].metadata == {"tags": ["a", "b"]}
    with pytest.raises(ValueError, match="JSON"):
        await registry.register(record(metadata={"bad": object()}), ttl_s=30)


@pytest.mark.parametrize("ttl_s", [0, -1, float("inf"), float("nan")])
async def test_bad_ttl_is_refused(registry: Registry, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await registry.register(record(), ttl_s=ttl_s)


async def test_concurrent_registrations_all_land(registry: Registry) -> None:
    urls = [f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(100)]

    stored = await asyncio.gather(
        *(registry.register(record(url, weight=float(i)), ttl_s=30) for i, url in enumerate(urls))
    )

    snap = await synced(registry)
    assert len(snap.pool(API)) == 100
    assert {s.url: s for s in stored} == dict(snap.pool(API))


async def test_wait_for_change_wakes_on_a_write(registry: Registry) -> None:
    await registry.sync()
    started = time.perf_counter()

    await asyncio.gather(registry.wait_for_change(5.0), registry.register(record(), ttl_s=30))

    assert time.perf_counter() - started < 1.0
    assert await registry.sync() is True


async def test_wait_for_change_times_out_without_writes(registry: Registry) -> None:
    await registry.sync()
    started = time.perf_counter()

    await registry.wait_for_change(0.2)

    assert 0.15 <= time.perf_counter() - started < 1.0


async def test_snapshot_is_synchronous_and_stable(registry: Registry) -> None:
    assert not inspect.iscoroutinefunction(registry.snapshot)
    await registry.register(record(), ttl_s=30)
    await registry.sync()

    assert registry.snapshot() is registry.snapshot()  # no rebuild per call
    with pytest.raises(TypeError):
        registry.snapshot().records[API]["http://x:1"] = record()  # type: ignore[index]


def test_backend_record_json_round_trip() -> None:
    rec = BackendRecord("/api", URL, 0.1 + 0.2, {"a": [1, {"b": None}]}, 1_700_000_030.123456789, 1_699_999_999.5)

    text = rec.to_json()

    assert " " not in text
    assert BackendRecord.from_json(text) == rec
    assert BackendRecord.from_json(text.encode()) == rec
    no_lease = BackendRecord("/api", URL)
    assert BackendRecord.from_json(no_lease.to_json()) == no_lease


@pytest.mark.parametrize(
    "text",
    ["[]", '{"url": "u"}', '{"pool": "/p", "url": "u", "weight": "1"}', '{"pool": "/p", "url": "u", "metadata": []}'],
)
def test_backend_record_from_json_refuses_other_shapes(text: str) -> None:
    with pytest.raises(ValueError):
        BackendRecord.from_json(text)

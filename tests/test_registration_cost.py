"""A registration write costs O(1): ``Membership`` applies its own writes as deltas, full applies converge.

With the memory registry, register / unregister / heartbeat change one member (and one record) and
the scheduler's registry loop, woken by that write, does not apply everything again. These tests pin
what the deltas must keep of the full apply's rules (static members, ``awaits_health_check``,
draining while requests are in flight, announcements, listeners, metrics), check with random write
sequences that deltas and full applies end in the same state, and count the work per write (calls
and lines run, members built, full re-reads) at 10 and 1000 members instead of timing it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings, strategies as st

from prequal_middleware.config import HealthSettings, UpstreamPool
from prequal_middleware.core import BasePolicy, Member, Outcome, PrequalPolicy
from prequal_middleware.gateway import membership as membership_module
from prequal_middleware.gateway.gateway import Gateway
from prequal_middleware.gateway.membership import Membership
from prequal_middleware.gateway.metrics import PrequalMetrics
from prequal_middleware.gateway.pool import Attempt, PoolRuntime
from prequal_middleware.registry import (
    BackendRecord,
    MemoryRegistry,
    Registry,
    RegistrySnapshot,
    memory as memory_module,
)
from prequal_middleware.registry.base import LocalRegistry
from prequal_middleware.registry.registration import RegistrationRequest
from prequal_middleware.transports.base import UpstreamRequest, UpstreamResponse
from tests.python_work import python_work

T = TypeVar("T")
POOL = "/api"
STATIC = "http://static:80"
URLS = [f"http://b{i}:80" for i in range(3)] + [STATIC]
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)


# --- harness -------------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (the memory registry never does) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine suspended")


class Clock:
    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


class SpyMetrics(PrequalMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[str] = []

    def forget_backend(self, pool: str, backend: str) -> None:
        self.forgotten.append(backend)
        super().forget_backend(pool, backend)


class FullApplies:
    """A memory registry Membership cannot tell is local: it re-reads and applies it in full after every
    write (the path a shared registry takes, and every write's path before deltas): the reference."""

    kind = "memory"

    def __init__(self, inner: MemoryRegistry) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def register(self, record: BackendRecord, ttl_s: float | None) -> BackendRecord:
        return await self.inner.register(record, ttl_s)

    async def heartbeat(self, pool: str, url: str, ttl_s: float | None) -> BackendRecord | None:
        return await self.inner.heartbeat(pool, url, ttl_s)

    async def unregister(self, pool: str, url: str) -> bool:
        return await self.inner.unregister(pool, url)

    def snapshot(self) -> RegistrySnapshot:
        return self.inner.snapshot()

    async def sync(self) -> bool:
        return await self.inner.sync()

    async def wait_for_change(self, timeout_s: float) -> None:
        await self.inner.wait_for_change(timeout_s)


class Breakable(PrequalPolicy):
    """Prequal whose methods named in ``broken`` raise: a policy bug, injected through the pool's policy
    factory (a compiled core's methods cannot be patched on an instance)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()

    def upsert_member(self, member: Member, now: float) -> None:
        if "upsert_member" in self.broken:
            raise RuntimeError("policy bug")
        super().upsert_member(member, now)

    def remove_member(self, backend: str, now: float) -> None:
        if "remove_member" in self.broken:
            raise RuntimeError("policy bug")
        super().remove_member(backend, now)


class Side:
    """One pool, its membership and what its listeners and metrics saw."""

    def __init__(
        self, clock: Clock, *, local: bool = True, health_path: str | None = "/healthz", clients: int = 2
    ) -> None:
        config = UpstreamPool(
            POOL,
            upstreams=[STATIC],
            health=HealthSettings(path=health_path),
            clients_per_pool=clients,
            policy=Breakable,
        )
        self.pool = PoolRuntime(config, random.Random(0))
        self.pool.set_members([Member(STATIC)], clock.mono)  # as the gateway does
        self.memory = MemoryRegistry(wall=lambda: clock.wall, monotonic=lambda: clock.mono)
        self.registry: Registry = self.memory if local else FullApplies(self.memory)
        self.metrics = SpyMetrics()
        self.membership = Membership({POOL: self.pool}, self.registry, self.metrics, lambda: clock.mono)
        self.membership.wall = lambda: clock.wall
        self.events: list[tuple[list[str], list[str]]] = []
        self.pool.add_listener(lambda pool, joined, left: self.events.append((list(joined), list(left))))
        run(self.membership.refresh())  # the gateway's startup
        self.clock = clock
        self.attempts: dict[str, list[Attempt]] = {}

    def start(self, url: str) -> None:
        """The forwarder sends a request to ``url`` (through the pool's attempt handle, as it does)."""
        handle = self.pool.attempt(url, self.pool.next_client(), self.clock.mono)
        handle.__enter__()
        self.attempts.setdefault(url, []).append(handle)

    def finish(self, url: str) -> None:
        """The oldest request to ``url`` still in flight finishes."""
        self.attempts[url].pop(0).finish(Outcome.SUCCESS, 0.001, self.clock.mono)

    def register(self, url: str, weight: float = 1.0, ttl_s: float | None = 30.0) -> BackendRecord:
        return run(self.membership.register(RegistrationRequest(POOL, url, weight, None, ttl_s)))

    def unregister(self, url: str) -> bool:
        return run(self.membership.unregister(RegistrationRequest(POOL, url)))

    def heartbeat(self, url: str, ttl_s: float | None = 30.0) -> BackendRecord | None:
        return run(self.membership.heartbeat(RegistrationRequest(POOL, url, ttl_s=ttl_s)))

    def refresh(self) -> None:
        run(self.membership.refresh())  # what the scheduler's registry loop does after a change

    def state(self, now: float) -> dict[str, Any]:
        """What a write decides, order aside (a delta appends a newcomer, a full apply lists records first)."""
        m = self.membership
        return {
            "members": dict(self.pool.members),
            "in_flight": dict(self.pool.backend_in_flight),
            "records": dict(m.records.get(POOL, {})),
            "leases": {url: m.lease_remaining_s(POOL, url) for url in URLS},
            "policies": [
                {
                    "backends": {b.id: (b.state, b.weight, b.in_flight) for b in policy.snapshot(now).backends},
                    "uniform": policy._uniform_weights,
                    "weights": dict(policy._weights),
                    "outliers": sorted(policy.outliers._health),
                }
                for policy in self.pool.clients
                if isinstance(policy, BasePolicy)
            ],
            "forgotten": Counter(self.metrics.forgotten),
            "joined": Counter(b for joined, _ in self.events for b in joined),
            "left": Counter(b for _, left in self.events for b in left),
        }


# --- deltas and full applies agree -------------------------------------------------------------------

Op = tuple[str, int, float, float | None]  # (kind, backend index, weight or seconds, ttl_s)
# Writes and requests more often than the rest, so that drains, expiries and re-registrations meet.
KINDS = ("register",) * 3 + ("unregister", "acquire", "release") * 2 + ("heartbeat", "healthy", "advance", "refresh")
OPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, len(URLS) - 1),
        st.sampled_from((1.0, 2.0, 6.0, 31.0)),
        st.sampled_from((None, 5.0, 30.0)),
    ),
    min_size=20,
    max_size=60,
)


@PROPERTY
@given(ops=OPS)
def test_deltas_and_full_applies_end_in_the_same_state(ops: list[Op]) -> None:
    clock = Clock()
    delta, full = Side(clock), Side(clock, local=False)
    for kind, index, weight, ttl_s in ops:
        url = URLS[index]
        sides = (delta, full)
        if kind == "register":
            results: list[Any] = [s.register(url, weight, ttl_s) for s in sides]
        elif kind == "unregister":
            results = [s.unregister(url) for s in sides]
            if not results[0]:
                # Nothing of ours to remove: the full path waits for the registry loop (a swept expired
                # lease, a finished drain), the delta path may already have applied it.
                for s in sides:
                    s.refresh()
        elif kind == "heartbeat":
            results = [s.heartbeat(url, ttl_s) for s in sides]
            for s in sides:
                s.refresh()  # the full path reports the renewed lease from the registry loop's next round on
        elif kind == "acquire":  # the forwarder sends a request to a member
            results = [url in s.pool.members for s in sides]
            for s in sides if results[0] else ():
                s.start(url)
        elif kind == "release":  # and it finishes
            results = [s.pool.backend_in_flight.get(url, 0) > 0 for s in sides]
            for s in sides if results[0] else ():
                s.finish(url)
        elif kind == "healthy":  # a health check passed
            results = []
            for s in sides:
                for policy in s.pool.clients:
                    policy.set_health(url, True, clock.mono)
        elif kind == "advance":
            results = []
            clock.advance(weight)
        else:
            results = []
            for s in sides:
                s.refresh()
        assert results[:1] == results[-1:], kind
        assert delta.state(clock.mono) == full.state(clock.mono), (kind, url)
        assert all(isinstance(p, BasePolicy) for p in delta.pool.clients)

    # The registry loop's next round changes nothing on either side, and a full apply over the deltas
    # finds nothing to set.
    for s in (delta, full):
        s.refresh()
    assert delta.state(clock.mono) == full.state(clock.mono)
    before = delta.state(clock.mono)
    set_members: list[object] = []
    delta.pool.set_members = lambda members, now: set_members.append(members)  # type: ignore[method-assign]
    delta.membership.apply()
    assert set_members == [] and delta.state(clock.mono) == before

    # From scratch: a new pool over the same registry holds the same members, but for the draining ones
    # (a new pool has no requests in flight) and what the policies learnt (health).
    clock.advance(0.0)
    scratch = Side(clock)
    scratch.memory = delta.memory
    scratch.membership.registry = delta.memory
    scratch.membership.apply()
    expected = {url: m for url, m in delta.pool.members.items() if not m.draining}
    assert scratch.pool.members == expected
    assert scratch.membership.records == delta.membership.records


# --- the rules the deltas keep -----------------------------------------------------------------------


def test_registered_members_await_a_health_check_unless_static_or_unchecked() -> None:
    clock = Clock()
    checked = Side(clock)
    checked.register("http://new:80", weight=2.0)
    checked.register(STATIC, weight=3.0)
    assert checked.pool.members["http://new:80"] == Member("http://new:80", weight=2.0, awaits_health_check=True)
    assert checked.pool.members[STATIC] == Member(STATIC, weight=3.0), "the operator's member is trusted"
    unchecked = Side(clock, health_path=None)
    unchecked.register("http://new:80")
    assert unchecked.pool.members["http://new:80"] == Member("http://new:80")


def test_weight_changes_update_the_member_and_the_policies() -> None:
    side = Side(Clock())
    side.register("http://a:80")
    side.register("http://a:80", weight=4.0)
    assert side.pool.members["http://a:80"].weight == 4.0
    for policy in side.pool.clients:
        assert isinstance(policy, BasePolicy)
        assert {b.id: b.weight for b in policy.snapshot(0.0).backends} == {STATIC: 1.0, "http://a:80": 4.0}
        assert not policy._uniform_weights
    side.register("http://a:80", weight=1.0)
    assert all(isinstance(p, BasePolicy) and p._uniform_weights for p in side.pool.clients)
    assert side.membership.record_of(POOL, "http://a:80") == side.memory.snapshot().records[POOL]["http://a:80"]


def test_unregistering_a_static_member_restores_it_as_configured() -> None:
    side = Side(Clock())
    side.register(STATIC, weight=5.0)
    assert side.events == [([STATIC], [])], "present: announced"
    side.events.clear()
    assert side.unregister(STATIC)
    assert side.pool.members[STATIC] == Member(STATIC)
    assert side.metrics.forgotten == [] and side.events == []


def test_a_member_with_requests_in_flight_drains_then_leaves() -> None:
    clock = Clock()
    side = Side(clock)
    side.register("http://a:80", weight=2.0)
    side.start("http://a:80")
    side.events.clear()
    assert side.unregister("http://a:80")
    assert side.pool.members["http://a:80"] == Member("http://a:80", weight=2.0, draining=True)
    assert side.metrics.forgotten == [] and side.events == [], "a draining member has not left yet"
    assert side.membership.record_of(POOL, "http://a:80") is None
    side.refresh()
    assert side.pool.members["http://a:80"].draining, "kept while its request is in flight"
    side.finish("http://a:80")
    side.refresh()  # the registry loop's next round
    assert "http://a:80" not in side.pool.members and "http://a:80" not in side.pool.backend_in_flight
    assert side.metrics.forgotten == ["http://a:80"] and side.events == [([], ["http://a:80"])]


def test_registering_a_draining_member_again_takes_it_back() -> None:
    side = Side(Clock())
    side.register("http://a:80")
    side.start("http://a:80")
    side.unregister("http://a:80")
    side.events.clear()
    side.register("http://a:80")
    assert side.pool.members["http://a:80"] == Member("http://a:80", awaits_health_check=True)
    side.finish("http://a:80")
    side.refresh()
    assert "http://a:80" in side.pool.members, "registered again: no longer draining"
    assert side.events == [(["http://a:80"], [])], "announced: registered again while present"


def test_registering_again_while_present_announces_it() -> None:
    side = Side(Clock())
    side.register("http://a:80")
    side.register("http://a:80")
    side.register("http://a:80", weight=2.0)
    assert side.events == [(["http://a:80"], [])] * 3, "joined once, then announced on each re-registration"


def test_listeners_hear_the_one_member_that_joined_or_left() -> None:
    side = Side(Clock())
    for i in range(100):
        side.register(f"http://m{i}:80")
    side.events.clear()
    side.register("http://new:80")
    side.unregister("http://new:80")
    side.unregister("http://m7:80")
    assert side.events == [(["http://new:80"], []), ([], ["http://new:80"]), ([], ["http://m7:80"])]
    assert side.metrics.forgotten == ["http://new:80", "http://m7:80"], "metrics forget a removed backend"


def test_heartbeat_renews_the_lease_membership_reports() -> None:
    clock = Clock()
    side = Side(clock)
    side.register("http://a:80", ttl_s=10.0)
    clock.advance(6.0)
    assert side.membership.lease_remaining_s(POOL, "http://a:80") == pytest.approx(4.0)
    side.heartbeat("http://a:80", ttl_s=10.0)
    assert side.membership.lease_remaining_s(POOL, "http://a:80") == pytest.approx(10.0)
    side.heartbeat("http://a:80", ttl_s=None)
    assert side.membership.lease_remaining_s(POOL, "http://a:80") is None


def test_changes_membership_did_not_make_get_a_full_apply() -> None:
    clock = Clock()
    side = Side(clock)
    side.register("http://a:80", ttl_s=5.0)
    run(side.memory.register(BackendRecord(POOL, "http://direct:80"), None))  # not through Membership
    side.register("http://b:80")  # the pools were behind: this write cannot be a delta alone
    assert {"http://a:80", "http://b:80", "http://direct:80"} <= side.pool.members.keys()
    run(side.memory.register(BackendRecord(POOL, "http://direct2:80"), None))
    side.refresh()
    assert "http://direct2:80" in side.pool.members
    clock.advance(6.0)
    side.refresh()  # the lease ran out: the registry sweeps it at sync
    assert "http://a:80" not in side.pool.members and side.membership.record_of(POOL, "http://a:80") is None


def test_a_write_after_a_lease_ran_out_drops_that_member_too() -> None:
    clock = Clock()
    side = Side(clock)
    side.register("http://a:80", ttl_s=5.0)
    clock.advance(6.0)
    side.register("http://b:80")  # before the registry loop's next round, which would sweep the lease
    assert "http://a:80" not in side.pool.members and side.membership.record_of(POOL, "http://a:80") is None
    assert side.metrics.forgotten == ["http://a:80"] and "http://b:80" in side.pool.members
    clock.advance(0.5)
    side.register("http://c:80", ttl_s=5.0)
    clock.advance(6.0)
    assert side.unregister("http://c:80") is False, "its lease ran out: nothing left to unregister"
    side.refresh()  # the registry loop's round, woken by the swept lease
    assert "http://c:80" not in side.pool.members and side.metrics.forgotten == ["http://a:80", "http://c:80"]


def test_a_failed_delta_leaves_the_next_refresh_a_full_apply() -> None:
    side = Side(Clock())
    broken = side.pool.clients[0]
    assert isinstance(broken, Breakable)
    broken.broken.add("upsert_member")
    with pytest.raises(RuntimeError):
        side.register("http://a:80")
    broken.broken.clear()
    applies: list[None] = []
    apply = side.membership.apply
    side.membership.apply = lambda: applies.append(apply())  # type: ignore[method-assign]
    side.refresh()
    assert applies == [None], "the registry loop re-applies everything"
    assert all(isinstance(p, BasePolicy) and "http://a:80" in p.members for p in side.pool.clients)


def test_a_failed_delta_that_moved_no_version_still_heals_at_the_next_refresh() -> None:
    side = Side(Clock())
    side.register("http://a:80")
    side.register("http://b:80")
    side.start("http://a:80")
    side.unregister("http://a:80")
    side.finish("http://a:80")  # its last request finished: it leaves at the next write or refresh
    broken = side.pool.clients[0]
    assert isinstance(broken, Breakable)
    broken.broken.add("remove_member")
    with pytest.raises(RuntimeError):
        side.register("http://b:80")  # the same entry again: the registry's version does not move
    broken.broken.clear()
    side.refresh()
    assert "http://a:80" not in side.pool.members
    assert all(isinstance(p, BasePolicy) and "http://a:80" not in p.members for p in side.pool.clients)


def test_the_periodic_full_apply_still_runs() -> None:
    clock = Clock()
    side = Side(clock)
    applies: list[None] = []
    apply = side.membership.apply
    side.membership.apply = lambda: applies.append(apply())  # type: ignore[method-assign]
    side.register("http://a:80")
    side.refresh()
    assert applies == []
    clock.advance(membership_module.FULL_APPLY_S)
    side.refresh()
    assert applies == [None]


def test_the_memory_registry_refreezes_only_the_pool_written() -> None:
    registry = MemoryRegistry()
    run(registry.register(BackendRecord("/a", "http://a:80"), None))
    run(registry.register(BackendRecord("/b", "http://b:80"), None))
    first = registry.snapshot()
    run(registry.register(BackendRecord("/a", "http://a2:80"), None))
    second = registry.snapshot()
    assert second.records["/b"] is first.records["/b"], "an unwritten pool's copy is reused"
    assert list(second.records["/a"]) == ["http://a:80", "http://a2:80"]
    assert list(first.records["/a"]) == ["http://a:80"], "an earlier snapshot does not change"
    run(registry.unregister("/b", "http://b:80"))
    assert "/b" not in registry.snapshot().records, "no empty pools"
    assert isinstance(registry, LocalRegistry)
    assert registry.current_version() == registry.snapshot().version


# --- O(1): the work per write does not grow with the pool ------------------------------------------


class Counts:
    """Counts the work a write does: Python calls and lines, members built, full re-reads, copies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self._spy(monkeypatch, Membership, "apply")
        self._spy(monkeypatch, PoolRuntime, "set_members")
        self._spy(monkeypatch, BasePolicy, "set_members")
        self._spy(monkeypatch, MemoryRegistry, "snapshot")

        def new_member(*args: Any, **kwargs: Any) -> Member:
            self.counts["Member"] += 1
            return Member(*args, **kwargs)

        monkeypatch.setattr(membership_module, "Member", new_member)

        def frozen(mapping: Any) -> Any:
            self.counts["freeze"] += 1
            return MappingProxyType(mapping)

        monkeypatch.setattr(memory_module, "MappingProxyType", frozen)

    def _spy(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        original = getattr(cls, name)
        key = f"{cls.__name__}.{name}"

        def spy(*args: Any, **kwargs: Any) -> Any:
            self.counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, spy)

    def measure(self, action: Callable[[], object]) -> Counter[str]:
        """The counts of one action; ``calls`` and ``lines`` are what Python ran (a loop over n shows)."""
        self.counts.clear()
        traced = python_work(action)
        return self.counts + traced


def write_costs(side: Side, counts: Counts) -> dict[str, Counter[str]]:
    new = "http://new:80"
    steps: Sequence[tuple[str, Callable[[], object]]] = [
        ("register", lambda: side.register(new)),
        ("loop after register", side.refresh),
        ("weight change", lambda: side.register(new, weight=2.0)),
        ("loop after weight change", side.refresh),
        ("heartbeat", lambda: side.heartbeat(new)),
        ("in flight", lambda: side.start(new)),
        ("unregister while in flight", lambda: side.unregister(new)),
        ("loop while draining", side.refresh),
        ("drained", lambda: side.finish(new)),
        ("loop after the drain", side.refresh),
        ("register again", lambda: side.register(new)),
        ("unregister", lambda: side.unregister(new)),
        ("loop after unregister", side.refresh),
    ]
    return {name: counts.measure(action) for name, action in steps}


def test_a_write_costs_the_same_at_10_and_1000_members(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = []
    for size in (10, 1000):
        clock = Clock()
        side = Side(clock)
        for i in range(size):
            side.register(f"http://m{i}:80")
        assert len(side.pool.members) == size + 1
        counts = Counts(monkeypatch)  # after the setup: only the writes are counted
        costs.append(write_costs(side, counts))
        monkeypatch.undo()
    small, large = costs
    assert large == small, "the work per write grows with the pool"
    for step, cost in large.items():
        assert cost["Membership.apply"] == 0 and cost["PoolRuntime.set_members"] == 0, step
        assert cost["BasePolicy.set_members"] == 0 and cost["MemoryRegistry.snapshot"] == 0, step
        assert cost["freeze"] == 0 and cost["Member"] <= 1, step


async def test_the_gateway_registry_loop_adds_no_full_apply_per_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a started gateway: its scheduler's registry loop wakes on every write and must not
    re-read the pool (health checks on, answered at once)."""

    class Healthy:
        async def send(self, request: UpstreamRequest, timeouts: Any) -> UpstreamResponse:
            async def empty() -> Any:
                return
                yield b""

            return UpstreamResponse(200, [], empty())

        async def aclose(self) -> None:
            return None

    monkeypatch.setattr(membership_module, "FULL_APPLY_S", 3600.0)  # no periodic apply in the window
    for size in (10, 1000):
        pool = UpstreamPool(POOL, health=HealthSettings(path="/healthz", interval_s=3600.0))
        gateway = Gateway([pool], transport=Healthy())
        await gateway.startup()
        try:
            for i in range(size):
                await gateway.register(RegistrationRequest(POOL, f"http://m{i}:80"))
            await asyncio.sleep(0.01)
            counts = Counts(monkeypatch)
            for i in range(20):
                await gateway.register(RegistrationRequest(POOL, "http://new:80", weight=1.0 + i % 2))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                await gateway.unregister(RegistrationRequest(POOL, "http://new:80"))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            assert len(gateway.pools[POOL].members) == size
            work = +counts.counts
            monkeypatch.undo()
            monkeypatch.setattr(membership_module, "FULL_APPLY_S", 3600.0)
            assert work["Membership.apply"] == 0 and work["PoolRuntime.set_members"] == 0, size
            assert work["BasePolicy.set_members"] == 0 and work["MemoryRegistry.snapshot"] == 0, size
            assert work["freeze"] == 0 and work["Member"] == 20, size  # one per register, none per unregister
        finally:
            await gateway.shutdown()

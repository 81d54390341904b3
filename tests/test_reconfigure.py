"""``Gateway.reconfigure``: the routing table swapped at once, unchanged pools kept with their state, replaced
and removed pools retired once their requests drained (or the drain timed out), nothing half-applied,
no task left behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from prequal_middleware import Gateway, Route, UpstreamPool
from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.gateway.pool import PoolRuntime, drop_probes
from prequal_middleware.gateway.scheduler import ProbeScheduler
from prequal_middleware.testing import CannedResponse, MockTransport

A, B, C = "http://a.invalid", "http://b.invalid", "http://c.invalid"


def _gateway(*pools: UpstreamPool) -> Gateway:
    transport = MockTransport({url: CannedResponse(200, body=url.encode()) for url in (A, B, C)})
    return Gateway(pools=list(pools), transport=transport)


def _scheduler(gateway: Gateway) -> ProbeScheduler:
    scheduler = gateway._scheduler
    assert scheduler is not None
    return scheduler


def _stopped(scheduler: ProbeScheduler, pool: PoolRuntime) -> bool:
    return (
        pool not in scheduler.pools
        and id(pool) not in scheduler._pool_tasks
        and id(pool) not in scheduler._probe_clients
        and pool.probe_sink is drop_probes
    )


async def _until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_an_unchanged_pool_is_kept_a_changed_one_is_fresh_and_new_routes_serve_at_once() -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]), UpstreamPool("/b", upstreams=[B]))
    async with asyncio.timeout(10), gateway:
        kept, changed = gateway.pools["/a"], gateway.pools["/b"]
        kept.clients[0].on_probe(A, gateway.clock(), 3, 0.01)  # Prequal state that must survive
        before = kept.clients[0].snapshot(gateway.clock()).pool_size
        done = await gateway.reconfigure(
            [
                UpstreamPool("/a", upstreams=[A]),
                UpstreamPool("/b", upstreams=[B], policy="round_robin"),
                UpstreamPool(name="c", upstreams=[C]),
            ],
            [Route("/c", pool="c"), Route("/c/v2", pool="c", strip_prefix=False)],
        )
        assert (done.added, done.removed, done.replaced, done.updated) == (("c",), (), ("/b",), ())
        assert gateway.pools["/a"] is kept and kept.clients[0].snapshot(gateway.clock()).pool_size == before
        assert gateway.pools["/b"] is not changed and gateway.pools["/b"].clients[0].snapshot(0).policy != "prequal"
        route = gateway.match(b"/c/v2/x")
        assert route is not None and route.pool is gateway.pools["c"] and not route.strip_prefix
        assert list(gateway.pools["c"].members) == [C]
        scheduler = _scheduler(gateway)
        assert gateway.pools["c"] in scheduler.pools and id(gateway.pools["c"]) in scheduler._probe_clients
        await _until(lambda: _stopped(scheduler, changed))  # nothing in flight: retired at once


async def test_new_upstreams_and_route_settings_keep_the_pool_and_its_state() -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A, B]))
    async with asyncio.timeout(10), gateway:
        pool = gateway.pools["/a"]
        done = await gateway.reconfigure([UpstreamPool("/a", upstreams=[B, C], strip_prefix=False)])
        assert done.updated == ("/a",) and not done.replaced
        assert gateway.pools["/a"] is pool and set(pool.members) == {B, C}
        route = gateway.match(b"/a/x")
        assert route is not None and route.pool is pool and not route.strip_prefix


async def test_a_removed_pool_keeps_its_tasks_until_its_request_finishes() -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]), UpstreamPool("/b", upstreams=[B]))
    async with asyncio.timeout(10), gateway:
        old = gateway.pools["/b"]
        scheduler = _scheduler(gateway)
        attempt = old.attempt(B, old.clients[0], gateway.clock()).__enter__()  # a request in flight on /b
        await gateway.reconfigure([UpstreamPool("/a", upstreams=[A])], drain_timeout_s=30)
        assert gateway.match(b"/b/x") is None, "new requests no longer reach the removed pool"
        await asyncio.sleep(0.5)
        assert old in scheduler.pools and scheduler._pool_tasks.get(id(old)), "its health checks still run"
        assert old.probe_sink is not drop_probes and B in old.members, "its request may still retry there"
        attempt.__exit__(None, None, None)
        await _until(lambda: _stopped(scheduler, old))


async def test_the_drain_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]), UpstreamPool("/b", upstreams=[B]))
    async with asyncio.timeout(10), gateway:
        old = gateway.pools["/b"]
        scheduler = _scheduler(gateway)
        old.attempt(B, old.clients[0], gateway.clock()).__enter__()  # never finishes
        with caplog.at_level(logging.WARNING, "prequal_middleware.gateway.scheduler"):
            await gateway.reconfigure([UpstreamPool("/a", upstreams=[A], policy="random")], drain_timeout_s=0.3)
            await asyncio.sleep(0.1)
            assert not _stopped(scheduler, old)
            await _until(lambda: _stopped(scheduler, old), timeout_s=1.0)
        assert "1 requests still in flight after 0.3 s" in caplog.text


async def test_the_default_drain_bound_is_the_longest_silence_a_request_may_have() -> None:
    from prequal_middleware.config import Timeouts

    gateway = _gateway(
        UpstreamPool("/a", upstreams=[A]),
        UpstreamPool("/b", upstreams=[B], timeouts=Timeouts(connect_s=1, response_headers_s=2, read_idle_s=3)),
    )
    async with asyncio.timeout(10), gateway:
        old = gateway.pools["/b"]
        scheduler = _scheduler(gateway)
        bounds: list[float] = []
        retire = scheduler.retire

        def recording(pool: PoolRuntime, timeout_s: float, *args: Any, **kwargs: Any) -> None:
            bounds.append(timeout_s)
            retire(pool, timeout_s, *args, **kwargs)

        scheduler.retire = recording  # type: ignore[method-assign]
        await gateway.reconfigure([UpstreamPool("/a", upstreams=[A])])
        assert bounds == [6.0]
        await _until(lambda: _stopped(scheduler, old))


async def test_no_task_is_left_behind() -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]), UpstreamPool("/b", upstreams=[B]))
    async with asyncio.timeout(10):
        before = asyncio.all_tasks()
        async with gateway:
            for policy in ("random", "round_robin"):
                await gateway.reconfigure([UpstreamPool("/a", upstreams=[A], policy=policy)], drain_timeout_s=0.2)
            await gateway.reconfigure([UpstreamPool("/a", upstreams=[A]), UpstreamPool("/c", upstreams=[C])])
            scheduler = _scheduler(gateway)
            await _until(lambda: len(scheduler.pools) == 2)
            assert len(scheduler._probe_clients) == 2 and set(scheduler._pool_tasks) <= {id(p) for p in scheduler.pools}
        assert asyncio.all_tasks() == before
        assert not scheduler._tasks and not scheduler._probe_clients


async def test_a_retiring_pool_is_stopped_by_shutdown() -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]), UpstreamPool("/b", upstreams=[B]))
    async with asyncio.timeout(10):
        before = asyncio.all_tasks()
        async with gateway:
            old = gateway.pools["/b"]
            old.attempt(B, old.clients[0], gateway.clock()).__enter__()
            await gateway.reconfigure([UpstreamPool("/a", upstreams=[A])], drain_timeout_s=60)
            scheduler = _scheduler(gateway)
        assert asyncio.all_tasks() == before and not scheduler._tasks


def _not_a_policy() -> Any:
    return object()


@pytest.mark.parametrize(
    ("pools", "routes", "message"),
    [
        ([UpstreamPool("/a", upstreams=[C]), UpstreamPool("/z")], [Route("/r", pool="nope")], "names no pool"),
        ([UpstreamPool("/a", upstreams=[C]), UpstreamPool("/a")], [], "is taken"),
        ([UpstreamPool("/a", upstreams=[C]), UpstreamPool("/z", policy=_not_a_policy)], [], "must return a Policy"),
    ],
    ids=["route-to-no-pool", "two-pools-one-name", "bad-policy"],
)
async def test_an_invalid_configuration_changes_nothing(
    pools: list[UpstreamPool], routes: list[Route], message: str
) -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]), UpstreamPool("/b", upstreams=[B]))
    async with asyncio.timeout(10), gateway:
        state = (gateway.pools, gateway.routes, gateway._route_table, dict(gateway.pools["/a"].members))
        scheduled = _scheduler(gateway).pools
        with pytest.raises(ConfigurationError, match=message):
            await gateway.reconfigure(pools, routes)
        assert (gateway.pools, gateway.routes, gateway._route_table, dict(gateway.pools["/a"].members)) == state
        assert gateway.pools is state[0] and gateway._route_table is state[2]
        assert _scheduler(gateway).pools == scheduled


async def test_a_gateway_not_running_is_reconfigured_too() -> None:
    gateway = _gateway(UpstreamPool("/a", upstreams=[A]))
    await gateway.reconfigure([UpstreamPool("/b", upstreams=[B])])
    assert list(gateway.pools) == ["/b"] and list(gateway.pools["/b"].members) == [B]
    async with asyncio.timeout(10), gateway:
        assert [p.name for p in _scheduler(gateway).pools] == ["/b"]


async def test_a_replaced_pool_keeps_the_health_verdicts_of_the_members_it_shares() -> None:
    from prequal_middleware.registry.registration import RegistrationRequest

    gateway = _gateway(UpstreamPool("/b"))  # members only by registration: each awaits a passing check
    async with asyncio.timeout(10), gateway:
        await gateway.register(RegistrationRequest(pool="/b", url=B))
        await _until(lambda: gateway.pools["/b"].select(gateway.clock()) is not None)
        await gateway.reconfigure([UpstreamPool("/b", policy="round_robin")])
        # Checked before the new pool's first health check could run: eligible at once.
        selection = gateway.pools["/b"].select(gateway.clock())
        assert selection is not None and selection.backend == B

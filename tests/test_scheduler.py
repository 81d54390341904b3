"""ProbeScheduler against real servers on loopback: receipt times, failures, idle probing, in-flight
accounting, local-mode re-probing and closing the probe connections of members that left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Container, Iterable, Sequence
from typing import Any

import pytest

from prequal_middleware import Gateway, HealthSettings, PrequalSettings, ProbeSettings, UpstreamPool
from prequal_middleware.config import Timeouts
from prequal_middleware.core import BasePolicy, Member, Policy, PrequalPolicy, Selection
from prequal_middleware.gateway.membership import Membership
from prequal_middleware.gateway.metrics import PrequalMetrics
from prequal_middleware.gateway.pool import PoolRuntime
from prequal_middleware.gateway.scheduler import ProbeScheduler
from prequal_middleware.registry import MemoryRegistry
from prequal_middleware.registry.registration import RegistrationRequest
from prequal_middleware.transports.base import UpstreamRequest, UpstreamResponse
from tests.servers import free_port
from tests.test_probe_client import GOOD, raw_server

WAIT_S = 5.0
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
SERVER_ERROR = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
MALFORMED = b"HELLO\r\n\r\n"
BAD_HEADER = b"HTTP/1.1 200 OK\r\nx-prequal-rif: many\r\ncontent-length: 0\r\n\r\n"


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingPolicy(BasePolicy):
    """Remembers every probe outcome the scheduler reports; asks for the idle probes a test sets."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__(rng=random.Random(0))
        self.probes: list[tuple[str, float, int, float]] = []
        self.failures: list[tuple[str, float]] = []
        self.idle: list[str] = []
        self.answered = asyncio.Event()

    def _choose(self, candidates: Sequence[str], now: float, exclude: Container[str]) -> Selection:
        return Selection(candidates[0], "policy")

    def on_probe(self, backend: str, now: float, rif: int, latency_s: float) -> None:
        self.probes.append((backend, now, rif, latency_s))
        self.answered.set()

    def on_probe_failure(self, backend: str, now: float) -> None:
        super().on_probe_failure(backend, now)
        self.failures.append((backend, now))
        self.answered.set()

    def idle_probes(self, now: float) -> Sequence[str]:
        return self.idle


class NoTransport:
    """Health checks are off in these tests: the scheduler must never send a request."""

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        raise AssertionError("no upstream request expected")

    async def aclose(self) -> None:
        return None


def runtime(
    upstreams: Iterable[str],
    policy: str | Callable[[], Policy] = "prequal",
    *,
    probes: ProbeSettings | None = None,
    prequal: PrequalSettings | None = None,
    clients: int = 1,
    now: float = 0.0,
) -> PoolRuntime:
    config = UpstreamPool(
        "/p",
        upstreams=list(upstreams),
        policy=policy,
        probes=probes or ProbeSettings(timeout_s=1.0),
        prequal=prequal or PrequalSettings(),
        health=HealthSettings(path=None),
        clients_per_pool=clients,
    )
    pool = PoolRuntime(config, random.Random(0))
    pool.set_members([Member(u) for u in config.upstreams], now)
    return pool


@contextlib.asynccontextmanager
async def running(
    pool: PoolRuntime, clock: Callable[[], float] = time.monotonic, **kwargs: Any
) -> AsyncIterator[ProbeScheduler]:
    scheduler = ProbeScheduler([pool], NoTransport(), PrequalMetrics(), clock, **kwargs)
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.aclose()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
    """Poll ``condition`` on the event loop; how long it took (AssertionError naming ``what`` on timeout)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


class ProbeServer:
    """A raw HTTP/1.1 server answering every request with ``reply`` (changeable), on keep-alive
    connections; counts requests (with their arrival times) and open connections."""

    def __init__(self, reply: bytes = GOOD) -> None:
        self.reply = reply
        self.hold: asyncio.Event | None = None  # when set to an unset event, answers wait for it
        self.requests: list[float] = []
        self.paths: list[str] = []
        self.arrived = asyncio.Event()
        self.open = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.paths.append(head.split(b" ", 2)[1].decode())
                self.requests.append(time.monotonic())
                self.arrived.set()
                if self.hold is not None:
                    await self.hold.wait()
                writer.write(self.reply)
        finally:
            self.open -= 1

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[ProbeServer]:
        async with raw_server(self.handle) as url:
            self.url = url
            yield self
            # Let connections the client closed (or gave up while connecting) reach their handlers, so
            # that raw_server closes them all rather than leaving a handler that never started.
            if self.hold is not None:
                self.hold.set()  # held handlers answer, then read the EOF of the closed connection
            await asyncio.sleep(0.05)
            await until(lambda: self.open == 0, "the probe connections to close")


# --- rule 1: a pool entry carries the time of the answer's receipt -------------------------------------


async def test_the_probe_is_reported_at_its_receipt_time_not_its_send_time() -> None:
    clock = FakeClock(100.0)
    server = ProbeServer()
    server.hold = asyncio.Event()
    recorder = RecordingPolicy()
    async with server.serve():
        pool = runtime([server.url], lambda: recorder)
        async with running(pool, clock) as scheduler:
            scheduler.send_probes(pool, recorder, [server.url])
            await asyncio.wait_for(server.arrived.wait(), WAIT_S)
            clock.now = 107.5  # the answer is received 7.5 s (of the fake clock) after it was asked for
            server.hold.set()
            await asyncio.wait_for(recorder.answered.wait(), WAIT_S)
            assert recorder.probes == [(server.url, 107.5, 7, 0.0015)]
            scheduler._metrics.flush()  # the request path's observations since the last flush
            duration = scheduler._metrics.probe_duration.labels(pool="/p")
            assert duration._sum.get() == pytest.approx(7.5), "the probe's duration is receipt minus send"


async def test_a_prequal_pool_entry_ages_from_its_receipt() -> None:
    # Asked at t=100, answered at t=100.9; with max_age 1 s the entry lives until 101.9, not 101.0.
    clock = FakeClock(100.0)
    server = ProbeServer()
    server.hold = asyncio.Event()
    async with server.serve():
        pool = runtime([server.url], prequal=PrequalSettings(max_age_s=1.0, max_idle_s=60.0), now=100.0)
        policy = pool.clients[0]
        assert isinstance(policy, PrequalPolicy)
        async with running(pool, clock) as scheduler:
            scheduler.send_probes(pool, policy, [server.url])
            await asyncio.wait_for(server.arrived.wait(), WAIT_S)
            clock.now = 100.9
            server.hold.set()
            await until(lambda: len(policy.pool) == 1, "the probe to be pooled")
            assert policy.snapshot(101.5).pool_size == 1, "aged by receipt time (100.9), it is 0.6 s old"
            assert policy.snapshot(102.0).pool_size == 0, "older than max_age_s after receipt"


# --- rule 2: a failed probe is reported to the policy -------------------------------------------------


@pytest.mark.parametrize("failure", ["refused", "timeout", "500", "malformed", "invalid-header"])
async def test_a_failed_probe_is_reported_to_the_policy(failure: str) -> None:
    clock = FakeClock(50.0)
    replies = {"500": SERVER_ERROR, "malformed": MALFORMED, "invalid-header": BAD_HEADER}
    server = ProbeServer(replies.get(failure, GOOD))
    if failure == "timeout":
        server.hold = asyncio.Event()  # never set: no answer
    recorder = RecordingPolicy()
    async with server.serve():
        url = f"http://127.0.0.1:{free_port()}" if failure == "refused" else server.url
        pool = runtime([url], lambda: recorder, probes=ProbeSettings(timeout_s=0.5))
        async with running(pool, clock) as scheduler:
            scheduler.send_probes(pool, recorder, [url])
            assert pool.probes_in_flight == 1
            clock.now = 51.0
            await asyncio.wait_for(recorder.answered.wait(), WAIT_S)
            assert recorder.failures == [(url, 51.0)]
            assert recorder.probes == []
            assert scheduler.probe_failures == 1
            assert pool.probes_in_flight == 0, "the failed probe's slot is free again"
            assert recorder.snapshot(51.0).backends[0].probe_mode == "probe", "a failure is not 'unsupported'"


async def test_a_failed_probe_purges_the_backends_prequal_probe() -> None:
    server = ProbeServer()
    async with server.serve():
        pool = runtime([server.url], prequal=PrequalSettings(max_idle_s=60.0))
        policy = pool.clients[0]
        assert isinstance(policy, PrequalPolicy)
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, policy, [server.url])
            await until(lambda: len(policy.pool) == 1, "the first probe to be pooled")
            server.reply = SERVER_ERROR
            scheduler.send_probes(pool, policy, [server.url])
            await until(lambda: scheduler.probe_failures == 1, "the second probe to fail")
            assert len(policy.pool) == 0, "the policy dropped the backend's last answer"
            assert policy.snapshot(time.monotonic()).backends[0].rif == 7, "its last answer is still shown"


# --- rule 3: idle probes are sent, and not faster than the idle limit ---------------------------------


async def test_an_idle_pool_is_probed_at_about_its_idle_limit() -> None:
    max_idle_s = 0.2
    server = ProbeServer()
    async with server.serve():
        gateway = Gateway(
            pools=[
                UpstreamPool(
                    "/api",
                    upstreams=[server.url],
                    prequal=PrequalSettings(max_idle_s=max_idle_s),
                    health=HealthSettings(path=None),
                )
            ],
            transport=NoTransport(),
        )
        async with gateway:
            await asyncio.wait_for(server.arrived.wait(), 10 * max_idle_s)  # no request went through the gateway
            first = len(server.requests)
            window_s = 1.2
            await asyncio.sleep(window_s)
            count = len(server.requests) - first
            snapshot = gateway.pools["/api"].clients[0].snapshot(time.monotonic())
            assert snapshot.backends[0].rif == 7, "the idle probes' answers reached the policy"
        # One backend, one client: one probe per idle round, and a round at most every max_idle_s.
        assert 2 <= count <= window_s / max_idle_s + 1, server.requests
        gaps = [b - a for a, b in zip(server.requests, server.requests[1:], strict=False)]
        assert min(gaps) >= 0.5 * max_idle_s, f"probes closer together than the idle limit allows: {gaps}"


# --- rule 4: the in-flight count comes back to zero ---------------------------------------------------


async def test_in_flight_counts_a_probe_until_its_answer() -> None:
    server = ProbeServer()
    server.hold = asyncio.Event()
    recorder = RecordingPolicy()
    async with server.serve():
        pool = runtime([server.url], lambda: recorder)
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, recorder, [server.url, server.url])
            assert pool.probes_in_flight == 2
            await until(lambda: len(server.requests) == 2, "both probes to arrive")
            assert pool.probes_in_flight == 2
            server.hold.set()
            await until(lambda: len(recorder.probes) == 2, "both answers")
            assert pool.probes_in_flight == 0
            assert scheduler.probes_sent == 2
            assert probe_count(scheduler, "ok") == 2


@pytest.mark.parametrize("stage", ["connecting", "awaiting-answer"])
async def test_closing_the_scheduler_frees_the_probes_in_flight(stage: str) -> None:
    server = ProbeServer()
    server.hold = asyncio.Event()  # never answers
    recorder = RecordingPolicy()
    async with server.serve():
        pool = runtime([server.url], lambda: recorder, probes=ProbeSettings(timeout_s=WAIT_S))
        scheduler = ProbeScheduler([pool], NoTransport(), PrequalMetrics(), time.monotonic)
        await scheduler.start()
        scheduler.send_probes(pool, recorder, [server.url] * 3)
        if stage == "awaiting-answer":
            await until(lambda: len(server.requests) == 3, "the probes to arrive")
        assert pool.probes_in_flight == 3
        await scheduler.aclose()
        assert pool.probes_in_flight == 0, "every probe in flight was ended by aclose()"
        assert pool._listeners == [], "a closed scheduler no longer listens to the pool"
        assert recorder.failures == [], "a closing scheduler reports nothing to the policies"


async def test_closing_the_probe_client_frees_the_probes_in_flight() -> None:
    server = ProbeServer()
    server.hold = asyncio.Event()
    recorder = RecordingPolicy()
    async with server.serve():
        pool = runtime([server.url], lambda: recorder, probes=ProbeSettings(timeout_s=WAIT_S))
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, recorder, [server.url] * 2)
            await until(lambda: len(server.requests) == 2, "the probes to arrive")
            scheduler.send_probes(pool, recorder, [server.url])  # this one is still connecting
            assert pool.probes_in_flight == 3
            await scheduler._probe_clients[id(pool)].aclose()
            assert pool.probes_in_flight == 0
            assert [b for b, _ in recorder.failures] == [server.url] * 3


async def test_probing_goes_on_after_more_failures_than_the_in_flight_cap() -> None:
    good = ProbeServer()
    bad = ProbeServer(SERVER_ERROR)
    refused = f"http://127.0.0.1:{free_port()}"
    recorder = RecordingPolicy()
    async with good.serve(), bad.serve():
        pool = runtime(
            [good.url, bad.url, refused], lambda: recorder, probes=ProbeSettings(max_in_flight=2, timeout_s=WAIT_S)
        )
        async with running(pool) as scheduler:
            for i in range(1, 6):
                scheduler.send_probes(pool, recorder, [bad.url, refused])
                await until(lambda i=i: len(recorder.failures) == 2 * i, f"failed round {i}")  # type: ignore[misc]
            assert pool.probes_in_flight == 0 and pool.probes_skipped == 0
            scheduler.send_probes(pool, recorder, [good.url])
            await until(lambda: len(recorder.probes) == 1, "the good backend's answer")
            assert recorder.probes[0][0] == good.url
            assert pool.probes_in_flight == 0 and pool.probes_skipped == 0


async def test_beyond_the_cap_probes_are_skipped_not_queued() -> None:
    server = ProbeServer()
    server.hold = asyncio.Event()
    recorder = RecordingPolicy()
    async with server.serve():
        pool = runtime([server.url], lambda: recorder, probes=ProbeSettings(max_in_flight=2, timeout_s=WAIT_S))
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, recorder, [server.url] * 4)
            assert (pool.probes_in_flight, pool.probes_skipped, scheduler.probes_sent) == (2, 2, 2)
            scheduler.send_probes(pool, recorder, [server.url])
            assert (pool.probes_in_flight, pool.probes_skipped, scheduler.probes_sent) == (2, 3, 2)
            assert probe_count(scheduler, "skipped") == 3
            server.hold.set()
            await until(lambda: len(recorder.probes) == 2, "the two probes sent")
            await asyncio.sleep(0.05)
            assert len(server.requests) == 2, "the skipped probe was never sent"
            assert pool.probes_in_flight == 0


# --- bug a: a local-mode backend is re-probed with backoff and returns to probing ----------------------


def modes(pool: PoolRuntime, backend: str) -> list[str]:
    now = time.monotonic()
    return [b.probe_mode for c in pool.clients for b in c.snapshot(now).backends if b.id == backend]


def probe_count(scheduler: ProbeScheduler, result: str) -> float:
    scheduler._metrics.flush()
    value = scheduler._metrics.probes.labels(pool="/p", result=result)._value.get()
    return float(value)


async def test_a_local_mode_backend_returns_to_probing_when_it_answers_probes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prequal_middleware.gateway.scheduler")
    server = ProbeServer(NOT_FOUND)
    async with server.serve():
        pool = runtime([server.url], clients=2, prequal=PrequalSettings(max_idle_s=60.0))
        async with running(pool, local_reprobe_initial_s=0.05, local_reprobe_max_s=0.2) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await until(lambda: modes(pool, server.url) == ["local", "local"], "local mode on every client")
            assert scheduler.local_mode_backoff(pool, server.url) == 0.05
            delays: list[float | None] = []

            def backed_off_to_cap() -> bool:
                delay = scheduler.local_mode_backoff(pool, server.url)
                if not delays or delays[-1] != delay:
                    delays.append(delay)
                return len(delays) >= 3

            await until(backed_off_to_cap, "the re-probe backoff to double twice")
            assert delays == [0.05, 0.1, 0.2], "doubling from the initial delay"
            await asyncio.sleep(0.5)
            assert scheduler.local_mode_backoff(pool, server.url) == 0.2, "capped"
            reprobes = len(server.requests) - 1
            assert 3 <= reprobes <= 10, f"re-probed with backoff: {reprobes} re-probes in about 0.85 s"
            assert modes(pool, server.url) == ["local", "local"], "still local while it answers 404"
            assert f"backend {server.url} of pool /p answers no probes" in caplog.text

            server.reply = GOOD  # the backend gained LoadReportingMiddleware
            await until(lambda: modes(pool, server.url) == ["probe", "probe"], "probe mode again", timeout_s=2.0)
            assert scheduler.local_mode_backoff(pool, server.url) is None
            assert f"backend {server.url} of pool /p answers probes again" in caplog.text
            assert scheduler.probes_sent == len(server.requests), "re-probes count as probes sent"
            assert probe_count(scheduler, "unsupported") == len(server.requests) - 1
            assert probe_count(scheduler, "ok") == 1
            assert probe_count(scheduler, "failed") == 0
            settled = len(server.requests)
            await asyncio.sleep(0.5)
            assert len(server.requests) == settled, "no more re-probes once it answers (and the pool is idle)"
            assert pool.probes_in_flight == 0


async def test_a_local_mode_backend_announced_again_is_reprobed_at_once() -> None:
    server = ProbeServer(NOT_FOUND)
    async with server.serve():
        pool = runtime([], prequal=PrequalSettings(max_idle_s=60.0))
        membership = Membership({"/p": pool}, MemoryRegistry(), PrequalMetrics(), time.monotonic)
        request = RegistrationRequest(pool="/p", url=server.url)
        await membership.register(request)
        async with running(pool, local_reprobe_initial_s=10.0, local_reprobe_max_s=30.0) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await until(lambda: modes(pool, server.url) == ["local"], "local mode")
            await membership.register(request)  # registered again, still without LoadReportingMiddleware
            # Bounds below the counterfactual only: the scheduled re-probe is 10 s away, then 20 s.
            await until(lambda: len(server.requests) == 2, "a prompt re-probe", timeout_s=5.0)
            await until(lambda: scheduler.local_mode_backoff(pool, server.url) == 20.0, "the backoff to double")
            server.reply = GOOD
            await asyncio.sleep(0.2)
            assert modes(pool, server.url) == ["local"], "the next re-probe is 20 s away"
            await membership.register(request)  # the backend registers again (e.g. it restarted)
            await until(lambda: modes(pool, server.url) == ["probe"], "probe mode", timeout_s=5.0)


async def test_a_local_mode_backend_that_leaves_and_rejoins_is_probed_again() -> None:
    server = ProbeServer(NOT_FOUND)
    async with server.serve():
        pool = runtime([], prequal=PrequalSettings(max_idle_s=60.0))
        membership = Membership({"/p": pool}, MemoryRegistry(), PrequalMetrics(), time.monotonic)
        request = RegistrationRequest(pool="/p", url=server.url)
        await membership.register(request)
        async with running(pool, local_reprobe_initial_s=30.0, local_reprobe_max_s=30.0) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await until(lambda: modes(pool, server.url) == ["local"], "local mode")
            await membership.unregister(request)
            assert scheduler.local_mode_backoff(pool, server.url) is None, "no re-probe for a member that left"
            await membership.register(request)
            assert modes(pool, server.url) == ["probe"]
            assert scheduler.local_mode_backoff(pool, server.url) is None
            server.reply = GOOD
            probes = len(server.requests)
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await until(lambda: len(server.requests) == probes + 1, "a probe to the returning member")


async def test_a_restarted_scheduler_reprobes_backends_left_in_local_mode() -> None:
    server = ProbeServer(NOT_FOUND)
    async with server.serve():
        pool = runtime([server.url], prequal=PrequalSettings(max_idle_s=60.0))
        async with running(pool, local_reprobe_initial_s=30.0) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await until(lambda: modes(pool, server.url) == ["local"], "local mode")
        server.reply = GOOD
        async with running(pool, local_reprobe_initial_s=0.05) as scheduler:
            assert scheduler.local_mode_backoff(pool, server.url) == 0.05
            await until(lambda: modes(pool, server.url) == ["probe"], "probe mode", timeout_s=2.0)


async def test_a_local_mode_backend_that_stops_answering_stays_local_and_backs_off() -> None:
    server = ProbeServer(NOT_FOUND)
    async with server.serve():
        url = server.url
        pool = runtime([url], prequal=PrequalSettings(max_idle_s=60.0))
        scheduler = ProbeScheduler(
            [pool],
            NoTransport(),
            PrequalMetrics(),
            time.monotonic,
            local_reprobe_initial_s=0.05,
            local_reprobe_max_s=0.2,
        )
        await scheduler.start()
        scheduler.send_probes(pool, pool.clients[0], [url])
        await until(lambda: modes(pool, url) == ["local"], "local mode")
    try:
        # The server is gone: re-probes are refused, which changes nothing but the wait.
        await until(lambda: probe_count(scheduler, "failed") >= 2, "two refused re-probes")
        assert scheduler.local_mode_backoff(pool, url) == 0.2
        assert modes(pool, url) == ["local"]
        assert scheduler.probe_failures == 0, "re-probe failures are not probe failures of the policies"
        assert pool.probes_in_flight == 0
    finally:
        await scheduler.aclose()


async def test_a_reprobe_waits_for_a_free_probe_slot() -> None:
    busy = ProbeServer()
    busy.hold = asyncio.Event()
    local = ProbeServer(NOT_FOUND)
    async with busy.serve(), local.serve():
        pool = runtime(
            [busy.url, local.url],
            probes=ProbeSettings(max_in_flight=1, timeout_s=WAIT_S),
            prequal=PrequalSettings(max_idle_s=60.0),
        )
        async with running(pool, local_reprobe_initial_s=0.3, local_reprobe_max_s=0.3) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [local.url])
            await until(lambda: modes(pool, local.url) == ["local"], "local mode")
            scheduler.send_probes(pool, pool.clients[0], [busy.url])  # takes the only slot, and holds it
            assert pool.probes_in_flight == 1
            local.reply = GOOD
            await asyncio.sleep(0.7)  # two re-probes were due meanwhile
            assert len(local.requests) == 1, "no re-probe while the pool's probe slots are taken"
            assert modes(pool, local.url) == ["local"]
            busy.hold.set()
            await until(lambda: modes(pool, local.url) == ["probe"], "the deferred re-probe", timeout_s=2.0)
            assert len(local.requests) == 2


async def test_probe_settings_shape_the_probe_client() -> None:
    server = ProbeServer()
    server.hold = asyncio.Event()
    recorder = RecordingPolicy()
    async with server.serve():
        url = server.url + "/base"
        probes = ProbeSettings(path="/custom/probe", timeout_s=0.3, max_in_flight=6)
        pool = runtime([url], lambda: recorder, probes=probes)
        async with running(pool) as scheduler:
            started = time.monotonic()
            scheduler.send_probes(pool, recorder, [url])
            await until(lambda: len(recorder.failures) == 1, "the probe to time out")
            assert 0.3 <= time.monotonic() - started < 2.0, "the pool's probe timeout"
            server.hold.set()
            scheduler.send_probes(pool, recorder, [url] * 6)
            await until(lambda: len(recorder.probes) == 6, "six answers")
            assert server.open == 6, "as many idle connections kept per backend as probes may be in flight"
            assert server.paths[0] == "/base/custom/probe"


async def test_several_unsupported_answers_start_one_backoff() -> None:
    server = ProbeServer(NOT_FOUND)
    async with server.serve():
        pool = runtime([server.url], prequal=PrequalSettings(max_idle_s=60.0))
        async with running(pool, local_reprobe_initial_s=1.0, local_reprobe_max_s=10.0) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url] * 3)
            await until(lambda: len(server.requests) == 3 and pool.probes_in_flight == 0, "three 404 answers")
            # One re-probe due at 1 s, the next 2 s after it. A schedule per answer would send the
            # others within milliseconds of the first: 0.5 s is ample to see them, well before the next.
            await until(lambda: len(server.requests) >= 4, "the first re-probe", timeout_s=2.5)
            await until(lambda: pool.probes_in_flight == 0, "the re-probe's answer")
            await asyncio.sleep(0.5)
            assert len(server.requests) == 4, "one re-probe schedule per backend, not one per answer"
            assert scheduler.local_mode_backoff(pool, server.url) == 2.0


async def test_a_member_that_left_mid_probe_is_not_put_in_local_mode() -> None:
    server = ProbeServer(NOT_FOUND)
    server.hold = asyncio.Event()
    async with server.serve():
        pool = runtime([server.url], prequal=PrequalSettings(max_idle_s=60.0))
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await asyncio.wait_for(server.arrived.wait(), WAIT_S)
            pool.set_members([], time.monotonic())
            server.hold.set()
            await until(lambda: pool.probes_in_flight == 0, "the 404")
            assert scheduler.local_mode_backoff(pool, server.url) is None


def test_reprobe_settings_are_validated() -> None:
    pool = runtime([])
    for initial, cap in [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (math.inf, math.inf)]:
        with pytest.raises(ValueError, match="local_reprobe"):
            ProbeScheduler(
                [pool],
                NoTransport(),
                PrequalMetrics(),
                time.monotonic,
                local_reprobe_initial_s=initial,
                local_reprobe_max_s=cap,
            )


# --- bug b: the probe connections of a member that left are closed ------------------------------------


async def test_the_probe_connections_of_a_member_that_left_are_closed(caplog: pytest.LogCaptureFixture) -> None:
    leaving, staying = ProbeServer(), ProbeServer()
    recorder = RecordingPolicy()
    async with leaving.serve(), staying.serve():
        pool = runtime([leaving.url, staying.url], lambda: recorder)
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, recorder, [leaving.url, leaving.url, leaving.url, staying.url])
            await until(lambda: len(recorder.probes) == 4, "the answers")
            assert (leaving.open, staying.open) == (3, 1), "kept alive for the next probes"
            pool.set_members([Member(staying.url)], time.monotonic())
            await until(lambda: leaving.open == 0, "the departed member's probe connections to close", 2.0)
            assert staying.open == 1, "the other member's connection stays"
            assert "listener" not in caplog.text, "the scheduler's members listener ran without error"


async def test_a_member_removed_through_the_registry_loses_its_probe_connections() -> None:
    server = ProbeServer()
    async with server.serve():
        pool = runtime([], prequal=PrequalSettings(max_idle_s=60.0))
        membership = Membership({"/p": pool}, MemoryRegistry(), PrequalMetrics(), time.monotonic)
        request = RegistrationRequest(pool="/p", url=server.url)
        await membership.register(request)
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, pool.clients[0], [server.url])
            await until(lambda: len(server.requests) == 1 and pool.probes_in_flight == 0, "the answer")
            assert server.open == 1
            await membership.unregister(request)
            await until(lambda: server.open == 0, "the probe connection to close", 2.0)


async def test_a_member_that_leaves_mid_probe_has_its_connection_closed_after_the_answer() -> None:
    server = ProbeServer()
    server.hold = asyncio.Event()
    recorder = RecordingPolicy()
    async with server.serve():
        pool = runtime([server.url], lambda: recorder)
        async with running(pool) as scheduler:
            scheduler.send_probes(pool, recorder, [server.url])
            await asyncio.wait_for(server.arrived.wait(), WAIT_S)
            pool.set_members([], time.monotonic())
            server.hold.set()
            await until(lambda: pool.probes_in_flight == 0, "the answer")
            await until(lambda: server.open == 0, "the connection to close", 2.0)

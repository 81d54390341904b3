"""One owner per pool (issue 13, part 2): every upstream attempt goes through ``PoolRuntime.attempt``.

The handle pairs the start of an attempt with its finish, exactly once, so the pool's counts and the
policy's come back to zero whatever happened: a success, an upstream error, a retry on another
backend, a client that went away mid-response, a WebSocket closed. ``PoolRuntime.select`` hands the
probes a selection asks for to the pool's sink, and no module on the request path imports the scheduler.
"""

from __future__ import annotations

import ast
import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from prequal_middleware import Gateway, HealthSettings, RetrySettings, UpstreamPool
from prequal_middleware.core import Member, Outcome, RoundRobinPolicy
from prequal_middleware.gateway.pool import Attempt, PoolRuntime, drop_probes
from tests.apps import two_backends
from tests.helpers import gateway_app, wait_for
from tests.servers import ServerThread, free_port, serve

PACKAGE = Path(__file__).resolve().parent.parent / "prequal_middleware"
OFF = HealthSettings(path=None)
A = "http://a:80"
B = "http://b:80"


class Recording:
    """What a policy was told by the attempts: on_start, on_finish and on_report calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_start(self, backend: str, now: float) -> None:
        self.calls.append(("start", backend, now))

    def on_finish(self, backend: str, now: float, latency_s: float, outcome: Outcome) -> None:
        self.calls.append(("finish", backend, now, latency_s, outcome))

    def on_report(self, backend: str, now: float, rif: int, latency_s: float) -> None:
        self.calls.append(("report", backend, now, rif, latency_s))

    def finishes(self) -> list[tuple[str, Outcome]]:
        return [(c[1], c[4]) for c in self.calls if c[0] == "finish"]


class RecordingRoundRobin(RoundRobinPolicy):
    """Round robin that records what it is told (and still counts, through BasePolicy)."""

    def __init__(self) -> None:
        super().__init__()
        self.record = Recording()

    def on_start(self, backend: str, now: float) -> None:
        self.record.on_start(backend, now)
        super().on_start(backend, now)

    def on_finish(self, backend: str, now: float, latency_s: float, outcome: Outcome) -> None:
        self.record.on_finish(backend, now, latency_s, outcome)
        super().on_finish(backend, now, latency_s, outcome)

    def on_report(self, backend: str, now: float, rif: int, latency_s: float) -> None:
        self.record.on_report(backend, now, rif, latency_s)
        super().on_report(backend, now, rif, latency_s)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def unit_pool(policy: str = "recording", **config: Any) -> tuple[PoolRuntime, FakeClock]:
    clock = FakeClock()
    spec: Any = RecordingRoundRobin if policy == "recording" else policy
    pool = PoolRuntime(
        UpstreamPool("/api", upstreams=[A, B], policy=spec, health=OFF, **config), random.Random(1), clock
    )
    pool.set_members(pool_members(), clock.now)
    return pool, clock


def pool_members() -> list[Member]:
    return [Member(A), Member(B)]


def counts(pool: PoolRuntime, now: float = 0.0) -> tuple[int, dict[str, int], dict[str, int]]:
    """The pool's count, its per-backend counts (zeros left out), every policy's per-backend counts."""
    per_policy: dict[str, int] = {}
    for policy in pool.clients:
        for b in policy.snapshot(now).backends:
            if b.in_flight:
                per_policy[b.id] = per_policy.get(b.id, 0) + b.in_flight
    return pool.in_flight, {k: v for k, v in pool.backend_in_flight.items() if v}, per_policy


def recording(pool: PoolRuntime) -> Recording:
    (policy,) = pool.clients
    assert isinstance(policy, RecordingRoundRobin)
    return policy.record


# --- the handle ----------------------------------------------------------------------------------


def test_an_attempt_counts_once_while_in_flight_and_finishes_once() -> None:
    pool, clock = unit_pool()
    policy = pool.clients[0]
    handle = pool.attempt(A, policy, 100.0)
    assert counts(pool) == (0, {}, {}), "nothing counted before the attempt starts"
    with handle:
        assert counts(pool) == (1, {A: 1}, {A: 1}), "one count in the pool, one in the policy"
        handle.finish(Outcome.SUCCESS, 0.25, 100.5)
        assert counts(pool) == (0, {}, {})
        handle.finish(Outcome.FAILURE, 9.0, 101.0)  # a second finish: nothing
        assert counts(pool) == (0, {}, {})
    assert counts(pool) == (0, {}, {}), "leaving after a finish finishes nothing more"
    assert recording(pool).calls == [("start", A, 100.0), ("finish", A, 100.5, 0.25, Outcome.SUCCESS)]
    assert handle.finished


def test_leaving_without_a_finish_records_a_cancellation_with_the_time_so_far() -> None:
    pool, clock = unit_pool()
    with pool.attempt(B, pool.clients[0], 100.0):
        clock.now = 101.5
    assert counts(pool) == (0, {}, {})
    assert recording(pool).finishes() == [(B, Outcome.CANCELLED)]
    assert recording(pool).calls[-1] == ("finish", B, 101.5, 1.5, Outcome.CANCELLED)


def test_an_exception_inside_the_attempt_still_finishes_it_once() -> None:
    pool, clock = unit_pool()
    with pytest.raises(asyncio.CancelledError):
        with pool.attempt(A, pool.clients[0], 100.0):
            clock.now = 100.25
            raise asyncio.CancelledError()
    assert counts(pool) == (0, {}, {})
    assert recording(pool).calls[-1] == ("finish", A, 100.25, 0.25, Outcome.CANCELLED)


def test_a_report_passes_through_the_handle_to_the_policy() -> None:
    pool, clock = unit_pool()
    with pool.attempt(A, pool.clients[0], 100.0) as handle:
        assert handle.reads_reports is pool.clients[0].reads_reports
        handle.report(7, 0.012, 100.1)
        handle.finish(Outcome.SUCCESS, 0.1, 100.1)
    assert recording(pool).calls[1] == ("report", A, 100.1, 7, 0.012)


def test_a_finish_before_the_attempt_started_is_refused() -> None:
    pool, _ = unit_pool()
    handle = pool.attempt(A, pool.clients[0], 100.0)
    with pytest.raises(RuntimeError):
        handle.finish(Outcome.SUCCESS, 0.0, 100.0)
    assert counts(pool) == (0, {}, {}) and recording(pool).calls == []


def test_the_per_backend_limit_holds_while_in_flight_and_lifts_after() -> None:
    pool, clock = unit_pool(max_in_flight_per_backend=1)
    with pool.attempt(A, pool.clients[0], 100.0) as handle:
        assert pool.at_limit == {A}
        chosen = {s.backend for s in (pool.select(100.0) for _ in range(6)) if s is not None}
        assert chosen == {B}, "a backend at its limit is not chosen"
        handle.finish(Outcome.SUCCESS, 0.1, 100.1)
        assert pool.at_limit == set()


# --- select and the probe sink -------------------------------------------------------------------


def test_select_hands_the_probes_to_the_pools_sink() -> None:
    idle, clock = unit_pool("prequal")
    assert idle.probe_sink is drop_probes, "a no-op until a scheduler installs its own"
    first = idle.select(clock.now)
    assert first is not None and first.probes, "nothing to send them to: dropped, no error"
    pool, clock = unit_pool("prequal")
    sent: list[tuple[PoolRuntime, Any, tuple[str, ...]]] = []
    pool.probe_sink = lambda p, policy, targets: sent.append((p, policy, tuple(targets)))
    selections = [pool.select(clock.now) for _ in range(4)]
    with_probes = [s for s in selections if s is not None and s.probes]
    assert with_probes, "Prequal asks for probes on its selections"
    assert [t for _, _, t in sent] == [s.probes for s in with_probes]
    assert all(p is pool and policy is pool.clients[0] for p, policy, _ in sent)


def test_select_never_returns_an_excluded_backend() -> None:
    pool, clock = unit_pool()
    for _ in range(6):
        selection = pool.select(clock.now, {A})
        assert selection is not None and selection.backend == B
    assert pool.select(clock.now, {A, B}) is None


def test_the_scheduler_installs_its_sink_while_the_gateway_runs() -> None:
    async def main() -> tuple[bool, bool, bool]:
        gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[A], health=OFF)])
        pool = gateway.pools["/api"]
        before = pool.probe_sink is drop_probes
        async with gateway:
            scheduler = gateway._scheduler
            assert scheduler is not None
            during = pool.probe_sink == scheduler.send_probes
        return before, during, pool.probe_sink is drop_probes

    assert asyncio.run(main()) == (True, True, True)


# --- through a real gateway ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[ServerThread, ServerThread]]:
    with two_backends() as pair:
        yield pair


def gateway_for(upstreams: list[str], **config: Any) -> Gateway:
    return Gateway(pools=[UpstreamPool("/api", upstreams=upstreams, policy=RecordingRoundRobin, health=OFF, **config)])


def settled(gateway: Gateway) -> None:
    pool = gateway.pools["/api"]
    wait_for(lambda: counts(pool) == (0, {}, {}), what="every in-flight count back to 0")
    assert pool.in_flight == 0 and set(pool.backend_in_flight.values()) <= {0}


def test_counts_return_to_zero_after_successes(backends: tuple[ServerThread, ServerThread]) -> None:
    a, b = backends
    gateway = gateway_for([a.url, b.url])
    pool = gateway.pools["/api"]
    with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
        for i in range(4):
            assert client.get(f"/api/echo/{i}").status_code == 200
        settled(gateway)
        # While one request is held upstream, it is counted once in the pool and once in the policy.
        with client.stream("GET", "/api/stream", params={"pause": "0.5"}) as response:
            chunks = response.iter_raw()
            assert next(chunks) == b"first chunk\n"
            in_pool, per_backend, per_policy = counts(pool)
            assert in_pool == 1 and sum(per_backend.values()) == 1 and sum(per_policy.values()) == 1
            assert per_backend == per_policy
            assert b"".join(chunks) == b"second chunk\n"
        settled(gateway)
    assert [o for _, o in recording(pool).finishes()] == [Outcome.SUCCESS] * 5


def test_counts_return_to_zero_after_upstream_errors(backends: tuple[ServerThread, ServerThread]) -> None:
    a, _ = backends
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = gateway_for([dead], retry=RetrySettings(attempts=1))
    pool = gateway.pools["/api"]
    with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
        assert client.get("/api/echo/x").status_code == 502
        settled(gateway)
    assert recording(pool).finishes() == [(dead, Outcome.CONNECT_ERROR)]
    gateway = gateway_for([a.url])
    pool = gateway.pools["/api"]
    with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
        assert client.get("/api/status/503").status_code == 503
        settled(gateway)
    assert recording(pool).finishes() == [(a.url, Outcome.FAILURE)]


def test_counts_return_to_zero_after_a_retry_on_a_second_backend(backends: tuple[ServerThread, ServerThread]) -> None:
    a, _ = backends
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = gateway_for([dead, a.url])
    pool = gateway.pools["/api"]
    with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
        for i in range(4):
            response = client.get(f"/api/echo/{i}")
            assert response.status_code == 200 and response.json()["backend"] == "a"
        settled(gateway)
    finishes = recording(pool).finishes()
    assert (dead, Outcome.CONNECT_ERROR) in finishes, "round robin tried the dead backend, then retried"
    retried = finishes.index((dead, Outcome.CONNECT_ERROR))
    assert finishes[retried + 1] == (a.url, Outcome.SUCCESS)
    assert finishes.count((a.url, Outcome.SUCCESS)) == 4


def test_counts_return_to_zero_after_the_client_disconnects_mid_response(
    backends: tuple[ServerThread, ServerThread],
) -> None:
    a, _ = backends
    gateway = gateway_for([a.url])
    pool = gateway.pools["/api"]
    with serve(gateway_app(gateway), proxy_headers=False) as g:
        with httpx.Client(base_url=g.url, timeout=5) as client:
            with client.stream("GET", "/api/stream", params={"pause": "3"}) as response:
                assert next(response.iter_raw()) == b"first chunk\n"
                assert counts(pool)[0] == 1
            # Leaving the block closes the connection with the body half read: the client went away.
        started = time.monotonic()
        settled(gateway)
        assert time.monotonic() - started < 2.5, "released when the client left, not when the backend finished"
    # Finished once: the backend had answered 200, so the forwarder's outcome stays a success (a client
    # that leaves says nothing against the backend).
    assert recording(pool).finishes() == [(a.url, Outcome.SUCCESS)]


def test_counts_return_to_zero_after_a_websocket_closes(backends: tuple[ServerThread, ServerThread]) -> None:
    a, _ = backends
    gateway = gateway_for([a.url])
    pool = gateway.pools["/api"]
    with serve(gateway_app(gateway), proxy_headers=False) as g:
        with ws_connect(g.url.replace("http", "ws") + "/api/ws") as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "a:hello"
            # The handshake was the attempt: the open socket holds no in-flight count.
            assert counts(pool) == (0, {}, {})
        settled(gateway)
        dead = f"http://127.0.0.1:{free_port()}"
        gateway.pools["/api"].set_members([Member(dead)], gateway.clock())
        with pytest.raises(InvalidStatus):
            with ws_connect(g.url.replace("http", "ws") + "/api/ws", open_timeout=5):
                pass
        settled(gateway)
    assert recording(pool).finishes() == [(a.url, Outcome.SUCCESS), (dead, Outcome.CONNECT_ERROR)]


# --- structure -----------------------------------------------------------------------------------

REQUEST_PATH = ("gateway/forwarding.py", "gateway/websocket.py", "gateway/middleware.py")


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", REQUEST_PATH)
def test_no_request_path_module_imports_the_scheduler(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text(), module)
    imported = _imports(tree)
    assert not [name for name in imported if "scheduler" in name.split(".")], imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not {"ProbeScheduler", "send_probes"} & (names | attributes)


# Only the handle starts and finishes an attempt: these calls appear nowhere else in the gateway.
ATTEMPT_CALLS = {"on_start", "on_finish", "on_report", "_attempt_started", "_attempt_ended"}
COUNTERS = ("_attempt_started", "_attempt_ended")


def _calls_outside_the_handle() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("core/"):
            continue  # the sans-IO policies and the simulator, which drives them without a gateway
        tree = ast.parse(path.read_text(), relative)
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if relative == "gateway/pool.py" and isinstance(node, ast.ClassDef) and node.name == "Attempt":
                allowed.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ATTEMPT_CALLS
                and id(node) not in allowed
            ):
                found.append(f"{relative}:{node.lineno} {node.func.attr}")
    return found


def test_only_the_attempt_handle_starts_and_finishes_attempts() -> None:
    assert _calls_outside_the_handle() == []


def test_only_the_pools_own_methods_change_its_in_flight_counts() -> None:
    changed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("core/"):
            continue
        tree = ast.parse(path.read_text(), relative)
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if (
                relative == "gateway/pool.py"
                and isinstance(node, ast.FunctionDef)
                and node.name in ("_attempt_started", "_attempt_ended")
            ):
                allowed.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.AugAssign):
                targets = [node.target]
            elif isinstance(node, ast.Assign):
                targets = list(node.targets)
            for target in targets:
                if id(node) in allowed:
                    continue
                if isinstance(target, ast.Attribute) and target.attr == "in_flight":
                    if not _in_init(tree, node):  # setting a counter up is not changing it
                        changed.append(f"{relative}:{node.lineno}")
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Attribute)
                    and target.value.attr == "backend_in_flight"
                ):
                    changed.append(f"{relative}:{node.lineno}")
    assert changed == []


def _in_init(tree: ast.AST, target: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            if any(n is target for n in ast.walk(node)):
                return True
    return False


def test_the_pool_has_no_public_way_to_count_an_attempt_by_hand() -> None:
    assert not hasattr(PoolRuntime, "acquire") and not hasattr(PoolRuntime, "release")
    assert hasattr(Attempt, "__enter__") and hasattr(Attempt, "__exit__")

"""``ProbeScheduler``: the only owner of the gateway's background tasks.

- Probes: the policies ask for them (per query, and after ``max_idle_s`` without queries); each is
  sent at once with a short timeout and reported by callback (``ProbeClient.send``: no task per probe),
  never awaited by a request. At most ``ProbeSettings.max_in_flight`` per pool are in flight; beyond
  that a probe is skipped, not queued: a queued probe would be stale on arrival. A probe answer is
  reported with the time of its receipt; a failed probe is reported to the policy that asked.
- Local mode: a backend that answers 404, 405 or a 200 without load headers (``ProbeUnsupported``)
  switches to the gateway's local view (``probe_mode = "local"`` on every client of the pool). The
  policies never probe it then, so the scheduler re-probes it itself, with exponential backoff, and
  switches it back to ``"probe"`` when it answers a load report (it gained ``LoadReportingMiddleware``).
  Registering it again, or leaving and joining, restarts the backoff.
- Members that leave a pool have their idle probe connections closed (``ProbeClient.forget``).
- Idle probing: a timer asks every policy for its idle probes.
- Registry sync: the registry's changes (and lease expiry) are applied to the pools.
- Active health checks: ``GET health.path`` on every member each ``interval_s``; ``fall`` failures in a
  row mark a member unhealthy, ``rise`` successes healthy again. A 2xx or 3xx is a success, and so is a
  404 (the backend has no health endpoint but answers HTTP); a 5xx, an error or a timeout is a failure.

Pools come and go while it runs (``Gateway.reconfigure``): ``add_pool`` starts a pool's probe client,
health loop and probes; ``retire`` takes a replaced pool out of the gauges while its requests drain;
``remove_pool`` stops what belongs to it (its tasks, timers and probe connections) and nothing else.

On ``aclose()`` every task is cancelled and awaited and the probe connections are closed. The probe
clients it owns run one short task per connection they open (to connect); ``aclose()`` cancels those too.

No loop dies of one bad iteration: every loop, timer and probe callback here catches what an iteration
raises (a policy or metrics bug, a poisoned value, a registry or transport error), skips that pool or
iteration, and goes on; ``LoopErrorLog`` counts it (``prequal_loop_errors_total{loop}``) and logs each
distinct error once a minute. A loop that raised waits its usual interval (at least ``LOOP_ERROR_PAUSE_S``)
before the next try, so a persistent error never turns it into a busy loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Iterable, Sequence
from functools import partial
from typing import Any

from prequal_middleware.config import Timeouts
from prequal_middleware.core import Policy
from prequal_middleware.exceptions import ProbeError, ProbeUnsupported, UpstreamError
from prequal_middleware.gateway.discovery import Discovery
from prequal_middleware.gateway.events import GatewayEvents
from prequal_middleware.gateway.history import PoolHistories
from prequal_middleware.gateway.membership import Membership
from prequal_middleware.gateway.metrics import LoopErrorLog, PrequalMetrics
from prequal_middleware.gateway.pool import PoolRuntime, drop_probes, no_sync_probes
from prequal_middleware.transports.base import Transport, UpstreamRequest
from prequal_middleware.transports.probe import ProbeClient, ProbeResult

logger = logging.getLogger("prequal_middleware.gateway.scheduler")

# How often the idle timer asks policies for idle probes, as a share of the smallest max_idle_s.
IDLE_TICK_SHARE = 0.5
# A newly registered member is checked at once, then again after this long, doubling up to the
# pool's interval while it fails: a backend that registers during its own startup is not listening yet.
PROVE_FIRST_RETRY_S = 0.05
# How often pool state is copied into gauges.
GAUGE_INTERVAL_S = 1.0
# The longest a gateway goes without re-reading the registry.
REGISTRY_REFRESH_S = 1.0
# Re-probing a backend in local mode (it answered no load report): first after LOCAL_REPROBE_INITIAL_S,
# the wait doubling after each answer without a load report, up to LOCAL_REPROBE_MAX_S. A backend
# usually gains LoadReportingMiddleware by a redeploy, so a prompt first look catches a quick restart,
# and one probe per 30 s at worst costs a backend nothing while keeping a redeployed one off Prequal's
# signal for 30 s at most.
LOCAL_REPROBE_INITIAL_S = 1.0
LOCAL_REPROBE_MAX_S = 30.0
# How often a pool replaced by a reload is looked at while its requests drain: a retired pool's
# tasks may run this much longer than needed, and nothing on the request path is touched for it.
DRAIN_POLL_S = 0.1
# The least a loop waits after an iteration that raised (the registry loop is woken by events, not a timer).
LOOP_ERROR_PAUSE_S = 1.0


class _LocalMode:
    """The re-probe state of one backend in local mode."""

    __slots__ = ("delay", "timer", "probing")

    def __init__(self, delay: float) -> None:
        self.delay = delay  # the wait before the next re-probe
        self.timer: asyncio.TimerHandle | None = None
        self.probing = False


class ProbeScheduler:
    """Sends probes and health checks for a gateway's pools.

    Parameters:
        pools: the pools to serve.
        transport: used for health checks.
        metrics: where probes, health checks and pool state are recorded.
        clock: monotonic seconds.
        local_reprobe_initial_s / local_reprobe_max_s: the backoff of re-probes to backends in local
            mode (see ``LOCAL_REPROBE_INITIAL_S``).
        history: the pools' traffic histories, sampled by the gauge loop (the status page's charts).
        events: told of health changes, and of each pool's state every ``GAUGE_INTERVAL_S`` (returns
            from ejection, panic).
    """

    def __init__(
        self,
        pools: Sequence[PoolRuntime],
        transport: Transport,
        metrics: PrequalMetrics,
        clock: Callable[[], float],
        *,
        local_reprobe_initial_s: float = LOCAL_REPROBE_INITIAL_S,
        local_reprobe_max_s: float = LOCAL_REPROBE_MAX_S,
        history: PoolHistories | None = None,
        events: GatewayEvents | None = None,
    ) -> None:
        self._events = events
        if not 0 < local_reprobe_initial_s <= local_reprobe_max_s < math.inf:
            raise ValueError(
                "need 0 < local_reprobe_initial_s <= local_reprobe_max_s < inf, got "
                f"{local_reprobe_initial_s!r} and {local_reprobe_max_s!r}"
            )
        self._reprobe_initial_s = local_reprobe_initial_s
        self._history = history
        self._reprobe_max_s = local_reprobe_max_s
        self._local: dict[tuple[int, str], _LocalMode] = {}  # (id(pool), backend) in local mode
        self._pools = list(pools)
        self._transport = transport
        self._metrics = metrics
        self._clock = clock
        self._ejections_seen: dict[int, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool_tasks: dict[int, set[asyncio.Task[Any]]] = {}  # id(pool) -> its health loop and checks
        self._discovery_tasks: dict[tuple[str, str], asyncio.Task[Any]] = {}  # (pool name, upstream) -> loop
        self._retiring: set[int] = set()  # id(pool) of replaced pools draining their requests
        self._probe_clients: dict[int, ProbeClient] = {}
        # Keyed by the pool object's id, not its name: a reload may run a replaced pool and its
        # successor side by side under one name, and each must earn its own verdicts.
        self._health_streaks: dict[tuple[int, str], int] = {}  # (pool, backend) -> +ok / -failed in a row
        self._confirmed: set[tuple[int, str]] = set()  # (pool, backend) seen passing a health check
        self._running = False
        self.errors = LoopErrorLog(metrics, clock, logger)
        self.probes_sent = 0
        self.probe_failures = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, membership: Membership | None = None, discovery: Discovery | None = None) -> None:
        """Start probing, health checks, gauges, (with ``membership``) registry sync and (with
        ``discovery``) the DNS lookups of upstreams named by DNS."""
        self._running = True
        for pool in self._pools:
            self._attach(pool)
        self._spawn(self._idle_loop())
        for pool in self._pools:
            if pool.config.health.path is not None:
                self._spawn(self._health_loop(pool), pool)
        self._spawn(self._gauge_loop())
        if membership is not None:
            self._spawn(self._registry_loop(membership))
        if discovery is not None:
            for pool_name, upstream in discovery.names():
                self.start_discovery(discovery, pool_name, upstream)

    def _attach(self, pool: PoolRuntime) -> None:
        probes = pool.config.probes
        # As many idle connections per backend as probes may be in flight: fewer, and under load
        # most probes would open a connection, ask once and close it (measured: 3x the CPU).
        self._probe_clients[id(pool)] = ProbeClient(
            path=probes.path,
            timeout_s=probes.timeout_s,
            max_idle_per_backend=probes.max_in_flight,
            ssl=pool.ssl_context,  # the pool's one context: probes trust what its requests trust
        )
        pool.add_listener(self._members_changed)
        pool.probe_sink = self.send_probes  # the probes the pool's selections ask for
        pool.sync_prober = self.probe_and_wait  # sync mode's probes, awaited by the request
        try:
            self._adopt_local_mode(pool)
        except Exception as exc:  # a policy's bug must not stop the gateway from starting
            self.errors.failed("start", exc)

    # --- pools joining and leaving while running (``Gateway.reconfigure``) ----------------------

    @property
    def pools(self) -> list[PoolRuntime]:
        """The pools served now, those draining after a reload included."""
        return list(self._pools)

    def add_pool(self, pool: PoolRuntime, replaces: PoolRuntime | None = None) -> None:
        """Start serving ``pool``. When it ``replaces`` a pool with the same health settings, the health
        verdicts on the members they share carry over: a backend does not get sicker or healthier by a
        reload, and a registered member would otherwise get no traffic until its next check passes."""
        if not self._running:
            raise RuntimeError("add_pool on a scheduler that is not running")
        self._pools.append(pool)
        if replaces is not None and replaces.config.health == pool.config.health:
            self._carry_health(replaces, pool)
        self._attach(pool)
        if pool.config.health.path is not None:
            self._spawn(self._health_loop(pool), pool)

    def _carry_health(self, old: PoolRuntime, new: PoolRuntime) -> None:
        now = self._clock()
        unhealthy = {b.id for b in old.clients[0].snapshot(now).backends if b.state == "unhealthy"}
        for backend in old.members.keys() & new.members.keys():
            key = (id(old), backend)
            if key in self._health_streaks:
                self._health_streaks[(id(new), backend)] = self._health_streaks[key]
            if key in self._confirmed:
                self._confirmed.add((id(new), backend))
                for policy in new.clients:
                    policy.set_health(backend, backend not in unhealthy, now)

    def retire(
        self, pool: PoolRuntime, timeout_s: float, busy: Callable[[PoolRuntime], int], *, forget: bool = False
    ) -> None:
        """``pool`` was replaced or removed: it leaves the gauges to its successor at once, and is removed
        (``remove_pool``) once ``busy(pool)`` (its requests in flight) is 0, or ``timeout_s`` passed.
        ``forget``: drop its members' metric series too (its name is gone)."""
        self._retiring.add(id(pool))
        self._spawn(self._drain_then_remove(pool, timeout_s, busy, forget))

    async def _drain_then_remove(
        self, pool: PoolRuntime, timeout_s: float, busy: Callable[[PoolRuntime], int], forget: bool
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while busy(pool) > 0:
                    await asyncio.sleep(DRAIN_POLL_S)
        except TimeoutError:
            logger.warning(
                "pool %s (replaced or removed by a reload): %d requests still in flight after %g s; "
                "stopping its probes and health checks, they finish on their connections",
                pool.name,
                busy(pool),
                timeout_s,
            )
        await self.remove_pool(pool)
        if forget:
            for backend in pool.members:
                self._metrics.forget_backend(pool.name, backend)

    def _detach(self, pool: PoolRuntime) -> None:
        """Undo what adopting ``pool`` hooked in: its member listener, probe sink and sync prober."""
        pool.remove_listener(self._members_changed)
        if pool.probe_sink == self.send_probes:
            pool.probe_sink = drop_probes
        if pool.sync_prober == self.probe_and_wait:
            pool.sync_prober = no_sync_probes

    async def remove_pool(self, pool: PoolRuntime) -> None:
        """Stop everything that belongs to ``pool``: its health loop and checks, re-probe timers and
        probe connections. Its requests still in flight keep their upstream connections (the transport's)."""
        if pool in self._pools:
            self._pools.remove(pool)
        self._retiring.discard(id(pool))
        self._detach(pool)
        for key in [k for k in self._local if k[0] == id(pool)]:
            timer = self._local.pop(key).timer
            if timer is not None:
                timer.cancel()
        for key in [k for k in self._health_streaks if k[0] == id(pool)]:
            del self._health_streaks[key]
        self._confirmed = {k for k in self._confirmed if k[0] != id(pool)}
        self._ejections_seen.pop(id(pool), None)
        await _cancel(self._pool_tasks.pop(id(pool), set()))
        client = self._probe_clients.pop(id(pool), None)
        if client is not None:
            await client.aclose()

    def start_discovery(self, discovery: Discovery, pool_name: str, upstream: str) -> None:
        """Keep one upstream named by DNS in step (a no-op when its loop already runs)."""
        key = (pool_name, upstream)
        if key not in self._discovery_tasks:
            task = self._spawn(discovery.loop(pool_name, upstream))
            self._discovery_tasks[key] = task
            task.add_done_callback(partial(self._discovery_ended, key))

    def _discovery_ended(self, key: tuple[str, str], task: asyncio.Task[Any]) -> None:
        if self._discovery_tasks.get(key) is task:
            del self._discovery_tasks[key]

    async def stop_discovery(self, keep: Iterable[tuple[str, str]]) -> None:
        """Stop the DNS loops of every (pool name, upstream) not in ``keep``."""
        wanted = set(keep)
        stopping = {self._discovery_tasks.pop(k) for k in list(self._discovery_tasks) if k not in wanted}
        await _cancel(stopping)

    async def aclose(self) -> None:
        self._running = False
        for pool in self._pools:
            self._detach(pool)
        for state in self._local.values():
            if state.timer is not None:
                state.timer.cancel()
        self._local.clear()
        await _cancel(set(self._tasks))
        self._tasks.clear()
        self._pool_tasks.clear()
        self._discovery_tasks.clear()
        self._retiring.clear()
        clients = list(self._probe_clients.values())
        self._probe_clients.clear()
        for client in clients:
            await client.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], pool: PoolRuntime | None = None) -> asyncio.Task[None]:
        """Run ``coro`` as a task of this scheduler (and of ``pool``: ``remove_pool`` stops it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a strong reference, or the task may be garbage-collected mid-flight
        task.add_done_callback(self._tasks.discard)
        if pool is not None:
            own = self._pool_tasks.setdefault(id(pool), set())
            own.add(task)
            task.add_done_callback(own.discard)
        return task

    # --- probes --------------------------------------------------------------------------------

    def send_probes(self, pool: PoolRuntime, policy: Policy, targets: Iterable[str]) -> None:
        """Probe ``targets`` for ``policy`` without waiting; skips beyond the pool's in-flight cap."""
        if not self._running:
            return
        cap = pool.config.probes.max_in_flight
        client = self._probe_clients[id(pool)]
        for backend in targets:
            if self._take_probe_slot(pool, cap):
                # No task per probe: the client calls back from its connection's callbacks.
                client.send(backend, partial(self._probe_done, pool, policy, backend, self._clock()))

    def _take_probe_slot(self, pool: PoolRuntime, cap: int) -> bool:
        """Count one probe in flight for ``pool``, or, at its cap, count it skipped (a queued probe would
        be stale by the time it went out)."""
        if pool.probes_in_flight >= cap:
            pool.probes_skipped += 1
            self._metrics.count(self._metrics.probes, pool.name, "skipped")
            return False
        pool.probes_in_flight += 1
        self.probes_sent += 1
        return True

    async def probe_and_wait(
        self, pool: PoolRuntime, policy: Policy, targets: Sequence[str], wait_for: int, wait_s: float
    ) -> list[str]:
        """Sync mode: probe ``targets`` for ``policy`` now; return those that answered, once ``wait_for``
        did, every probe ended, or ``wait_s`` passed.

        The probes are ordinary ones (the in-flight cap, metrics, ``on_probe``: the pool and the RIF
        history). No task: the waiter is a future the probes' callbacks resolve. Probes still out when
        the wait ends are left to finish (within the probe timeout) and feed the pool: aborting one
        would close its keep-alive connection, and the next probe to that backend would pay a connect.
        """
        answered: list[str] = []
        client = self._probe_clients.get(id(pool))
        if not self._running or client is None or wait_for <= 0:
            return answered
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outstanding = 0
        sending = True

        def done(backend: str, started: float, result: ProbeResult | None, error: ProbeError | None) -> None:
            nonlocal outstanding
            outstanding -= 1
            self._probe_done(pool, policy, backend, started, result, error)
            if waiter.done():
                return  # late: it fed the pool like any probe answer
            if result is not None:
                answered.append(backend)
            if len(answered) >= wait_for or (outstanding == 0 and not sending):
                waiter.set_result(None)

        cap = pool.config.probes.max_in_flight
        for backend in targets:
            if self._take_probe_slot(pool, cap):
                outstanding += 1
                client.send(backend, partial(done, backend, self._clock()))
        sending = False
        if outstanding > 0 and not waiter.done():
            try:
                async with asyncio.timeout(wait_s):
                    await waiter
            except TimeoutError:
                pass
        return list(answered)  # a copy: a late answer must not change the choice

    def _probe_done(
        self,
        pool: PoolRuntime,
        policy: Policy,
        backend: str,
        started: float,
        result: ProbeResult | None,
        error: ProbeError | None,
    ) -> None:
        pool.probes_in_flight -= 1
        if not self._running:
            return  # closing: the client fails what is in flight
        try:
            self._probe_outcome(pool, policy, backend, started, result, error)
        except Exception as exc:  # the probe client would log each one: a flood under a persistent bug
            self.errors.failed("probe_result", exc)

    def _probe_outcome(
        self,
        pool: PoolRuntime,
        policy: Policy,
        backend: str,
        started: float,
        result: ProbeResult | None,
        error: ProbeError | None,
    ) -> None:
        metrics = self._metrics
        now = self._clock()
        if result is not None:
            metrics.count(metrics.probes, pool.name, "ok")
            metrics.observe(metrics.probe_duration, now - started, pool.name)
            policy.on_probe(backend, now, result.rif, result.latency_s)
        elif isinstance(error, ProbeUnsupported):
            metrics.count(metrics.probes, pool.name, "unsupported")
            if (id(pool), backend) not in self._local and backend in pool.members:
                for c in pool.clients:
                    c.set_probe_mode(backend, "local", now)
                self._enter_local_mode(pool, backend)
                logger.info("backend %s of pool %s answers no probes: using the gateway's own view", backend, pool.name)
        else:
            self.probe_failures += 1
            metrics.count(metrics.probes, pool.name, "failed")
            policy.on_probe_failure(backend, now)

    # --- local mode: re-probing backends that answered no load report -----------------------------

    def local_mode_backoff(self, pool: PoolRuntime, backend: str) -> float | None:
        """The wait before ``backend``'s next re-probe while it is in local mode; None otherwise."""
        state = self._local.get((id(pool), backend))
        return None if state is None else state.delay

    def _enter_local_mode(self, pool: PoolRuntime, backend: str) -> None:
        state = self._local[(id(pool), backend)] = _LocalMode(self._reprobe_initial_s)
        self._schedule_reprobe(pool, backend, state, state.delay)

    def _adopt_local_mode(self, pool: PoolRuntime) -> None:
        """Backends a previous run left in local mode are re-probed by this one."""
        now = self._clock()
        local = {b.id for c in pool.clients for b in c.snapshot(now).backends if b.probe_mode == "local"}
        for backend in local:
            if backend in pool.members and (id(pool), backend) not in self._local:
                self._enter_local_mode(pool, backend)

    def _schedule_reprobe(self, pool: PoolRuntime, backend: str, state: _LocalMode, delay: float) -> None:
        if state.timer is not None:
            state.timer.cancel()
        state.timer = asyncio.get_running_loop().call_later(delay, self._reprobe, pool, backend)

    def _reprobe(self, pool: PoolRuntime, backend: str) -> None:
        state = self._local.get((id(pool), backend))
        if state is None or not self._running:
            return
        state.timer = None
        try:
            self._send_reprobe(pool, backend, state)
        except Exception as exc:  # a timer that raises is never rearmed: the backend would stay local
            self.errors.failed("reprobe", exc)
            if state.probing:
                state.probing = False
                pool.probes_in_flight -= 1
            if state.timer is None and self._local.get((id(pool), backend)) is state:
                self._schedule_reprobe(pool, backend, state, max(state.delay, LOOP_ERROR_PAUSE_S))

    def _send_reprobe(self, pool: PoolRuntime, backend: str, state: _LocalMode) -> None:
        if pool.probes_in_flight >= pool.config.probes.max_in_flight:
            self._schedule_reprobe(pool, backend, state, state.delay)  # busy: try again later, same wait
            return
        client = self._probe_clients[id(pool)]
        state.probing = True
        pool.probes_in_flight += 1
        self.probes_sent += 1
        client.send(backend, partial(self._reprobe_done, pool, backend))

    def _reprobe_done(
        self, pool: PoolRuntime, backend: str, result: ProbeResult | None, error: ProbeError | None
    ) -> None:
        pool.probes_in_flight -= 1
        if not self._running:
            return
        try:
            self._reprobe_outcome(pool, backend, result, error)
        except Exception as exc:
            self.errors.failed("reprobe", exc)
            state = self._local.get((id(pool), backend))
            if state is not None and state.timer is None:  # keep re-probing
                state.probing = False
                self._schedule_reprobe(pool, backend, state, max(state.delay, LOOP_ERROR_PAUSE_S))

    def _reprobe_outcome(
        self, pool: PoolRuntime, backend: str, result: ProbeResult | None, error: ProbeError | None
    ) -> None:
        key = (id(pool), backend)
        state = self._local.get(key)
        if state is None:
            return  # it left (or came back) meanwhile
        state.probing = False
        metrics = self._metrics
        if result is not None:
            del self._local[key]
            now = self._clock()
            for c in pool.clients:
                c.set_probe_mode(backend, "probe", now)
            metrics.count(metrics.probes, pool.name, "ok")
            logger.info("backend %s of pool %s answers probes again", backend, pool.name)
            return
        # Unsupported again, or a failure: a backend in local mode is balanced on the gateway's own
        # view, which a missed probe does not change; only wait longer.
        outcome = "unsupported" if isinstance(error, ProbeUnsupported) else "failed"
        metrics.count(metrics.probes, pool.name, outcome)
        state.delay = min(state.delay * 2, self._reprobe_max_s)
        if state.timer is None:
            self._schedule_reprobe(pool, backend, state, state.delay)

    def _members_changed(self, pool: PoolRuntime, joined: Sequence[str], left: Sequence[str]) -> None:
        client = self._probe_clients.get(id(pool))
        for backend in left:
            self._confirmed.discard((id(pool), backend))  # one that comes back proves itself again
            if client is not None:
                client.forget(backend)  # closes its idle probe connections; busy ones close after use
            state = self._local.pop((id(pool), backend), None)
            if state is not None and state.timer is not None:
                state.timer.cancel()
        if joined and pool.config.health.path is not None and self._running:
            # A registered member gets no traffic until a health check passes (``awaits_health_check``):
            # check each newcomer now, and again soon while it fails, rather than at the next round, up
            # to ``interval_s`` away (a backend that registers during its own startup is not listening yet).
            for backend in joined:
                self._spawn(self._prove(pool, backend), pool)
        for backend in joined:
            state = self._local.get((id(pool), backend))
            if state is not None:  # announced again while in local mode: look now, back off from the start
                state.delay = self._reprobe_initial_s
                if not state.probing:
                    self._schedule_reprobe(pool, backend, state, 0.0)

    async def _idle_loop(self) -> None:
        while True:
            # Read each round: a reload may add a pool that wants a faster tick.
            pools = list(self._pools)
            tick = IDLE_TICK_SHARE * min((p.config.prequal.max_idle_s for p in pools), default=2 * GAUGE_INTERVAL_S)
            await asyncio.sleep(tick)
            now = self._clock()
            for pool in pools:
                for policy in pool.clients:
                    try:
                        targets = policy.idle_probes(now)
                        if targets:
                            self.send_probes(pool, policy, targets)
                    except Exception as exc:  # one client's bug skips it this round, not every pool forever
                        self.errors.failed("idle_probes", exc)

    # --- health checks -------------------------------------------------------------------------

    async def _health_loop(self, pool: PoolRuntime) -> None:
        settings = pool.config.health
        timeouts = Timeouts(
            connect_s=settings.timeout_s, response_headers_s=settings.timeout_s, read_idle_s=settings.timeout_s
        )
        path = settings.path or "/"
        while True:
            try:
                await self._health_round(pool, path, timeouts)
            except Exception as exc:
                self.errors.failed("health", exc)
            await asyncio.sleep(max(settings.interval_s, 0.0))

    async def _health_round(self, pool: PoolRuntime, path: str, timeouts: Timeouts) -> None:
        for key in [k for k in self._health_streaks if k[0] == id(pool) and k[1] not in pool.members]:
            del self._health_streaks[key]  # forget members that left
            self._confirmed.discard(key)
        await self._check_members(pool, list(pool.members), path, timeouts)

    async def _prove(self, pool: PoolRuntime, backend: str) -> None:
        """Check a newcomer until it passes once, at growing intervals up to the pool's ``interval_s``.

        Failures here are counted but do not make a streak: a backend still starting is not failing.
        """
        settings = pool.config.health
        key = (id(pool), backend)
        t = settings.timeout_s
        timeouts = Timeouts(connect_s=t, response_headers_s=t, read_idle_s=t)
        delay = PROVE_FIRST_RETRY_S
        try:
            while self._running and backend in pool.members and key not in self._confirmed:
                ok = await self._check(pool, backend, settings.path or "/", timeouts)
                if backend not in pool.members:
                    return
                if ok:
                    self._record_health(pool, backend, True)
                    return
                self._metrics.child(self._metrics.health_checks, pool.name, "failed").inc()
                if delay > settings.interval_s:
                    return  # the regular rounds take over
                await asyncio.sleep(delay)
                delay *= 2
        except Exception as exc:
            self.errors.failed("health", exc)

    async def _check_members(self, pool: PoolRuntime, members: list[str], path: str, timeouts: Timeouts) -> None:
        if not members:
            return
        results = await asyncio.gather(*(self._check(pool, b, path, timeouts) for b in members))
        for backend, ok in zip(members, results, strict=True):
            if backend not in pool.members:
                continue  # left while it was being checked
            try:
                self._record_health(pool, backend, ok)
            except Exception as exc:  # the other members' verdicts still count
                self.errors.failed("health", exc)

    async def _check(self, pool: PoolRuntime, backend: str, path: str, timeouts: Timeouts) -> bool:
        request = UpstreamRequest("GET", backend, path, [], tls=pool.ssl_context)  # the pool's TLS, as its requests
        try:
            async with asyncio.timeout(timeouts.connect_s + timeouts.response_headers_s):
                response = await self._transport.send(request, timeouts)
                try:
                    async for _ in response.body:
                        pass
                finally:
                    await response.aclose()
        except (UpstreamError, TimeoutError):
            return False
        except Exception as exc:  # whatever a backend's answer made the transport raise: a failed check
            self.errors.failed("health", exc)
            return False
        # 404: the backend has no health endpoint but answers HTTP, which is all we can ask of it.
        return 200 <= response.status < 400 or response.status == 404

    def _record_health(self, pool: PoolRuntime, backend: str, ok: bool) -> None:
        self._metrics.child(self._metrics.health_checks, pool.name, "ok" if ok else "failed").inc()
        settings = pool.config.health
        key = (id(pool), backend)
        streak = self._health_streaks.get(key, 0)
        streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
        self._health_streaks[key] = streak
        now = self._clock()
        if ok and key not in self._confirmed:
            # The first pass of a member this scheduler has never seen healthy proves it (a member that
            # awaits its first check gets traffic from now on); later recoveries need ``rise`` passes.
            self._confirmed.add(key)
            for policy in pool.clients:
                policy.set_health(backend, True, now)
        elif streak == settings.rise or streak == -settings.fall:
            healthy = streak > 0
            for policy in pool.clients:
                policy.set_health(backend, healthy, now)
            if self._events is not None:
                self._events.health(pool.name, backend, healthy, settings.rise if healthy else settings.fall)
            elif not healthy:
                logger.warning("backend %s of pool %s failed %d health checks", backend, pool.name, settings.fall)

    # --- registry ------------------------------------------------------------------------------

    async def _registry_loop(self, membership: Membership) -> None:
        # Woken by changes (Redis pub/sub, local writes) and at least every REGISTRY_REFRESH_S, which
        # also expires leases and removes drained members. A local write of our own is already applied
        # (a delta): then refresh only syncs and finishes drains, it does not re-apply every member.
        while True:
            try:
                await membership.registry.wait_for_change(REGISTRY_REFRESH_S)
                await membership.refresh()
            except Exception as exc:  # a registry must not raise, but one bug must not stop syncs and expiry
                self.errors.failed("registry", exc)
                await asyncio.sleep(LOOP_ERROR_PAUSE_S)  # wait_for_change may fail at once: no busy loop

    # --- pool state as gauges --------------------------------------------------------------------

    async def _gauge_loop(self) -> None:
        interval = GAUGE_INTERVAL_S
        if self._history is not None:  # a history finer than a second (tests) is sampled as often
            interval = min(interval, self._history.settings.step_s)
        while True:
            self._metrics.flush()  # the request path's counts reach the registry at least once a second
            self.update_gauges()
            self.sample_history()
            await asyncio.sleep(interval)  # neither raises

    def sample_history(self) -> None:
        """A point for each pool's traffic history when one is due (read from the metrics' counters)."""
        if self._history is None:
            return
        try:
            self._metrics.flush()  # the counts it reads
            self._history.sample(self._clock(), [pool.name for pool in self._pools])
        except Exception as exc:  # the charts wait for the next round; the gauges go on
            self.errors.failed("history", exc)

    def update_gauges(self) -> None:
        """Members by state, probe-pool occupancy and ejections, from every pool's policies."""
        now = self._clock()
        for pool in list(self._pools):
            if id(pool) in self._retiring:
                continue  # its successor, under the same name, owns the gauges
            try:
                self._pool_gauges(pool, now)
            except Exception as exc:  # this pool's gauges wait for the next round; the others update now
                self.errors.failed("gauges", exc)

    def _pool_gauges(self, pool: PoolRuntime, now: float) -> None:
        metrics = self._metrics
        counts = dict.fromkeys(("healthy", "unhealthy", "ejected", "draining"), 0)
        pooled = 0
        ejections = 0
        for i, policy in enumerate(pool.clients):
            snapshot = policy.snapshot(now)
            pooled += snapshot.pool_size or 0
            if i == 0:  # every client has the same members; health is per client, the first speaks
                for backend in snapshot.backends:
                    counts[backend.state] += 1
                if self._events is not None:
                    self._events.sample(pool.name, snapshot, now)
            outliers = getattr(policy, "outliers", None)
            ejections += getattr(outliers, "ejections_total", 0)
        for state, count in counts.items():
            metrics.child(metrics.backends, pool.name, state).set(count)
        metrics.child(metrics.probe_pool_size, pool.name).set(pooled)
        # Sampled here rather than counted per request: two gauge updates fewer on the request path.
        metrics.child(metrics.in_flight, pool.name).set(pool.in_flight)
        client = self._probe_clients.get(id(pool))
        if client is not None:  # what churn could leak: state and connections for departed members
            metrics.child(metrics.probe_backends, pool.name).set(client.backends_known)
            metrics.child(metrics.probe_connections, pool.name).set(client.open_connections)
        new = ejections - self._ejections_seen.get(id(pool), 0)
        if new > 0:
            metrics.child(metrics.ejections, pool.name).inc(new)
        self._ejections_seen[id(pool)] = ejections


async def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them to end (whatever they raise on the way out)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

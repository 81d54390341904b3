"""``PoolRuntime``: one configured pool's live state inside a running gateway.

A pool is a set of backends with its policy and its signal; the routes that name it (``routes``)
all share this one object, so their traffic feeds one Prequal state and one set of counts.

It holds the pool's policy instances (``clients_per_pool`` independent Prequal clients taking
requests in turn), its members, in-flight counts against the concurrency limits, and its retry
budget. No I/O here: the forwarder and the scheduler drive it.

It is the one owner of what a request does to that state. ``select`` asks a policy for a backend and
hands the probes the policy wants to the pool's ``probe_sink`` (the scheduler installs it while it
runs), so the request path never calls the scheduler. ``attempt`` returns an ``Attempt``: the one
handle through which an upstream attempt is counted in flight, reported on and finished, exactly once.
In sync mode (``PrequalSettings.mode = "sync"``) the request awaits ``select_sync`` instead: the policy
plans the probes, the pool's ``sync_prober`` (the scheduler's) sends them and waits for the answers.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from types import TracebackType

from prequal_middleware.config import UpstreamPool
from prequal_middleware.core import Member, Outcome, Policy, PrequalPolicy, Selection, create_policy
from prequal_middleware.core.retry_budget import RetryBudget
from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.transports.tls import client_context

logger = logging.getLogger("prequal_middleware.gateway.pool")

MembersListener = Callable[["PoolRuntime", Sequence[str], Sequence[str]], None]
"""Told ``(pool, joined, left)`` after the pool's members changed, and ``(pool, announced, ())`` when
present members were announced again (``PoolRuntime.announce``)."""

ProbeSink = Callable[["PoolRuntime", Policy, Sequence[str]], None]
"""Told ``(pool, policy, targets)``: send these probes for ``policy`` without waiting (the scheduler's
``send_probes``)."""


def drop_probes(pool: PoolRuntime, policy: Policy, targets: Sequence[str]) -> None:
    """The sink of a pool nobody probes for (no scheduler running): the probes are dropped."""


SyncProber = Callable[["PoolRuntime", Policy, Sequence[str], int, float], Awaitable[Sequence[str]]]
"""Told ``(pool, policy, targets, wait_for, wait_s)``: probe ``targets`` for ``policy`` now and return the
backends that answered, once ``wait_for`` did or after ``wait_s`` (the scheduler's ``probe_and_wait``)."""


async def no_sync_probes(
    pool: PoolRuntime, policy: Policy, targets: Sequence[str], wait_for: int, wait_s: float
) -> Sequence[str]:
    """The sync prober of a pool nobody probes for: no answers (the asynchronous choice decides)."""
    return ()


class PoolRuntime:
    """A pool's members, policies, limits and counters.

    Parameters:
        config: the pool's configuration.
        rng: seeds each policy instance's own ``random.Random``.
        clock: monotonic seconds; times an attempt left without being finished.
    """

    def __init__(self, config: UpstreamPool, rng: random.Random, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.name = config.name  # what registrations, metrics and error responses call the pool
        self.clients: list[Policy] = [self._new_policy(rng) for _ in range(config.clients_per_pool)]
        self._next_client = 0
        self.members: dict[str, Member] = {}
        self.in_flight = 0
        self.backend_in_flight: dict[str, int] = {}
        self.at_limit: set[str] = set()  # backends at max_in_flight_per_backend: not chosen
        retry = config.retry
        self.retry_budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_s, max(1.0, retry.budget_window_s))
        self.probes_in_flight = 0
        self.probes_skipped = 0
        self.probe_sink: ProbeSink = drop_probes  # the scheduler's while it runs
        self.sync_prober: SyncProber = no_sync_probes  # the scheduler's while it runs
        # Sync mode needs Prequal's policy; a custom policy keeps choosing synchronously.
        self.sync = config.prequal.mode == "sync" and all(isinstance(c, PrequalPolicy) for c in self.clients)
        # The pool's one TLS context: its requests, probes, health checks and WebSockets all use it.
        self.ssl_context: ssl.SSLContext | None = None if config.tls is None else client_context(config.tls)
        self._listeners: list[MembersListener] = []

    def _new_policy(self, rng: random.Random) -> Policy:
        spec = self.config.policy
        if isinstance(spec, str):
            return create_policy(
                spec,
                rng=random.Random(rng.getrandbits(64)),
                outliers=self.config.outliers,
                prequal=self.config.prequal,
                slow_start_s=self.config.slow_start_s,
            )
        policy = spec()
        if not isinstance(policy, Policy):
            raise ConfigurationError(
                f"UpstreamPool(name={self.name!r}).policy must return a Policy, got {type(policy).__name__}"
            )
        return policy

    def next_client(self) -> Policy:
        """The policy instance for the next request (in turn when there are several)."""
        clients = self.clients
        if len(clients) == 1:
            return clients[0]
        self._next_client = (self._next_client + 1) % len(clients)
        return clients[self._next_client]

    def select(
        self, now: float, exclude: Collection[str] = frozenset(), policy: Policy | None = None
    ) -> Selection | None:
        """A backend for one attempt, never one in ``exclude`` nor one at its in-flight limit.

        ``policy`` is the client asked (a retry asks the one that chose the first attempt); by
        default the next in turn (``next_client``). The probes the policy wants go to ``probe_sink``.
        """
        if policy is None:
            policy = self.next_client()
        avoid = self._avoiding(exclude)
        selection = policy.select(now, avoid) if avoid else policy.select(now)
        if selection is not None and selection.probes:
            self.probe_sink(self, policy, selection.probes)
        return selection

    async def select_sync(
        self, now: float, exclude: Collection[str] = frozenset(), policy: Policy | None = None
    ) -> Selection | None:
        """``select`` in sync mode: probe the policy's plan, wait for its answers, choose among them.

        The wait is at most ``PrequalSettings.sync_wait_s``; with too few answers by then, ``select``
        (the asynchronous choice) decides. ``now`` is when the request came; the choice is made at the
        clock's time after the wait.
        """
        if policy is None:
            policy = self.next_client()
        if not isinstance(policy, PrequalPolicy):
            return self.select(now, exclude, policy)
        plan = policy.sync_plan(now, self._avoiding(exclude))
        answered: Sequence[str] = ()
        if plan.probes:
            answered = await self.sync_prober(self, policy, plan.probes, plan.wait_for, policy.settings.sync_wait_s)
            now = self.clock()
        selection = policy.select_sync(plan, answered, now, self._avoiding(exclude))  # at_limit may have moved
        return selection if selection is not None else self.select(now, exclude, policy)

    def _avoiding(self, exclude: Collection[str]) -> Collection[str]:
        """``exclude`` plus the backends at their in-flight limit (``exclude`` itself when none is)."""
        at_limit = self.at_limit
        if not at_limit:
            return exclude
        return set(exclude) | at_limit if exclude else at_limit  # read at once, never kept: no copy needed

    def attempt(self, backend: str, policy: Policy, now: float) -> Attempt:
        """The handle of one attempt on ``backend`` chosen by ``policy`` at ``now``; see ``Attempt``."""
        return Attempt(self, backend, policy, now)

    def set_members(self, members: Iterable[Member], now: float) -> None:
        """Replace the members (O(n): a full re-read of the registry); listeners hear who joined and left."""
        old = self.members
        new = {m.id: m for m in members}
        listed = list(new.values())
        for client in self.clients:
            client.set_members(listed, now)
        # Last: should a policy raise, the members still differ and the next full apply tries again.
        self.members = new
        for gone in [b for b in self.backend_in_flight if b not in self.members and not self.backend_in_flight[b]]:
            del self.backend_in_flight[gone]
        joined = [b for b in self.members if b not in old]
        left = [b for b in old if b not in self.members]
        if joined or left:
            self._notify(joined, left)

    def upsert_member(self, member: Member, now: float) -> None:
        """Add one member or update a present one, in O(1) (one registration); listeners hear of a newcomer."""
        joined = member.id not in self.members
        for client in self.clients:
            client.upsert_member(member, now)
        self.members[member.id] = member  # last, as in set_members
        if joined:
            self._notify([member.id], [])

    def remove_member(self, backend: str, now: float) -> None:
        """Remove one member, in O(1) (one unregistration); listeners hear that it left. Nothing if absent."""
        if backend not in self.members:
            return
        for client in self.clients:
            client.remove_member(backend, now)
        del self.members[backend]  # last, as in set_members
        if not self.backend_in_flight.get(backend, 1):  # its count stays while requests to it are in flight
            del self.backend_in_flight[backend]
        self._notify([], [backend])

    def announce(self, backends: Iterable[str]) -> None:
        """Members registered again while present (a restart, a re-announcement): listeners hear of them
        as joined, so that what they learnt of the old instance (e.g. "answers no probes") is revisited."""
        present = [b for b in backends if b in self.members]
        if present:
            self._notify(present, [])

    # --- listeners -------------------------------------------------------------------------------

    def add_listener(self, listener: MembersListener) -> None:
        """Call ``listener(pool, joined, left)`` after every change of members (the scheduler's hook)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: MembersListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, joined: Sequence[str], left: Sequence[str]) -> None:
        for listener in list(self._listeners):
            try:
                listener(self, joined, left)
            except Exception:  # a listener's bug must not stop membership changes
                logger.exception("members listener %r failed on pool %s", listener, self.name)

    # --- concurrency limits ----------------------------------------------------------------------

    def full(self) -> bool:
        limit = self.config.max_in_flight
        return limit is not None and self.in_flight >= limit

    # Only Attempt calls these two: one count per attempt, taken and given back exactly once.

    def _attempt_started(self, backend: str) -> None:
        self.in_flight += 1
        count = self.backend_in_flight.get(backend, 0) + 1
        self.backend_in_flight[backend] = count
        limit = self.config.max_in_flight_per_backend
        if limit is not None and count >= limit:
            self.at_limit.add(backend)

    def _attempt_ended(self, backend: str) -> None:
        self.in_flight -= 1
        count = self.backend_in_flight.get(backend, 1) - 1
        if count > 0 or backend in self.members:
            self.backend_in_flight[backend] = count
        else:
            self.backend_in_flight.pop(backend, None)
        self.at_limit.discard(backend)


class Attempt:
    """One upstream attempt, counted in flight from ``__enter__`` until ``finish``, exactly once.

    Entering counts the attempt in the pool (``in_flight``, ``backend_in_flight``, ``at_limit``) and
    tells the policy (``on_start``). ``finish(outcome, latency_s, now)`` gives both back (the pool's
    counts, then ``policy.on_finish``); a second ``finish`` does nothing. Leaving the ``with`` block
    without a ``finish`` (an exception, a cancellation) finishes the attempt as ``Outcome.CANCELLED``
    with the time elapsed since it began. ``report`` passes a piggybacked load report to the policy.
    """

    __slots__ = ("pool", "backend", "policy", "started", "_state")

    def __init__(self, pool: PoolRuntime, backend: str, policy: Policy, now: float) -> None:
        self.pool = pool
        self.backend = backend
        self.policy = policy
        self.started = now
        self._state = 0  # 0 not started, 1 in flight, 2 finished

    @property
    def in_flight(self) -> bool:
        return self._state == 1

    @property
    def finished(self) -> bool:
        return self._state == 2

    @property
    def reads_reports(self) -> bool:
        """Whether the policy uses piggybacked reports (else there is no need to parse them)."""
        return self.policy.reads_reports

    def __enter__(self) -> Attempt:
        if self._state:
            raise RuntimeError("an attempt is entered once")
        self.pool._attempt_started(self.backend)
        self._state = 1
        try:
            self.policy.on_start(self.backend, self.started)
        except BaseException:
            self._state = 2
            self.pool._attempt_ended(self.backend)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state == 1:
            now = self.pool.clock()
            self.finish(Outcome.CANCELLED, max(0.0, now - self.started), now)

    def finish(self, outcome: Outcome, latency_s: float, now: float) -> None:
        """The attempt ended after ``latency_s`` with ``outcome``; only the first call counts."""
        if self._state != 1:
            if self._state == 0:
                raise RuntimeError("finish before the attempt was entered")
            return
        self._state = 2
        try:
            self.pool._attempt_ended(self.backend)
        finally:
            self.policy.on_finish(self.backend, now, latency_s, outcome)

    def report(self, rif: int, latency_s: float, now: float) -> None:
        """A load report the backend piggybacked on this attempt's response, received at ``now``."""
        self.policy.on_report(self.backend, now, rif, latency_s)

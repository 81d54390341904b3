"""The ``Policy`` protocol the gateway drives, and ``BasePolicy``, the bookkeeping every policy shares.

A policy owns the balancing state of one pool as seen by one client instance: who the members are,
which are healthy, ejected or draining, how many requests it has in flight to each, and whatever its
selection rule needs (probe results, latency estimates). The gateway tells it about membership,
requests and probes, and asks it to ``select`` a backend; it never awaits and never reads a clock.

To plug in your own rule, subclass ``BasePolicy`` and implement ``_choose``; membership, health,
ejection, panic mode and snapshots come with it. A class that implements ``Policy`` from scratch works
too.

    class FirstPolicy(BasePolicy):
        name = "first"

        def _choose(self, candidates, now, exclude):
            return Selection(candidates[0], "policy")
"""

from __future__ import annotations

import math
import random
from collections.abc import Container, Iterable, Sequence
from typing import Final

from prequal_middleware.core.mypyc_compat import mypyc_attr
from prequal_middleware.core.outliers import OutlierDetector
from prequal_middleware.core.settings import OutlierSettings
from prequal_middleware.core.types import (
    SELECTION_REASONS,
    BackendId,
    BackendSnapshot,
    BackendState,
    Member,
    Outcome,
    PolicySnapshot,
    ProbeMode,
    Selection,
    SelectionReason,
)

_NOTHING: Final[frozenset[BackendId]] = frozenset()

# Weight of a new sample in the plain latency EWMA every policy keeps (the "local view").
LATENCY_EWMA_WEIGHT: Final = 0.3
# Slow start never sends a returning backend less than this share of the requests chosen for it.
SLOW_START_MIN_SHARE: Final = 0.1


class _Backend:
    __slots__ = (
        "id",
        "weight",
        "draining",
        "healthy",
        "proven",
        "in_flight",
        "probe_mode",
        "latency_s",
        "probe_failures",
        "selection_cache",
    )

    def __init__(self, member: Member) -> None:
        self.id = member.id
        self.weight = member.weight
        self.draining = member.draining
        # A member that awaits its first passing health check is unhealthy and "unproven": not even
        # panic mode routes to it (200 registered black holes beside one healthy backend must not turn
        # panic on and take 99.5% of the traffic).
        self.proven = not member.awaits_health_check
        self.healthy = self.proven
        self.in_flight = 0
        self.probe_mode: ProbeMode = "probe"
        self.latency_s: float | None = None  # EWMA of successful request latencies seen here
        self.probe_failures = 0  # probes missed in a row (reset by an answered probe or a success)
        # The Selections without probes that chose this member, one per reason (``BasePolicy._selection``).
        self.selection_cache: dict[str, Selection] = {}


# Users subclass the policies in plain Python; mypyc must allow it where the core is compiled.
@mypyc_attr(allow_interpreted_subclasses=True)
class BasePolicy:
    """Membership, health, ejection, panic mode, in-flight counts and snapshots for any policy.

    Parameters:
        rng: the source of every random choice; pass a seeded one for deterministic tests.
        outliers: passive health settings (ejection, panic, error aversion).
        slow_start_s: a member that joins, or comes back from ejection or ill health, gets a share of
            the requests chosen for it that grows linearly from 10% to all over this window (0: off;
            Envoy's slow start). The members present at the start are not slowed.
    """

    name = "base"
    # True when ``_choose`` applies slow start itself (through ``_slow_start``) before committing.
    _chooses_with_slow_start = False

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        outliers: OutlierSettings | None = None,
        slow_start_s: float = 0.0,
    ) -> None:
        if not 0.0 <= slow_start_s < math.inf:
            raise ValueError(f"slow_start_s must be a finite number >= 0, got {slow_start_s!r}")
        self.rng = rng if rng is not None else random.Random()
        self.outliers = OutlierDetector(outliers)
        self.slow_start_s = slow_start_s
        self._warming: dict[BackendId, float] = {}  # backend -> when its slow start began
        self._healthy: frozenset[BackendId] | None = None  # None until the first members arrive
        self._backends: dict[BackendId, _Backend] = {}
        self._candidates: list[BackendId] = []
        self._candidate_set: frozenset[BackendId] = _NOTHING
        self._panic = False
        self._stale = True
        self._valid_until = math.inf  # the next ejection expiry changes the candidates
        self._uniform_weights = True
        # How many members have each weight: keeps ``_uniform_weights`` right per member change without a scan.
        self._weights: dict[float, int] = {}
        self.selections: dict[str, int] = dict.fromkeys(SELECTION_REASONS, 0)
        self.probes_requested = 0
        # Members that missed a probe since we last looked (some may have answered since): while it is
        # empty, ``_trusted`` need not ask each candidate, and the fallback is not O(n) twice over.
        self._missed_probes: set[BackendId] = set()
        # Suspects (``outliers.suspects``) with a request of ours in flight, and when it started: not
        # candidates until it ends or ``trial_timeout_s`` passes (see ``_start_trial``).
        self._trials: dict[BackendId, float] = {}
        self._trial_timeout_s = self.outliers.settings.trial_timeout_s

    # --- membership and health -----------------------------------------------------------------

    def set_members(self, members: Iterable[Member], now: float) -> None:
        """Replace the member set: O(n), for a full re-read of the registry; single changes use the O(1)
        :meth:`upsert_member` and :meth:`remove_member`."""
        incoming = {m.id: m for m in members}
        for gone in [b for b in self._backends if b not in incoming]:
            self.remove_member(gone, now)
        for member in incoming.values():
            self.upsert_member(member, now)
        self._stale = True

    def upsert_member(self, member: Member, now: float) -> None:
        """Add one member, or update a present one's weight and draining (its health and history stay).

        O(1): the candidates are rebuilt lazily at the next ``select`` (once per change, O(n) then).
        """
        backend = self._backends.get(member.id)
        if backend is None:
            self._backends[member.id] = _Backend(member)
            self.outliers.add(member.id)
        else:
            self._count_weight(backend.weight, -1)
            backend.weight = member.weight
            backend.draining = member.draining
        self._count_weight(member.weight, 1)
        self._stale = True

    def remove_member(self, backend: BackendId, now: float) -> None:
        """Forget one member and its state (nothing if absent); O(1) like :meth:`upsert_member`."""
        gone = self._backends.pop(backend, None)
        if gone is None:
            return
        self._count_weight(gone.weight, -1)
        self.outliers.remove(backend)
        self._trials.pop(backend, None)
        self._forget(backend)
        self._stale = True

    def _count_weight(self, weight: float, delta: int) -> None:
        weights = self._weights
        count = weights.get(weight, 0) + delta
        if count > 0:
            weights[weight] = count
        else:
            del weights[weight]
        self._uniform_weights = len(weights) <= 1

    def set_health(self, backend: BackendId, healthy: bool, now: float) -> None:
        b = self._backends.get(backend)
        if b is None:
            return
        if healthy and not b.proven:
            b.proven = True
            self._stale = True
        if b.healthy != healthy:
            b.healthy = healthy
            self._stale = True

    def set_probe_mode(self, backend: BackendId, mode: ProbeMode, now: float) -> None:
        b = self._backends.get(backend)
        if b is not None:
            b.probe_mode = mode

    @property
    def members(self) -> list[BackendId]:
        return list(self._backends)

    def candidates(self, now: float) -> Sequence[BackendId]:
        """The members a request may go to now: the healthy ones, or in panic every active one that
        ever passed a health check (or never had to)."""
        if self._stale or now >= self._valid_until:
            active = [b.id for b in self._backends.values() if not b.draining and b.proven]
            healthy = [
                b.id
                for b in self._backends.values()
                if not b.draining and b.healthy and not self.outliers.is_ejected(b.id, now)
            ]
            self._panic = self.outliers.in_panic(len(healthy), len(active))
            if self.slow_start_s > 0:
                self._track_warming(healthy, now)
            self._valid_until = self.outliers.next_return(now)
            if self._trials:  # (in panic every active member is a candidate anyway)
                healthy = self._without_trials(healthy, now)
            self._candidates = active if self._panic else healthy
            self._candidate_set = frozenset(self._candidates)
            self._stale = False
            self._candidates_changed(self._candidate_set, now)
        return self._candidates

    def _without_trials(self, healthy: list[BackendId], now: float) -> list[BackendId]:
        """``healthy`` without the suspects on trial, unless none is left; shortens ``_valid_until`` to the
        first trial's timeout."""
        free: list[BackendId] = []
        trials, timeout = self._trials, self._trial_timeout_s
        for backend in healthy:
            started = trials.get(backend)
            if started is not None and now - started < timeout:
                self._valid_until = min(self._valid_until, started + timeout)
            else:
                free.append(backend)
        return free or healthy  # all on trial: a request still goes somewhere (a 1-member pool)

    def _start_trial(self, backend: BackendId, now: float) -> None:
        """A request to ``backend`` starts: if it is a suspect with no trial running, this is its trial.

        A suspect failed last (or is back from an ejection): a fast failer looks idle, so every request
        chosen before its failure comes back would go to it as well. Holding it out of the candidates
        while one request is in flight makes that one request the test. Called only while there are
        suspects (``on_start`` checks the set first: nothing is asked while nothing fails).
        """
        timeout = self._trial_timeout_s
        if timeout > 0 and backend in self.outliers.suspects:
            started = self._trials.get(backend)
            if started is None or now - started >= timeout:
                self._trials[backend] = now
                self._stale = True

    def _track_warming(self, healthy: list[BackendId], now: float) -> None:
        current = frozenset(healthy)
        if self._healthy is not None:
            for backend in current - self._healthy:
                self._warming[backend] = now  # joined, or back from ejection or ill health
            for backend in [b for b in self._warming if b not in self._backends]:
                del self._warming[backend]  # left the pool
        if current or self._healthy is not None:
            self._healthy = current  # the first non-empty set is the baseline: nothing to warm up from

    def _slow_start(self, backend: BackendId, candidates: Sequence[BackendId], now: float) -> BackendId:
        """Where a choice of ``backend`` goes: to it, or to another candidate when slow start turns it down.

        The one place slow start decides. ``select`` applies it to what ``_choose`` returned, unless the
        policy sets ``_chooses_with_slow_start`` and calls it from ``_choose`` itself, before committing
        to its choice (Prequal: the chosen probe is charged only if the request really goes there).
        """
        if self._warming and len(candidates) > 1 and self._slowed(backend, now):
            return self._weighted_choice([b for b in candidates if b != backend])
        return backend

    def _slowed(self, backend: BackendId, now: float) -> bool:
        """Whether slow start turns this choice down (the request then goes elsewhere)."""
        started = self._warming.get(backend)
        if started is None:
            return False
        progress = (now - started) / self.slow_start_s
        if progress >= 1.0:
            del self._warming[backend]
            return False
        return self.rng.random() >= max(SLOW_START_MIN_SHARE, progress)

    # --- requests ------------------------------------------------------------------------------

    def select(self, now: float, exclude: Container[BackendId] = _NOTHING) -> Selection | None:
        candidates = self.candidates(now)
        if exclude:
            candidates = [b for b in candidates if b not in exclude]
        if not candidates:
            return None
        selection = self._choose(candidates, now, exclude)
        if self._warming and not self._chooses_with_slow_start:  # no call at all while nothing warms up
            backend = self._slow_start(selection.backend, candidates, now)
            if backend != selection.backend:
                selection = self._selection(backend, selection.reason, selection.probes)
        if self._panic:
            selection = self._selection(selection.backend, "panic", selection.probes)
        self.selections[selection.reason] += 1
        self.probes_requested += len(selection.probes)
        return selection

    def _selection(self, backend: BackendId, reason: SelectionReason, probes: tuple[BackendId, ...] = ()) -> Selection:
        """``Selection(backend, reason, probes)``; without probes, the member's one instance per reason.

        A Selection is immutable, so the instances are shared: making one (a frozen dataclass) costs
        several times a request's whole choice of round robin, and a choice without probes is the
        common case. They go with the member.
        """
        b = self._backends.get(backend)
        if probes or b is None:
            return Selection(backend, reason, probes)
        selection = b.selection_cache.get(reason)
        if selection is None:
            selection = b.selection_cache[reason] = Selection(backend, reason)
        return selection

    def on_start(self, backend: BackendId, now: float) -> None:
        b = self._backends.get(backend)
        if b is not None:
            b.in_flight += 1
            if self.outliers.suspects:
                self._start_trial(backend, now)

    def on_finish(self, backend: BackendId, now: float, latency_s: float, outcome: Outcome) -> None:
        b = self._backends.get(backend)
        if b is None:
            return
        if b.in_flight > 0:
            b.in_flight -= 1
        if self._trials and self._trials.pop(backend, None) is not None:
            self._stale = True  # its trial is over, whatever the outcome: it may take a request again
        if outcome is Outcome.CANCELLED:
            return  # the client left: nothing learned about the backend
        if outcome.is_failure:
            self._record_failure(backend, now)
            self._on_failure(b, now)
        else:
            self.outliers.record_success(backend, now)
            b.probe_failures = 0
            b.latency_s = (
                latency_s if b.latency_s is None else b.latency_s + LATENCY_EWMA_WEIGHT * (latency_s - b.latency_s)
            )
            self._on_success(b, now, latency_s)

    # --- probes (no-ops unless the policy probes) -------------------------------------------------

    reads_reports: bool = False  # whether on_report uses them (set per instance by policies that do)

    def on_report(self, backend: BackendId, now: float, rif: object, latency_s: object) -> None:
        return None

    def on_probe(self, backend: BackendId, now: float, rif: object, latency_s: object) -> None:
        return None

    def on_probe_failure(self, backend: BackendId, now: float) -> None:
        # A missed probe is weak evidence: a CPU stall on the gateway or the backend longer than the
        # probe timeout looks the same as a dead backend. Counting it like a failed request ejected
        # healthy backends during stalls, filled the ejection cap and left a real fast failer in the
        # pool. Real requests (connect errors, timeouts, 5xx) and active health checks decide ejection;
        # a missed probe only makes the backend a last resort for the fallback until it answers.
        b = self._backends.get(backend)
        if b is not None:
            b.probe_failures += 1
            self._missed_probes.add(backend)

    def _record_failure(self, backend: BackendId, now: float) -> None:
        if self.outliers.record_failure(backend, now, len(self._backends)):
            self._stale = True
            if self.slow_start_s > 0:  # it warms up again from the moment it returns
                self._warming[backend] = self.outliers.ejected_until(backend, now) or now

    def idle_probes(self, now: float) -> Sequence[BackendId]:
        return ()

    # --- snapshot ------------------------------------------------------------------------------

    def snapshot(self, now: float) -> PolicySnapshot:
        self.candidates(now)
        backends = tuple(self._backend_snapshot(b, now) for b in self._backends.values())
        return PolicySnapshot(
            policy=self.name,
            backends=backends,
            selections=dict(self.selections),
            panic=self._panic,
            probes_requested=self.probes_requested,
        )

    def _backend_snapshot(self, b: _Backend, now: float) -> BackendSnapshot:
        state: BackendState
        if b.draining:
            state = "draining"
        elif self.outliers.is_ejected(b.id, now):
            state = "ejected"
        elif not b.healthy:
            state = "unhealthy"
        else:
            state = "healthy"
        rif, latency_s = self._load_of(b, now)
        return BackendSnapshot(
            id=b.id,
            state=state,
            weight=b.weight,
            in_flight=b.in_flight,
            probe_mode=b.probe_mode,
            rif=rif,
            latency_s=latency_s,
            ejected_until=self.outliers.ejected_until(b.id, now),
            consecutive_failures=self.outliers.consecutive_failures(b.id),
            failure_rate=self.outliers.failure_rate(b.id, now),
        )

    # --- hooks for subclasses ------------------------------------------------------------------

    def _choose(self, candidates: Sequence[BackendId], now: float, exclude: Container[BackendId]) -> Selection:
        """Pick one of ``candidates`` (never empty, already without ``exclude``)."""
        raise NotImplementedError

    def _load_of(self, b: _Backend, now: float) -> tuple[int | None, float | None]:
        """(RIF, latency) to show for a backend: by default the local view."""
        return b.in_flight, b.latency_s

    def _candidates_changed(self, candidates: frozenset[BackendId], now: float) -> None:
        """The eligible set changed (membership, health, ejection, panic)."""

    def _forget(self, backend: BackendId) -> None:
        """A member left."""

    def _on_success(self, b: _Backend, now: float, latency_s: float) -> None:
        """A request to ``b`` succeeded."""

    def _on_failure(self, b: _Backend, now: float) -> None:
        """A request to ``b`` failed (5xx, 429, connect error, timeout)."""

    def _trusted(self, candidates: Sequence[BackendId], now: float) -> Sequence[BackendId]:
        """``candidates`` without those failing recently (error aversion) or missing probes, unless none is left.

        For choices made without probe information (Prequal's fallback): a backend that fails
        fast is never its own tie-breaker.
        """
        backends, outliers = self._backends, self.outliers
        # Each filter runs only when something can fail it: with no failure rate above 0 and no probe
        # missed, both keep every candidate, and the fallback costs no scan of the members here.
        good = [c for c in candidates if not outliers.is_averse(c, now)] if outliers.may_be_averse() else candidates
        missed = self._missed_probes
        if missed:
            # Forget those that answered or left since (an answered probe resets the count elsewhere).
            missed.intersection_update([b for b in missed if b in backends and backends[b].probe_failures])
        answering = [c for c in good if backends[c].probe_failures == 0] if missed else good
        return answering or good or candidates

    def _weighted_choice(self, candidates: Sequence[BackendId]) -> BackendId:
        """A random candidate, in proportion to weight."""
        if self._uniform_weights:
            return candidates[int(self.rng.random() * len(candidates))]
        backends = self._backends
        total = 0.0
        for c in candidates:
            total += backends[c].weight
        x = self.rng.random() * total
        for c in candidates:
            x -= backends[c].weight
            if x < 0:
                return c
        return candidates[-1]

"""``PrequalPolicy``: the probe pool driven per query, with error aversion (Prequal, NSDI '24, section 4).

Per query: expire old probes, choose with HCL (a fallback below two probes), compensate the
chosen probe's RIF, remove ``r_remove`` probes alternating oldest and worst, and ask for
``r_probe`` probes to distinct, uniformly random eligible backends. The caller sends the probes
asynchronously; the current query was routed on probes earlier queries asked for.

Backends that do not answer probes (``probe_mode == "local"``) are "probed" on the spot from the
gateway's own view: its requests in flight to them and the latencies it measured.

Error aversion: a failed query purges the backend's probe; a backend whose recent failure rate is
above ``OutlierSettings.averse_above`` has its probes ignored until the rate decays, so a backend
that fails fast while reporting zero load cannot become the pool's favourite. The fallback (the
fewest of our own requests in flight by default, ``PrequalSettings.fallback``) avoids such backends,
and those whose last probe went unanswered, while any other candidate is left.
A missed probe purges that backend's probe but does not count toward ejection (see
``BasePolicy.on_probe_failure``).

Cross-check (``PrequalSettings.cross_check``, on by default): a probe report is untrusted input. One
that is out of range is ignored. Otherwise the RIF used is at least this client's own requests in
flight to the backend (fewer is impossible), and a latency far below what this client measures
itself for the backend is raised to ``measured / cross_check_ratio``. A backend that answers "idle and
instant" while serving slowly took ~90% of the requests of a pool of three before (issue 12, item 8).

Piggybacked reports (``on_report``): a backend behind ``LoadReportingMiddleware`` reports its load on
every response. Those reports come only from backends this client chose, so they are not a random
sample and never enter the pool or the RIF history by themselves. They answer probes instead: the
sampler still draws ``r_probe`` distinct, uniformly random candidates per query, exactly as before,
and each draw still brings one entry into the pool. Where its value comes from changes: a drawn
backend whose latest report (piggybacked, or a probe answer) is at most
``PrequalSettings.report_max_age_s`` old is pooled from that report on the spot (as received now,
which keeps the pool in receipt order), its RIF raised by the requests this client sent there since
(what the pool's +1 compensation would have counted); only a backend with no fresh report is probed on
the network, and not while a probe of ours to it is still in flight (its answer is coming and will be
pooled). So which backends enter the pool, and how often, is the paper's uniform sample; a value is at
most ``report_max_age_s`` old where a probe's is a round trip old.

Why every draw still pools: skipping the draws of a backend whose report was already pooled would
cap the inflow of a backend that is rarely chosen (no piggybacked reports) at one entry per
``report_max_age_s`` while chosen backends enter at every draw, a pool biased toward the backends
already chosen (measured: a backend lying in its probe answers then kept ~7% of the traffic without
the cross-check, where the unbiased pool gave it ~90%: the bias hid the lie, and would hide an honest
backend's recovery as well). With reports, the network carries at most about one probe per backend
per ``report_max_age_s`` per client, whatever the request rate.

A sole client (``PrequalSettings.report_max_queries``): while no report in the last ``max_age_s``
showed load above this client's own requests in flight, every change of a backend's load is a request
of ours (added to its report) or the end of one (which brings a fresh report), so a report older than
``report_max_age_s`` still answers draws for ``report_max_queries`` queries (at most ``max_idle_s``
old). A quiet pool then stops probing for what it already knows; the draws, and so the sample, are
unchanged. With other clients, and in idle rounds, the time bound alone holds.

Weights: Prequal balances on measured load, so member weights do not bias its choices.

Sync mode (``PrequalSettings.mode = "sync"``, the paper's section 4): per query, ``sync_plan`` draws
``sync_probes`` distinct, uniformly random candidates; the caller probes them on the network, feeds
every answer to ``on_probe`` as usual (pool, RIF history), waits for all but one answer or
``sync_wait_s``, and asks ``select_sync``, which applies HCL to those answers (``sync_choice``). With
fewer than two answers it returns ``None`` and the caller makes the asynchronous choice (``select``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Container, Sequence
from dataclasses import dataclass
from typing import Final

from prequal_middleware.core.mypyc_compat import mypyc_attr
from prequal_middleware.core.policy import BasePolicy, _Backend
from prequal_middleware.core.probe_pool import ProbePool, RifHistory, checked_report, sample
from prequal_middleware.core.settings import OutlierSettings, PrequalSettings
from prequal_middleware.core.types import BackendId, PolicySnapshot, Selection, SelectionReason

# A probe we sent and heard nothing of for this long is no longer "in flight" for the sampler: a probe
# skipped by the scheduler's cap, or lost, never calls back. Far above any probe timeout (50 ms default).
PROBE_PENDING_S: Final = 0.5


# Sync mode chooses among at least this many answers; with fewer there is no choice to make.
SYNC_MIN_ANSWERS: Final = 2


@dataclass(frozen=True, slots=True)
class SyncAnswer:
    """One backend's load as a sync-mode query sees it: RIF (with our requests since) and latency."""

    backend: BackendId
    rif: int
    latency_s: float


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What one sync-mode query asks for (``PrequalPolicy.sync_plan``).

    ``probes`` go on the network now; ``local`` are drawn backends in local mode, answered from this
    client's own view; the query waits for ``wait_for`` of the network answers (0: no wait at all).
    ``started`` tells this round's answers from older reports.
    """

    started: float
    probes: tuple[BackendId, ...]
    local: tuple[BackendId, ...]
    wait_for: int


def sync_choice(
    answers: Sequence[SyncAnswer],
    now: float,
    history: RifHistory,
    q_rif: float,
    rng: random.Random,
    min_answers: int = SYNC_MIN_ANSWERS,
) -> tuple[BackendId, SelectionReason] | None:
    """HCL over one query's sync answers; ``None`` below ``min_answers`` (the caller falls back).

    The same rule as the pool's (``ProbePool.pick``): hot means RIF above the ``q_rif`` quantile of the
    RIF history; all hot: the lowest (RIF, latency); else the cold answer with the lowest (latency,
    RIF); remaining ties uniformly at random.
    """
    if len(answers) < min_answers:
        return None
    theta = history.threshold(q_rif, now)
    cold = [a for a in answers if a.rif <= theta]
    reason: SelectionReason = "cold" if cold else "hot"
    keys: list[tuple[float, float]] = (
        [(a.latency_s, a.rif) for a in cold] if cold else [(a.rif, a.latency_s) for a in answers]
    )
    among = cold or answers
    best = min(keys)
    ties = [a for a, k in zip(among, keys, strict=True) if k == best]
    chosen = ties[0] if len(ties) == 1 else ties[int(rng.random() * len(ties))]
    return chosen.backend, reason


class _Report:
    """A backend's latest load report, cross-checked: when it arrived, whether it was pooled yet, and how
    many requests this client sent there since (the RIF it stands for now is ``rif + sent_since``)."""

    __slots__ = ("at", "query", "rif", "latency_s", "used", "sent_since")

    def __init__(self, at: float, query: int, rif: int, latency_s: float, used: bool) -> None:
        self.at = at
        self.query = query  # the pool's query count when it came (``report_max_queries``)
        self.rif = rif
        self.latency_s = latency_s
        self.used = used
        self.sent_since = 0


@mypyc_attr(allow_interpreted_subclasses=True)
class PrequalPolicy(BasePolicy):
    """Prequal's asynchronous-probing client for one pool.

    Parameters:
        settings: Prequal's parameters (paper defaults).
        rng: the source of every random choice; pass a seeded one for deterministic tests.
        outliers: passive health settings.
    """

    name = "prequal"
    _chooses_with_slow_start = True  # a probe is charged only when slow start lets the query go there

    def __init__(
        self,
        settings: PrequalSettings | None = None,
        *,
        rng: random.Random | None = None,
        outliers: OutlierSettings | None = None,
        slow_start_s: float = 0.0,
    ) -> None:
        super().__init__(rng=rng, outliers=outliers, slow_start_s=slow_start_s)
        self._settings = s = settings or PrequalSettings()
        self.pool = ProbePool(s, self.rng)
        # Read on every query or report, copied once (see ``ProbePool``): ``settings`` never changes.
        self._report_max_age_s = s.report_max_age_s
        self._report_max_queries = s.report_max_queries
        self._max_idle_s = s.max_idle_s
        self._queries = 0  # queries routed (async and sync choices): the age of a report in queries
        self._foreign_window_s = s.max_age_s
        self._foreign_at = -math.inf  # when a report last showed load that this client did not send
        self._cross_checks = s.cross_check
        self._cross_check_ratio = s.cross_check_ratio
        self._cross_check_slack_s = s.cross_check_slack_s
        self.reads_reports = s.report_max_age_s > 0
        self._last_activity = -math.inf  # last query or idle probe round
        # The latest report used per backend, cross-checked (for snapshots): kept when ``_reports`` drops it.
        self._last_probe: dict[BackendId, _Report] = {}
        self._reports: dict[BackendId, _Report] = {}  # latest report per backend (probe or piggybacked)
        self._probing: dict[BackendId, float] = {}  # probes of ours in flight: when each was asked for
        self.probes_from_reports = 0  # draws answered by a fresh piggybacked report, its first use
        self.probes_reused = 0  # draws answered again by a fresh report (or probe answer) already pooled
        self.probes_pending = 0  # probes not sent because one to that backend was still in flight
        # How often the cross-check changed a report (diagnostics: the simulator reports them).
        self.rif_corrections = 0
        self.latency_corrections = 0
        self.reports_ignored = 0  # out of range
        self.sync_choices = 0  # sync mode: queries chosen among their answers
        self.sync_fallbacks = 0  # sync mode: too few answers in time, the asynchronous choice decided

    @property
    def settings(self) -> PrequalSettings:
        """Prequal's parameters, fixed when the policy was made."""
        return self._settings

    # --- selection -----------------------------------------------------------------------------

    def _choose(self, candidates: Sequence[BackendId], now: float, exclude: Container[BackendId]) -> Selection:
        # Order of one query: expire, select (HCL or the fallback), slow start, charge, then remove.
        pool = self.pool
        picked = pool.begin_query(now, exclude)  # expire, then HCL
        reason: SelectionReason
        charged = None  # the pooled probe the query goes on
        if picked is None:
            trusted = self._trusted(candidates, now)
            if self.settings.fallback == "random":
                backend = trusted[int(self.rng.random() * len(trusted))]
            else:
                backend = self._least_in_flight(trusted)
            backend = self._slow_start(backend, candidates, now)
            reason = "fallback"
        else:
            charged, reason = picked
            backend = charged.backend
            if self._warming:  # no call at all while nothing warms up
                backend = self._slow_start(backend, candidates, now)
                if backend != charged.backend:
                    charged = None  # a probe skipped by slow start keeps its RIF and reuse budget
        count = pool.end_query(now, charged)  # charge it, the removals, then how many probes to send
        self._last_activity = now
        self._queries += 1
        return self._selection(backend, reason, self._probe(count, now) if count else ())

    def _least_in_flight(self, candidates: Sequence[BackendId]) -> BackendId:
        """The candidate with the fewest of our requests in flight; ties uniformly at random."""
        backends, rng = self._backends, self.rng
        best = candidates[0]
        low = backends[best].in_flight
        ties = 1
        for c in candidates[1:]:
            n = backends[c].in_flight
            if n < low:
                best, low, ties = c, n, 1
            elif n == low:
                ties += 1
                if rng.random() * ties < 1.0:  # reservoir sampling: each tie kept with probability 1/ties
                    best = c
        return best

    def idle_probes(self, now: float) -> Sequence[BackendId]:
        """``ceil(r_probe)`` probes when no query has come for ``max_idle_s``; rearms."""
        if now - self._last_activity < self.settings.max_idle_s:
            return ()
        self._last_activity = now
        # No query came for max_idle_s: every report is that old in time, whatever the query count says.
        probes = self._probe(max(1, math.ceil(self.settings.probes_per_query)), now, idle=True)
        self.probes_requested += len(probes)
        return probes

    def _probe(self, count: int, now: float, idle: bool = False) -> tuple[BackendId, ...]:
        """Distinct, uniformly random eligible targets; local-mode ones are pooled on the spot.

        A drawn backend's report answers the draw when it is at most ``report_max_age_s`` old, or (not
        for ``idle`` rounds, and only while no report in the last ``max_age_s`` showed load from another
        client) at most ``report_max_queries`` queries and ``max_idle_s`` old.
        """
        if count <= 0:
            return ()
        candidates = self.candidates(now)
        n = len(candidates)
        targets = sample(self.rng, candidates, min(count, n))
        backends = self._backends
        reports, probing = self._reports, self._probing
        max_age = self._report_max_age_s
        # A report older than max_age still answers while few queries came since (report_max_queries).
        oldest_query = self._queries - self._report_max_queries
        # -1: every report is too old by this rule. It holds only while this client is the backends'
        # sole client: then their load changes only by our requests (counted in sent_since) and their
        # ends (each brings a fresh report), and an old report is still exact.
        sole = now - self._foreign_at > self._foreign_window_s
        longest = self._max_idle_s if sole and not idle else -1.0
        pool, outliers = self.pool, self.outliers
        averse = outliers.is_averse if outliers.may_be_averse() else None  # None: no member is averse
        remote: list[BackendId] = []
        # Runs for every query: what _pool_result does, inline, for targets drawn from the candidates
        # just read (so they are candidates) and reports already checked where they came in.
        for target in targets:
            b = backends[target]
            if b.probe_mode == "local":
                rif, latency_s = b.in_flight, b.latency_s or 0.0  # our own counts: in range by construction
            else:
                report = reports.get(target)
                if (
                    report is None
                    or max_age <= 0
                    or (now - report.at > max_age and (report.query < oldest_query or now - report.at > longest))
                ):
                    sent = probing.get(target)
                    if sent is not None and now - sent < PROBE_PENDING_S:
                        self.probes_pending += 1  # its answer is on the way and will be pooled
                    else:
                        probing[target] = now
                        remote.append(target)
                    continue
                if report.used:
                    self.probes_reused += 1
                else:
                    report.used = True
                    self.probes_from_reports += 1
                # What the backend said, plus what this client has sent it since (the +1 compensation
                # the pool applies per use, for the requests sent after the report).
                rif, latency_s = report.rif + report.sent_since, report.latency_s
            if averse is not None and averse(target, now):
                pool.history.add_valid(rif, now)
            else:
                pool.add_valid(target, rif, latency_s, now, n)
        return tuple(remote) if remote else ()

    # --- sync mode ------------------------------------------------------------------------------

    def sync_plan(self, now: float, exclude: Container[BackendId] = frozenset()) -> SyncPlan:
        """Draw ``sync_probes`` distinct, uniformly random candidates not in ``exclude`` for one query.

        It waits for all but one (at least two: one answer is no choice); fewer than two candidates
        need no probe. Backends in local mode answer at once from this client's own view.
        """
        candidates = self.candidates(now)
        if exclude:
            candidates = [c for c in candidates if c not in exclude]
        k = min(self.settings.sync_probes, len(candidates))
        if k < SYNC_MIN_ANSWERS:
            return SyncPlan(now, (), (), 0)
        targets = self.rng.sample(candidates, k)
        backends = self._backends
        local = tuple(t for t in targets if backends[t].probe_mode == "local")
        probes = tuple(t for t in targets if backends[t].probe_mode != "local")
        for target in probes:
            self._probing[target] = now
        self.probes_requested += len(probes)
        wanted = min(k, max(k - 1, SYNC_MIN_ANSWERS))
        return SyncPlan(now, probes, local, max(0, wanted - len(local)))

    def select_sync(
        self, plan: SyncPlan, answered: Collection[BackendId], now: float, exclude: Container[BackendId] = frozenset()
    ) -> Selection | None:
        """HCL among ``plan``'s answers, or ``None`` (too few: the caller makes the asynchronous choice).

        ``answered``: the backends of ``plan.probes`` whose answers came in time, already given to
        ``on_probe``; their values are read back from there (cross-checked, plus the requests this client
        sent since, e.g. by concurrent queries). Answers of backends no longer candidates, in ``exclude``,
        or whose probes error aversion ignores do not count. The chosen backend's pooled probe, if any,
        is charged as the pool charges a query sent on it.
        """
        candidates = self.candidates(now)
        allowed = self._candidate_set
        is_averse = self.outliers.is_averse
        answers: list[SyncAnswer] = []
        for backend in plan.local:
            b = self._backends.get(backend)
            if b is not None and b.probe_mode == "local":
                answers.append(SyncAnswer(backend, b.in_flight, b.latency_s or 0.0))
        for backend in answered:
            report = self._reports.get(backend)
            if report is not None and report.at >= plan.started:  # this round's answer, not an older report
                answers.append(SyncAnswer(backend, report.rif + report.sent_since, report.latency_s))
        answers = [
            a for a in answers if a.backend in allowed and a.backend not in exclude and not is_averse(a.backend, now)
        ]
        picked = sync_choice(answers, now, self.pool.history, self.settings.q_rif, self.rng)
        if picked is None:
            self.sync_fallbacks += 1
            return None
        chosen, reason = picked
        if exclude:
            candidates = [c for c in candidates if c not in exclude]
        backend = self._slow_start(chosen, candidates, now)
        entry = self.pool.get(backend)
        if entry is not None and backend == chosen:
            self.pool.use(entry)  # the pooled value now misses this query, as after a pool choice
        self._last_activity = now
        self._queries += 1  # a query routed, as in ``_choose``: it ages the reports (report_max_queries)
        self.sync_choices += 1
        if self._panic:
            reason = "panic"
        self.selections[reason] += 1
        return self._selection(backend, reason)

    def on_start(self, backend: BackendId, now: float) -> None:
        b = self._backends.get(backend)  # BasePolicy.on_start inline: once per request
        if b is not None:
            b.in_flight += 1
            if self.outliers.suspects:
                self._start_trial(backend, now)
        report = self._reports.get(backend)
        if report is not None:
            report.sent_since += 1

    # --- inflow --------------------------------------------------------------------------------

    def on_probe(self, backend: BackendId, now: float, rif: object, latency_s: object) -> None:
        """A probe answer: it feeds the RIF history, then the pool if the backend may be chosen.

        The history behind the hot/cold threshold estimates the RIF distribution over the backends
        this client may send to (the candidates). So every answer from a candidate feeds it, whether
        or not it is pooled: one for a backend already pooled (it replaces that entry), one evicted
        later, one from a candidate whose probes error aversion ignores. An answer from a backend that
        is not a candidate (ejected, unhealthy, draining, or no longer a member: a late answer) feeds
        neither: its load is not part of the choice, and a fast-failing ejected backend's RIF of 0
        would drag the threshold down.
        """
        self._probing.pop(backend, None)
        b = self._backends.get(backend)
        if b is None:
            return
        report = checked_report(rif, latency_s)
        if report is None:
            self.reports_ignored += 1  # neither pooled nor an answer: the backend keeps its probe-failure count
            return
        load, latency = report
        self._note_foreign(load, b.in_flight, now)
        if self._cross_checks:
            load, latency = self._cross_check(b, load, latency, b.in_flight)
        self._keep_report(backend, now, load, latency, used=True)  # pooled below: it answers nothing more
        b.probe_failures = 0
        self._pool_result(b, load, latency, now)

    def on_report(self, backend: BackendId, now: float, rif: object, latency_s: object) -> None:
        """A report piggybacked on a response of ours, received at ``now`` (see the module docstring).

        The backend left out the request it answered, which this client still counts in flight until
        its body ends: the cross-check's floor is our count less that one. The report is kept to
        answer the next probe the sampler asks of this backend; it is not pooled here.
        """
        b = self._backends.get(backend)
        if b is None:
            return
        report = checked_report(rif, latency_s)
        if report is None:
            self.reports_ignored += 1
            return
        load, latency = report
        self._note_foreign(load, b.in_flight - 1, now)
        if self._cross_checks:
            load, latency = self._cross_check(b, load, latency, b.in_flight - 1)
        self._keep_report(backend, now, load, latency, used=False)

    def _keep_report(self, backend: BackendId, now: float, rif: int, latency_s: float, used: bool) -> None:
        """Make (rif, latency_s), received at ``now``, the backend's latest report."""
        report = self._reports.get(backend)
        if report is None:
            self._reports[backend] = self._last_probe[backend] = _Report(now, self._queries, rif, latency_s, used)
        else:  # updated in place: once per response (``_last_probe`` holds this same object)
            report.at, report.rif, report.latency_s, report.used, report.sent_since = now, rif, latency_s, used, 0
            report.query = self._queries

    def _note_foreign(self, rif: int, own_in_flight: int, now: float) -> None:
        """A report above this client's own requests in flight there (the cross-check's floor) is load
        another client sent: the query bound (``report_max_queries``) is off for ``max_age_s``."""
        if rif > own_in_flight and rif > 0:
            self._foreign_at = now

    def _cross_check(self, b: _Backend, rif: int, latency_s: float, own_in_flight: int) -> tuple[int, float]:
        """The (RIF, latency) to use for a report, given what this client knows of the backend itself.

        RIF: at least this client's own requests in flight there. A request sent but not yet arrived,
        or answered but not yet received, makes an honest report lower by that much; the floor then
        counts it a little early or late, which is what the +1 compensation does anyway.

        Latency: the backend's report is the median at its current RIF; what this client measures
        (``latency_s``, an EWMA of its successful requests) adds the network and the gateway's own
        queueing, so honest reports sit somewhat below it. A report below ``measured / ratio`` and more
        than ``slack`` below it is raised to ``measured / ratio``: the least this client's own
        measurement allows. Raised, not replaced: an honest idle backend reports 0 (no fresh sample)
        and should stay attractive, and a recovered one should not be held to an old, slower EWMA.
        """
        if rif < own_in_flight:
            rif = own_in_flight
            self.rif_corrections += 1
        measured = b.latency_s
        if measured is not None:
            floor = measured / self._cross_check_ratio
            if latency_s < floor and measured - latency_s > self._cross_check_slack_s:
                latency_s = floor
                self.latency_corrections += 1
        return rif, latency_s

    def _pool_result(self, b: _Backend, rif: int, latency_s: float, now: float) -> None:
        # Only candidates count (the list is current: every change to it marks it stale and this reads
        # it); a non-averse one enters the pool, an averse one only the RIF history (see ``on_probe``).
        # The caller has checked the report (checked_report). ``_probe`` does the same inline.
        self.candidates(now)
        if b.id not in self._candidate_set:
            return
        if self.outliers.is_averse(b.id, now):
            self.pool.history.add_valid(rif, now)
            return
        self.pool.add_valid(b.id, rif, latency_s, now, len(self._candidates))

    def on_probe_failure(self, backend: BackendId, now: float) -> None:
        self._probing.pop(backend, None)
        self._reports.pop(backend, None)
        self.pool.discard(backend)  # its last answer is no longer to be trusted
        super().on_probe_failure(backend, now)

    def _on_failure(self, b: _Backend, now: float) -> None:
        self._reports.pop(b.id, None)
        self.pool.discard(b.id)  # a fast-failing backend looks idle: forget what it said

    def _candidates_changed(self, candidates: frozenset[BackendId], now: float) -> None:
        self.pool.retain(candidates)

    def _forget(self, backend: BackendId) -> None:
        self.pool.discard(backend)
        self._last_probe.pop(backend, None)
        self._reports.pop(backend, None)
        self._probing.pop(backend, None)

    # --- snapshot ------------------------------------------------------------------------------

    def _load_of(self, b: _Backend, now: float) -> tuple[int | None, float | None]:
        if b.probe_mode == "local":
            return b.in_flight, b.latency_s
        last = self._last_probe.get(b.id)
        return (None, None) if last is None else (last.rif, last.latency_s)

    def snapshot(self, now: float) -> PolicySnapshot:
        base = super().snapshot(now)
        self.pool.expire(now)
        threshold = self.pool.threshold(now)
        return PolicySnapshot(
            policy=base.policy,
            backends=base.backends,
            selections=base.selections,
            panic=base.panic,
            pool_size=len(self.pool),
            pool_capacity=self.settings.pool_size,
            rif_threshold=None if math.isinf(threshold) else threshold,
            probes_requested=base.probes_requested,
        )

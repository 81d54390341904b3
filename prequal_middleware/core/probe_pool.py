"""The Prequal probe pool: the client half of Prequal, one per pool and client instance.

Wydrowski et al., "Load is not what you should balance: Introducing Prequal", NSDI '24, section 4.
A client keeps at most ``m`` recent probe results (requests in flight and a latency estimate per
backend). Each query picks from the pool with the hot-cold lexicographic (HCL) rule: a probe is *hot*
when its RIF exceeds the ``q_rif`` quantile of recently seen probe RIFs; if every probe is hot the
lowest RIF wins, otherwise the cold probe with the lowest latency does.

Sans-IO: every method takes ``now`` (monotonic seconds); randomness comes from an injected
``random.Random``. Nothing here awaits or reads a clock.

    pool = ProbePool(PrequalSettings(), rng=random.Random(7))
    pool.add("http://a", rif=3, latency_s=0.020, now=10.0, n_available=4)
    pool.add("http://b", rif=1, latency_s=0.030, now=10.0, n_available=4)
    entry, reason = pool.choose(now=10.1)        # -> b? a? HCL decides; None below 2 entries
"""

from __future__ import annotations

import math
import random
import sys
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Collection, Container, Iterator, Sequence
from typing import Final, TypeVar

from prequal_middleware.core.compiled import is_compiled
from prequal_middleware.core.settings import PrequalSettings
from prequal_middleware.core.types import BackendId, SelectionReason

T = TypeVar("T")

# The largest RIF and the latency range a probe report may carry; anything else is ignored (not pooled,
# not in the RIF history): an unbounded int made ``float()`` overflow in the threshold and failed every
# selection. The probe client applies the same bound to what it parses.
MAX_REPORTED_RIF: Final = 1_000_000

_FLOAT_MAX: Final = sys.float_info.max
_NAN: Final = math.nan  # a module constant: compiled code reads ``math.nan`` from the module each time
_INF: Final = math.inf


def checked_report(rif: object, latency_s: object) -> tuple[int, float] | None:
    """A probe report as ``(rif, latency_s)``, an int and a float, if it may be used; else ``None``.

    It may be used when RIF is an int in [0, ``MAX_REPORTED_RIF``] and the latency is finite and >= 0
    (an int latency is converted). Checked where reports enter the core (``PrequalPolicy.on_probe`` and
    ``on_report``, ``ProbePool.add``, ``RifHistory.add``), whatever their source: a bad one is ignored,
    never raised on. Those entry points take ``object`` for this reason: where the core is compiled,
    a parameter typed ``int`` would raise ``TypeError`` on a float before the check could ignore it.
    """
    if type(rif) is int and type(latency_s) is float:  # the common case, in a few comparisons
        if 0 <= rif <= MAX_REPORTED_RIF and 0.0 <= latency_s <= _FLOAT_MAX:  # NaN fails every comparison
            return rif, latency_s
        return None
    if isinstance(rif, bool) or not isinstance(rif, int) or not 0 <= rif <= MAX_REPORTED_RIF:
        return None
    if isinstance(latency_s, bool) or not isinstance(latency_s, (int, float)):
        return None
    try:
        latency = float(latency_s)
    except OverflowError:  # an int too large for a float
        return None
    if math.isfinite(latency) and latency >= 0.0:
        return int(rif), latency
    return None


# --- rates and budgets -------------------------------------------------------------------------


def reuse_budget(m: int, n: int, r_probe: float, r_remove: float, drift: float, max_reuse: int) -> float:
    """Eq. 1: ``b_reuse = max(1, (1 + drift) / ((1 - m/n) * r_probe - r_remove))``, capped at ``max_reuse``.

    The paper's worked example (m=16, n=100, r_probe=3, r_remove=1, drift=1) gives 2 / 1.52 = 1.316.
    When the denominator is <= 0 (``m >= n``: small fleets, the common case behind a gateway; or too
    few probes to outpace removals) Eq. 1 has no value: no finite budget keeps the pool full. The
    budget is then 1, each probe used once: with ``m >= n`` probes are plentiful (each query probes a
    large share of the fleet) and reuse would only herd (docs/simulator.md).

    The denominator is <= 0 exactly when ``n <= m / (1 - r_remove / r_probe)``. With the defaults
    (m 16, r_probe 3, r_remove 1, drift 1, ``max_reuse`` 2) that is **n <= 24**: the budget is 1, so the
    +1 RIF compensation of a used probe (``ProbePool.use``) is never seen by a later choice; for
    25 <= n <= 48 Eq. 1 gives 2 or more and the cap, 2, applies; from n = 49 it is Eq. 1's own value in
    (1, 2) (1.316 at n = 100). Issue 15's small-fleet study measured the alternative, a pool of
    ``min(16, n // 3)`` (budget 2, compensation acting), against m = 16: worse at 6 backends, no better
    at 12 and 20 (docs/simulator.md, "Small fleets and the pool size (issue 15, section 3)").
    """
    if n <= 0:
        return 1.0
    denominator = (1.0 - m / n) * r_probe - r_remove
    if denominator <= 0:
        return 1.0
    return min(float(max_reuse), max(1.0, (1.0 + drift) / denominator))


# random.Random.sample's own cut between its two methods (CPython's random.py): below it, a copy of
# the population; above it, a set of drawn indices.
_SAMPLE_SETSIZE: Final = 21
# How a plain random.Random draws an index below n (CPython 3.11-3.13 alike); a subclass may differ.
_RANDBELOW: Final = random.Random._randbelow_with_getrandbits  # type: ignore[attr-defined]


def sample(rng: random.Random, population: Sequence[T], k: int) -> list[T]:
    """``rng.sample(population, k)``: the same draws and result, without its per-call checks.

    It runs for every query (the sampler's ``r_probe`` draws), where ``Random.sample``'s argument
    checks and set-up cost more than the draws. For a generator that draws indices as a plain
    ``random.Random`` does and ``k <= 5``, ``Random.sample``'s two methods run here with those draws
    inline, bit for bit (pinned by ``tests/core/test_probe_pool.py``); anything else goes to
    ``rng.sample`` itself.
    """
    n = len(population)
    if k > 5 or not 0 <= k <= n or type(rng)._randbelow is not _RANDBELOW:  # type: ignore[attr-defined]
        return rng.sample(population, k)
    getrandbits = rng.getrandbits
    result: list[T] = []
    if n <= _SAMPLE_SETSIZE:  # draw below n, n - 1, ... from a copy, the drawn slot refilled from the end
        pool = list(population)
        for i in range(k):
            m = n - i
            bits = m.bit_length()
            j = getrandbits(bits)
            while j >= m:
                j = getrandbits(bits)
            result.append(pool[j])
            pool[j] = pool[m - 1]
        return result
    bits = n.bit_length()  # draw below n until an index not drawn yet comes
    selected: set[int] = set()
    for _ in range(k):
        j = getrandbits(bits)
        while j >= n or j in selected:
            j = getrandbits(bits)
        selected.add(j)
        result.append(population[j])
    return result


def randomized_round(x: float, rng: random.Random) -> int:
    """Round ``x`` down or up at random so that the expectation is exactly ``x``."""
    floor = math.floor(x)
    return int(floor) + (1 if rng.random() < x - floor else 0)


class FractionalRate:
    """Deterministic rounding of a fractional per-event rate (paper footnote 7).

    ``take(0.5)`` yields 0, 1, 0, 1, ...; over any k events the total is within 1 of ``k * rate``.
    """

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = 0.0

    def take(self, rate: float) -> int:
        self._carry += rate
        whole = int(self._carry + 1e-9)  # 1e-9: 0.1 * 10 must make 1, not 0.9999999
        self._carry -= whole
        return whole


# --- RIF history and the hot/cold threshold ----------------------------------------------------


# Whether this module runs compiled. There a call into ``bisect`` (argument parsing, a rich comparison
# per step) costs several times the loop below, which compiles to native integer comparisons; in plain
# Python it is the other way round, so each build takes its faster path, to the same result.
_COMPILED: Final = is_compiled(reuse_budget)


def _insort(values: list[int], x: int) -> None:
    """``bisect.insort(values, x)``: ``x`` inserted after any equal values, ``values`` sorted."""
    if not _COMPILED:
        insort(values, x)
        return
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < values[mid]:
            hi = mid
        else:
            lo = mid + 1
    values.insert(lo, x)


def _remove_sorted(values: list[int], x: int) -> None:
    """Remove one ``x`` (present) from the sorted ``values``: ``del values[bisect_left(values, x)]``."""
    if not _COMPILED:
        del values[bisect_left(values, x)]
        return
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) >> 1
        if values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    values.pop(lo)


class RifHistory:
    """The RIFs of recent probe responses, bounded in count and in time.

    The quantile is taken over this history, not over the pool: a quantile of the pool is itself a
    pool member, so "every probe is hot" could never happen (prequal-spec.md section 13.4).

    The samples are also kept sorted as they come and go (one ``insort`` per sample in, one deletion
    per sample out), so the threshold each query asks for is one index, not a sort of the history.
    """

    __slots__ = ("_samples", "_size", "_window_s", "_sorted", "_cached_at", "_cached_q", "_cached")

    def __init__(self, size: int, window_s: float) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self._size = size
        self._window_s = window_s
        self._sorted: list[int] = []
        # The last threshold, for (now, q): a query asks twice at the same time (pick, then the worst
        # to remove). Any change of the samples forgets it (NaN equals no time).
        self._cached_at = math.nan
        self._cached_q = math.nan
        self._cached = math.inf

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, rif: object, now: float) -> None:
        """Record one probe RIF; one that is not an int in [0, ``MAX_REPORTED_RIF``] is ignored."""
        report = checked_report(rif, 0.0)
        if report is not None:
            self.add_valid(report[0], now)

    def add_valid(self, rif: int, now: float) -> None:
        """``add`` for a RIF already checked by ``checked_report`` (the pool's own inflow)."""
        if len(self._samples) >= self._size:
            self._drop_oldest()
        self._samples.append((now, rif))
        _insort(self._sorted, rif)
        self._cached_at = _NAN

    def _drop_oldest(self) -> None:
        _, rif = self._samples.popleft()
        _remove_sorted(self._sorted, rif)  # both callers forget (or recompute) the cached threshold

    def threshold(self, q: float, now: float) -> float:
        """θ = ``sorted[floor(q * (len - 1))]`` over fresh samples; ``inf`` when q is 1 or nothing is fresh."""
        if now == self._cached_at and q == self._cached_q:
            return self._cached
        samples = self._samples
        horizon = now - self._window_s
        while samples and samples[0][0] < horizon:
            self._drop_oldest()
        if q >= 1.0 or not samples:
            theta = _INF
        else:
            ordered = self._sorted
            theta = float(ordered[int(q * (len(ordered) - 1))])
        self._cached_at, self._cached_q, self._cached = now, q, theta
        return theta


# --- the pool ----------------------------------------------------------------------------------


class ProbeEntry:
    """One pooled probe result. ``rif`` includes the +1 compensation for each query sent on it."""

    __slots__ = ("backend", "received_at", "rif", "latency_s", "uses_left")

    def __init__(self, backend: BackendId, received_at: float, rif: int, latency_s: float, uses_left: int) -> None:
        self.backend = backend
        self.received_at = received_at
        self.rif = rif
        self.latency_s = latency_s
        self.uses_left = uses_left

    def __repr__(self) -> str:
        return (
            f"ProbeEntry({self.backend!r}, received_at={self.received_at}, rif={self.rif}, "
            f"latency_s={self.latency_s}, uses_left={self.uses_left})"
        )


class ProbePool:
    """At most ``pool_size`` probe results, one per backend, with HCL selection.

    Parameters:
        settings: Prequal's parameters.
        rng: the source of every random choice; pass a seeded one for deterministic tests.
    """

    def __init__(self, settings: PrequalSettings, rng: random.Random) -> None:
        self._settings = settings
        self.rng = rng
        # The parameters read on every query, copied once: compiled, each read of a ``settings`` field
        # is a lookup in a Python object, and a query made several (``settings`` never changes).
        self._max_age_s = settings.max_age_s
        self._fallback_below = settings.fallback_below
        self._q_rif = settings.q_rif
        self._pool_size = settings.pool_size
        self._probes_per_query = settings.probes_per_query
        self._removals_per_query = settings.removals_per_query
        self.history = RifHistory(settings.rif_history_size, settings.rif_history_window_s)
        # Insertion order is receipt order (a replaced probe is re-inserted), so the first entry is
        # always the oldest and eviction / expiry pop from the front.
        self._entries: dict[BackendId, ProbeEntry] = {}
        self._probe_rate = FractionalRate()
        self._removal_rate = FractionalRate()
        self._remove_oldest_next = True
        self._budget_for = -1  # the n_available the reuse budget below was computed for
        self._budget_whole = 1  # the budget's integer part
        self._budget_part = 0.0  # and its fraction: the chance of one use more

    @property
    def settings(self) -> PrequalSettings:
        """Prequal's parameters, fixed when the pool was made."""
        return self._settings

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ProbeEntry]:
        return iter(list(self._entries.values()))

    def __contains__(self, backend: object) -> bool:
        return backend in self._entries

    def get(self, backend: BackendId) -> ProbeEntry | None:
        return self._entries.get(backend)

    # --- inflow --------------------------------------------------------------------------------

    def add(
        self, backend: BackendId, rif: object, latency_s: object, now: float, n_available: int
    ) -> ProbeEntry | None:
        """Pool a probe result received at ``now``; renews the backend's entry (the same object, moved to the
        newest place) or adds one, and evicts the oldest beyond m.

        A report out of range (``checked_report``) is ignored: ``None``, and nothing changes.
        """
        report = checked_report(rif, latency_s)
        if report is None:
            return None
        return self.add_valid(backend, report[0], report[1], now, n_available)

    def add_valid(self, backend: BackendId, rif: int, latency_s: float, now: float, n_available: int) -> ProbeEntry:
        """``add`` for a report already checked by ``checked_report`` (the policy checks what it receives)."""
        self.history.add_valid(rif, now)
        entries = self._entries
        entry = entries.pop(backend, None)
        if n_available != self._budget_for:  # Eq. 1 depends only on n here: computed when n changes
            s = self._settings
            budget = reuse_budget(
                s.pool_size, n_available, s.probes_per_query, s.removals_per_query, s.drift, s.max_reuse
            )
            self._budget_whole = math.floor(budget)
            self._budget_part = budget - self._budget_whole
            self._budget_for = n_available
        # randomized_round(budget) inline (one draw, as there): this runs for every pooled probe.
        uses = self._budget_whole + (1 if self.rng.random() < self._budget_part else 0)
        if entry is None:
            entry = ProbeEntry(backend, now, rif, latency_s, max(1, uses))
        else:  # the backend's older entry, renewed and re-inserted last (receipt order): no allocation
            entry.received_at, entry.rif, entry.latency_s, entry.uses_left = now, rif, latency_s, max(1, uses)
        entries[backend] = entry
        if len(entries) > self._pool_size:
            oldest = self._oldest()  # one in, at most one out: the pool was full before
            assert oldest is not None
            del entries[oldest.backend]
        return entry

    # --- outflow -------------------------------------------------------------------------------

    def discard(self, backend: BackendId) -> bool:
        """Drop the backend's entry (it failed a query, left, or was ejected)."""
        return self._entries.pop(backend, None) is not None

    def retain(self, backends: Container[BackendId]) -> None:
        """Drop every entry whose backend is not in ``backends``."""
        for backend in [b for b in self._entries if b not in backends]:
            del self._entries[backend]

    def expire(self, now: float) -> None:
        """Drop entries older than ``max_age_s``."""
        horizon = now - self._max_age_s
        entries = self._entries
        oldest = self._oldest()
        while oldest is not None and oldest.received_at < horizon:
            del entries[oldest.backend]
            oldest = self._oldest()

    def _oldest(self) -> ProbeEntry | None:
        """The first entry (the oldest: entries are kept in receipt order), or None."""
        for entry in self._entries.values():  # a loop, not next(iter(...)): compiled, it allocates nothing
            return entry
        return None

    def threshold(self, now: float) -> float:
        return self.history.threshold(self._q_rif, now)

    # --- selection -----------------------------------------------------------------------------

    def choose(
        self, now: float, exclude: Container[BackendId] = frozenset()
    ) -> tuple[BackendId, SelectionReason] | None:
        """``pick`` then ``use``: HCL selection that charges the chosen entry; ``None`` for the fallback."""
        picked = self.pick(now, exclude)
        if picked is None:
            return None
        entry, reason = picked
        self.use(entry)
        return entry.backend, reason

    def pick(
        self, now: float, exclude: Container[BackendId] = frozenset()
    ) -> tuple[ProbeEntry, SelectionReason] | None:
        """HCL selection over the pool, or ``None`` when fewer than ``fallback_below`` usable entries remain.

        Call ``expire`` (and ``retain``) first; entries of backends in ``exclude`` are not usable.
        Nothing is charged: call ``use`` on the entry once the query is really sent on it. Ties are
        broken by (latency, RIF) among cold probes and (RIF, latency) among hot ones, then at random.
        """
        entries = self._entries
        usable: Collection[ProbeEntry] = (
            [e for e in entries.values() if e.backend not in exclude] if exclude else entries.values()
        )
        if len(usable) < self._fallback_below:
            return None
        theta = self.threshold(now)
        best: ProbeEntry | None = None
        # The key, (latency, RIF) when cold and (RIF, latency) when hot, as two floats compared in turn:
        # the same order as the tuples (a RIF is at most MAX_REPORTED_RIF, exact as a float), without
        # building a tuple per entry.
        best1 = best2 = _INF
        ties = 0
        cold = False
        for entry in usable:
            rif = entry.rif
            if rif <= theta:
                if not cold:  # the first cold entry beats every hot one
                    cold, best, ties = True, None, 0
                k1, k2 = entry.latency_s, float(rif)
            elif cold:
                continue
            else:
                k1, k2 = float(rif), entry.latency_s
            if best is None or k1 < best1 or (k1 == best1 and k2 < best2):
                best, best1, best2, ties = entry, k1, k2, 1
            elif k1 == best1 and k2 == best2:
                ties += 1
                if self.rng.random() * ties < 1.0:  # reservoir sampling: each tie equally likely
                    best = entry
        assert best is not None
        return best, ("cold" if cold else "hot")

    def use(self, entry: ProbeEntry) -> None:
        """Charge a picked entry for the query sent on it: RIF up by one, reuse budget down by one (0: it leaves)."""
        entry.rif += 1
        entry.uses_left -= 1
        if entry.uses_left <= 0:
            self._entries.pop(entry.backend, None)

    def remove_per_query(self, now: float) -> list[BackendId]:
        """The ``r_remove`` removals that follow each query, alternating the oldest and the worst probe.

        The worst is the hot probe with the highest RIF if any probe is hot, else the cold probe with
        the highest latency.
        """
        removed: list[BackendId] = []
        self._remove(now, removed)
        return removed

    def begin_query(
        self, now: float, exclude: Container[BackendId] = frozenset()
    ) -> tuple[ProbeEntry, SelectionReason] | None:
        """A query's first step, in one call: ``expire``, then ``pick``."""
        self.expire(now)
        return self.pick(now, exclude)

    def end_query(self, now: float, chosen: ProbeEntry | None = None) -> int:
        """What follows each query, in one call: ``use(chosen)`` (the entry the query went on, if any),
        ``remove_per_query``, then ``probes_for_query``'s count."""
        if chosen is not None:
            self.use(chosen)
        self._remove(now, None)
        return self._probe_rate.take(self._probes_per_query)

    def _remove(self, now: float, removed: list[BackendId] | None) -> None:
        entries = self._entries
        for _ in range(self._removal_rate.take(self._removals_per_query)):
            if not entries:
                break
            if self._remove_oldest_next:
                oldest = self._oldest()
                assert oldest is not None
                victim = oldest.backend
            else:
                victim = self._worst(self.threshold(now))
            del entries[victim]
            if removed is not None:
                removed.append(victim)
            self._remove_oldest_next = not self._remove_oldest_next

    def _worst(self, theta: float) -> BackendId:
        worst: ProbeEntry | None = None
        worst_hot = False
        w1 = w2 = 0.0  # the worst's key, as in ``pick``: (RIF, latency) when hot, (latency, RIF) when cold
        for entry in self._entries.values():
            rif = entry.rif
            hot = rif > theta
            if hot:
                k1, k2 = float(rif), entry.latency_s
            else:
                k1, k2 = entry.latency_s, float(rif)
            if worst is None or (hot and not worst_hot):
                worst, worst_hot, w1, w2 = entry, hot, k1, k2
            elif hot == worst_hot and (k1 > w1 or (k1 == w1 and k2 > w2)):
                worst, w1, w2 = entry, k1, k2
        assert worst is not None
        return worst.backend

    def probes_for_query(self) -> int:
        """How many probes this query sends: ``r_probe`` rounded deterministically."""
        return self._probe_rate.take(self._probes_per_query)

"""Every rule of Prequal pinned by a test that fails when the rule is broken (issue 11).

Each test builds its case so that the rule under test makes a visible difference: where two candidates
could coincide by luck (the oldest probe and the worst one, say) the case keeps them apart. The bug
planted to check that each test goes red is listed in docs/testing.md.
"""

from __future__ import annotations

import random

import pytest

from prequal_middleware.core import (
    LoadTracker,
    LoadTrackerSettings,
    Member,
    Outcome,
    OutlierSettings,
    PrequalPolicy,
    PrequalSettings,
    ProbePool,
)

# --- helpers -----------------------------------------------------------------------------------


def make_pool(seed: int = 1, **settings: float) -> ProbePool:
    return ProbePool(PrequalSettings(**settings), random.Random(seed))  # type: ignore[arg-type]


def make_policy(
    n: int = 4,
    seed: int = 1,
    outliers: OutlierSettings | None = None,
    slow_start_s: float = 0.0,
    **settings: float | str,
) -> PrequalPolicy:
    prequal = PrequalSettings(**settings)  # type: ignore[arg-type]
    policy = PrequalPolicy(prequal, rng=random.Random(seed), outliers=outliers, slow_start_s=slow_start_s)
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


def hold(tracker: LoadTracker, rif: int, now: float) -> None:
    """Bring the tracker's requests in flight to ``rif`` (the tickets are never finished)."""
    while tracker.rif < rif:
        tracker.start(now)


def sample(tracker: LoadTracker, rif_before: int, latency_s: float, finished_at: float) -> None:
    """Record one latency sample tagged ``rif_before`` (call before ``hold``: the tracker must be idle)."""
    assert tracker.rif == 0
    held = [tracker.start(finished_at - latency_s) for _ in range(rif_before)]
    ticket = tracker.start(finished_at - latency_s)
    assert ticket.rif_at_arrival == rif_before
    tracker.finish(ticket, finished_at)
    for other in held:
        tracker.finish(other, finished_at, ok=False)  # counted out, never sampled


def history_rifs(policy: PrequalPolicy) -> list[int]:
    """The RIFs in the policy's history, oldest first (white-box: the history keeps no public view)."""
    return [rif for _, rif in policy.pool.history._samples]


# --- rule 1: removal alternates oldest and worst, oldest first ---------------------------------


def test_removal_takes_the_oldest_first_then_the_worst_when_they_differ() -> None:
    pool = make_pool(q_rif=1.0)  # nothing hot: the worst is the slowest
    pool.add("oldest-fast", 0, 0.001, now=0.0, n_available=100)
    pool.add("second-oldest", 0, 0.010, now=0.1, n_available=100)
    pool.add("slowest", 0, 0.900, now=0.2, n_available=100)
    pool.add("newest", 0, 0.020, now=0.3, n_available=100)
    pool.add("second-slowest", 0, 0.500, now=0.4, n_available=100)
    removed = [pool.remove_per_query(0.5) for _ in range(4)]
    assert removed == [["oldest-fast"], ["slowest"], ["second-oldest"], ["second-slowest"]]
    assert [e.backend for e in pool] == ["newest"]


def test_the_worst_is_the_hottest_by_rif_even_when_a_cold_probe_is_slower_and_older() -> None:
    pool = make_pool(q_rif=0.5)
    for rif in (0, 0, 0, 1, 1):
        pool.history.add(rif, now=0.0)  # theta = sorted[2] = 0: RIF >= 1 is hot
    pool.add("old-cold-slow", 0, 0.900, now=0.0, n_available=100)
    pool.add("hot-slow", 3, 0.800, now=0.1, n_available=100)
    pool.add("cold", 0, 0.700, now=0.2, n_available=100)
    pool.add("hot-fast", 9, 0.001, now=0.3, n_available=100)
    assert pool.threshold(0.3) == 0.0
    assert pool.remove_per_query(0.3) == ["old-cold-slow"]
    assert pool.remove_per_query(0.3) == ["hot-fast"], "hot first, and among hot the highest RIF, not the slowest"
    assert pool.remove_per_query(0.3) == ["hot-slow"], "oldest again"
    assert pool.remove_per_query(0.3) == ["cold"]


def test_worst_ties_are_broken_by_the_second_key() -> None:
    # Hot ties on RIF: the slower is worse. Cold ties on latency: the higher RIF is worse.
    pool = make_pool(q_rif=0.0)
    for _ in range(5):
        pool.history.add(1, now=0.0)  # theta = 1
    pool.add("oldest", 1, 0.001, now=0.0, n_available=100)
    pool.add("hot-fast", 5, 0.010, now=0.1, n_available=100)
    pool.add("hot-slow", 5, 0.020, now=0.2, n_available=100)
    pool.add("hot-fast2", 5, 0.010, now=0.3, n_available=100)
    assert pool.remove_per_query(0.3) == ["oldest"]
    assert pool.remove_per_query(0.3) == ["hot-slow"]

    cold = make_pool(q_rif=1.0)
    cold.add("oldest", 0, 0.001, now=0.0, n_available=100)
    cold.add("slow-low", 1, 0.050, now=0.1, n_available=100)
    cold.add("slow-high", 4, 0.050, now=0.2, n_available=100)
    cold.add("slow-low2", 1, 0.050, now=0.3, n_available=100)
    assert cold.remove_per_query(0.3) == ["oldest"]
    assert cold.remove_per_query(0.3) == ["slow-high"]


def test_two_removals_in_one_query_take_the_oldest_then_the_worst() -> None:
    pool = make_pool(q_rif=1.0, removals_per_query=2.0)
    pool.add("old", 0, 0.001, now=0.0, n_available=100)
    pool.add("slow", 0, 0.900, now=0.1, n_available=100)
    pool.add("new", 0, 0.002, now=0.2, n_available=100)
    assert pool.remove_per_query(0.2) == ["old", "slow"]
    pool.add("newer", 0, 0.003, now=0.3, n_available=100)
    pool.add("slower", 0, 0.950, now=0.4, n_available=100)
    assert pool.remove_per_query(0.4) == ["new", "slower"], "the alternation carries over between queries"


def test_removal_on_an_empty_pool_does_not_advance_the_alternation() -> None:
    pool = make_pool(q_rif=1.0)
    assert pool.remove_per_query(0.0) == []
    pool.add("old", 0, 0.001, now=0.0, n_available=100)
    pool.add("slow", 0, 0.900, now=0.1, n_available=100)
    pool.add("new", 0, 0.002, now=0.2, n_available=100)
    assert pool.remove_per_query(0.2) == ["old"], "still the oldest first"


def test_policy_queries_remove_the_oldest_then_the_worst() -> None:
    policy = make_policy(n=6, q_rif=1.0, probes_per_query=0.0, max_reuse=1)
    latencies = {"b0": 0.002, "b1": 0.800, "b2": 0.001, "b3": 0.003, "b4": 0.900, "b5": 0.004}
    for i, (backend, latency) in enumerate(latencies.items()):
        policy.on_probe(backend, now=i * 0.01, rif=0, latency_s=latency)
    first = policy.select(now=0.1)
    assert first is not None and first.backend == "b2"  # used once: it leaves the pool
    assert sorted(e.backend for e in policy.pool) == ["b1", "b3", "b4", "b5"], "then the oldest (b0) went"
    second = policy.select(now=0.1)
    assert second is not None and second.backend == "b3"
    assert sorted(e.backend for e in policy.pool) == ["b1", "b5"], "then the slowest (b4), not the oldest (b1)"


# --- rule 2: the server's latency estimate -----------------------------------------------------


def test_no_widening_when_the_exact_bucket_has_min_samples() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=3, max_widen=2))
    for latency in (0.010, 0.020, 0.030):
        sample(tracker, 2, latency, finished_at=1.0)
    for latency in (0.900, 0.900, 0.900):
        sample(tracker, 3, latency, finished_at=1.0)  # +1: widening would pull the median up
        sample(tracker, 4, latency, finished_at=1.0)  # +2
    hold(tracker, 2, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.020), "exactly min_samples at RIF 2: no widening"


def test_widens_to_plus_minus_one_below_min_samples_and_reads_both_sides() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=4, max_widen=2))
    sample(tracker, 1, 0.010, finished_at=1.0)  # -1
    sample(tracker, 2, 0.020, finished_at=1.0)  # exact
    sample(tracker, 2, 0.030, finished_at=1.0)  # exact
    sample(tracker, 3, 0.040, finished_at=1.0)  # +1
    for _ in range(3):
        sample(tracker, 4, 0.900, finished_at=1.0)  # +2: not needed
        sample(tracker, 0, 0.900, finished_at=1.0)  # -2: not needed
    hold(tracker, 2, now=1.0)
    # Exact bucket: 2 samples < 4. +-1 brings 4: the median of 10, 20, 30, 40 ms.
    assert tracker.estimate(1.0) == pytest.approx(0.025)


def test_widens_to_plus_minus_two_when_plus_minus_one_is_not_enough() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=3, max_widen=2))
    sample(tracker, 3, 0.010, finished_at=1.0)  # -2
    sample(tracker, 5, 0.040, finished_at=1.0)  # exact
    sample(tracker, 7, 0.030, finished_at=1.0)  # +2
    sample(tracker, 8, 0.990, finished_at=1.0)  # +3: beyond max_widen
    sample(tracker, 8, 0.990, finished_at=1.0)
    hold(tracker, 5, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.030), "the median of 10, 40 and 30 ms (+-1 alone: 40)"


def test_max_widen_bounds_the_search() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=3, max_widen=1))
    sample(tracker, 3, 0.500, finished_at=1.0)  # -2
    sample(tracker, 5, 0.020, finished_at=1.0)  # exact
    hold(tracker, 5, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.020), "RIF 3 is two away: beyond max_widen=1"


def test_nothing_fresh_nearby_reports_zero() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=3, max_widen=2))
    sample(tracker, 8, 0.500, finished_at=1.0)  # three buckets away from RIF 5
    hold(tracker, 5, now=1.0)
    assert tracker.estimate(1.0) == 0.0


def test_estimate_at_rif_zero_widens_upwards_only() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=2, max_widen=2))
    sample(tracker, 0, 0.010, finished_at=1.0)
    sample(tracker, 1, 0.030, finished_at=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.020)


def test_rif_one_reads_bucket_zero_when_widening() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=2, max_widen=1))
    sample(tracker, 0, 0.010, finished_at=1.0)
    sample(tracker, 0, 0.020, finished_at=1.0)
    hold(tracker, 1, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.015), "bucket 0 is a neighbour of RIF 1"


def test_the_top_bucket_widens_without_reading_past_the_end() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=3, max_widen=2))
    top = len(tracker._buckets) - 1
    tracker._rif = 10**12  # white-box: holding 10**12 tickets is not practical
    assert tracker._bucket_of(tracker.rif) == top
    assert tracker.estimate(1.0) == 0.0


def test_stale_samples_are_excluded_at_exactly_the_window_edge() -> None:
    tracker = LoadTracker(LoadTrackerSettings(window_s=1.0, window_service_times=0.0, min_samples=1, max_widen=0))
    sample(tracker, 0, 0.300, finished_at=1.0)
    sample(tracker, 0, 0.100, finished_at=2.0)
    # now=3.0: horizon 2.0. Finished exactly window_s ago is still fresh; 1.0 is stale.
    assert tracker.estimate(3.0) == pytest.approx(0.100)
    assert tracker.estimate(2.0) == pytest.approx(0.200), "both fresh at 2.0: the 1.0 one is exactly at the edge"
    assert tracker.estimate(3.0 + 2**-20) == 0.0, "just past the edge: nothing fresh"


def test_stale_samples_do_not_count_towards_min_samples() -> None:
    tracker = LoadTracker(LoadTrackerSettings(window_s=1.0, window_service_times=0.0, min_samples=2, max_widen=1))
    sample(tracker, 2, 0.700, finished_at=1.0)  # stale at 2.5
    sample(tracker, 2, 0.700, finished_at=1.0)  # stale at 2.5
    sample(tracker, 2, 0.010, finished_at=2.0)  # fresh, exact
    sample(tracker, 3, 0.030, finished_at=2.0)  # fresh, +1
    hold(tracker, 2, now=2.5)
    assert tracker.estimate(2.5) == pytest.approx(0.020), "one fresh sample at RIF 2: widen, stale ones ignored"


def test_log_buckets_above_exact_buckets_share_and_widen() -> None:
    settings = LoadTrackerSettings(exact_buckets=4, min_samples=2, max_widen=1)
    tracker = LoadTracker(settings)
    # exact_buckets=4: RIF 0-3 exact, 4-7 one bucket, 8-15 the next, 16-31 the one after.
    assert [tracker._bucket_of(r) for r in (3, 4, 7, 8, 15, 16, 31, 32)] == [3, 4, 4, 5, 5, 6, 6, 7]
    sample(tracker, 4, 0.040, finished_at=1.0)  # bucket 4
    sample(tracker, 9, 0.080, finished_at=1.0)  # bucket 5
    sample(tracker, 14, 0.100, finished_at=1.0)  # bucket 5
    sample(tracker, 20, 0.900, finished_at=1.0)  # bucket 6
    hold(tracker, 12, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.090), "RIF 12 shares bucket 5 with 9 and 14: enough"
    other = LoadTracker(settings)
    sample(other, 6, 0.050, finished_at=1.0)  # bucket 4
    sample(other, 9, 0.070, finished_at=1.0)  # bucket 5, one away from RIF 5's bucket
    sample(other, 16, 0.900, finished_at=1.0)  # bucket 6, two away
    hold(other, 5, now=1.0)
    assert other.estimate(1.0) == pytest.approx(0.060)


def test_log_buckets_when_exact_buckets_is_not_a_power_of_two() -> None:
    tracker = LoadTracker(LoadTrackerSettings(exact_buckets=5))
    assert [tracker._bucket_of(r) for r in (4, 5, 7, 8, 15, 16)] == [4, 5, 5, 6, 6, 7]


# --- rule 3: max probe age at selection time ---------------------------------------------------


def test_an_entry_past_max_age_is_not_chosen_even_as_one_of_two() -> None:
    policy = make_policy(n=2, q_rif=1.0, probes_per_query=0.0, max_age_s=1.0)
    policy.on_probe("b0", now=0.0, rif=0, latency_s=0.001)  # the best, but it will be too old
    policy.on_probe("b1", now=0.5, rif=0, latency_s=0.500)
    policy.on_start("b0", now=0.5)  # the fallback (fewest in flight) then prefers b1: no luck either way
    selection = policy.select(now=1.2)
    assert selection is not None and (selection.backend, selection.reason) == ("b1", "fallback")
    assert "b0" not in policy.pool


def test_an_entry_past_max_age_loses_to_worse_fresh_ones() -> None:
    policy = make_policy(n=3, q_rif=1.0, probes_per_query=0.0, max_age_s=1.0)
    policy.on_probe("b0", now=0.0, rif=0, latency_s=0.001)
    policy.on_probe("b1", now=0.5, rif=0, latency_s=0.500)
    policy.on_probe("b2", now=0.6, rif=0, latency_s=0.300)
    selection = policy.select(now=1.0 + 2**-20)
    assert selection is not None and (selection.backend, selection.reason) == ("b2", "cold")


def test_an_entry_exactly_max_age_old_is_still_usable() -> None:
    policy = make_policy(n=3, q_rif=1.0, probes_per_query=0.0, max_age_s=1.0)
    policy.on_probe("b0", now=0.5, rif=0, latency_s=0.001)
    policy.on_probe("b1", now=0.6, rif=0, latency_s=0.500)
    selection = policy.select(now=1.5)
    assert selection is not None and (selection.backend, selection.reason) == ("b0", "cold")


# --- rule 4: select, then remove ----------------------------------------------------------------


def test_select_before_remove_keeps_a_two_entry_pool_out_of_the_fallback() -> None:
    policy = make_policy(n=4, q_rif=1.0, probes_per_query=0.0, removals_per_query=1.0)
    policy.on_probe("b0", now=0.0, rif=0, latency_s=0.020)
    policy.on_probe("b1", now=0.1, rif=0, latency_s=0.010)
    selection = policy.select(now=0.2)
    assert selection is not None and (selection.backend, selection.reason) == ("b1", "cold")


def test_select_before_remove_when_the_oldest_is_the_best() -> None:
    policy = make_policy(n=4, q_rif=1.0, probes_per_query=0.0, removals_per_query=1.0)
    policy.on_probe("b0", now=0.0, rif=0, latency_s=0.001)  # oldest and best
    policy.on_probe("b1", now=0.1, rif=0, latency_s=0.020)
    policy.on_probe("b2", now=0.2, rif=0, latency_s=0.030)
    selection = policy.select(now=0.3)
    assert selection is not None and (selection.backend, selection.reason) == ("b0", "cold")
    assert [e.backend for e in policy.pool] == ["b2"], "b0 spent its one use, then the oldest left (b1)"


# --- rule 5: every probe answer feeds the RIF history ---------------------------------------------


def test_an_answer_for_a_pooled_backend_feeds_the_history() -> None:
    policy = make_policy(n=4)
    policy.on_probe("b0", now=0.0, rif=9, latency_s=0.01)
    policy.on_probe("b0", now=0.1, rif=1, latency_s=0.01)  # replaces the pooled entry
    assert history_rifs(policy) == [9, 1]


def test_answers_evicted_from_the_pool_still_count_in_the_history() -> None:
    policy = make_policy(n=4, pool_size=2)
    for backend, rif in (("b0", 7), ("b1", 1), ("b2", 2)):
        policy.on_probe(backend, now=0.0, rif=rif, latency_s=0.01)
    assert "b0" not in policy.pool
    assert history_rifs(policy) == [7, 1, 2]


def test_the_hot_threshold_uses_answers_that_left_the_pool() -> None:
    # b0's earlier answers (replaced in the pool) lift the threshold so that b1 is cold. A threshold
    # taken over the pool alone ([2, 3, 5, 12] -> 3) would make b1 hot and pick b3.
    policy = make_policy(n=4, q_rif=0.5, probes_per_query=0.0)
    for t in (0.0, 0.1, 0.2):
        policy.on_probe("b0", now=t, rif=10, latency_s=0.001)
    policy.on_probe("b1", now=0.3, rif=5, latency_s=0.050)
    policy.on_probe("b2", now=0.3, rif=2, latency_s=0.090)
    policy.on_probe("b3", now=0.3, rif=3, latency_s=0.080)
    policy.on_probe("b0", now=0.3, rif=12, latency_s=0.001)  # hot whatever the rule
    # History 10, 10, 10, 5, 2, 3, 12 -> sorted 2 3 5 10 10 10 12, theta = sorted[3] = 10.
    assert policy.pool.threshold(0.3) == 10.0
    selection = policy.select(now=0.3)
    assert selection is not None and (selection.backend, selection.reason) == ("b1", "cold")


def test_an_averse_candidates_answer_feeds_the_history_but_is_not_pooled() -> None:
    policy = make_policy(n=4, outliers=OutlierSettings(consecutive_failures=0))
    for _ in range(3):
        policy.on_finish("b0", now=0.0, latency_s=0.001, outcome=Outcome.FAILURE)
    assert policy.outliers.is_averse("b0", 0.0)
    policy.on_probe("b0", now=0.0, rif=6, latency_s=0.001)
    assert "b0" not in policy.pool
    assert history_rifs(policy) == [6]


@pytest.mark.parametrize("kind", ["unhealthy", "draining", "ejected", "removed"])
def test_an_answer_from_a_non_candidate_does_not_feed_the_history(kind: str) -> None:
    policy = make_policy(n=4, outliers=OutlierSettings(consecutive_failures=1, panic_threshold=0.0))
    make_ineligible(policy, "b0", kind, now=0.0)
    policy.on_probe("b0", now=0.0, rif=50, latency_s=0.001)
    assert history_rifs(policy) == []


# --- rule 6: Eq. 1 counts the candidates, not the members -----------------------------------------


def test_reuse_budget_uses_the_number_of_candidates() -> None:
    # m=4, r_probe=3, r_remove=1, drift=6. Over 20 members: (1 - 4/20) * 3 - 1 = 1.4, 7 / 1.4 = 5, capped
    # at 4. Over the 3 candidates: (1 - 4/3) * 3 - 1 < 0, so 1.
    outliers = OutlierSettings(consecutive_failures=1, max_ejected_share=1.0, panic_threshold=0.0)
    settings = PrequalSettings(pool_size=4, probes_per_query=3.0, removals_per_query=1.0, drift=6.0, max_reuse=4)
    policy = PrequalPolicy(settings, rng=random.Random(1), outliers=outliers)
    members = [Member(f"b{i}", draining=6 <= i < 12) for i in range(20)]
    policy.set_members(members, now=0.0)
    for i in range(6):
        policy.on_finish(f"b{i}", now=0.0, latency_s=0.001, outcome=Outcome.FAILURE)  # ejected
    for i in range(12, 17):
        policy.set_health(f"b{i}", False, now=0.0)
    assert sorted(policy.candidates(0.0)) == ["b17", "b18", "b19"]
    policy.on_probe("b17", now=0.0, rif=0, latency_s=0.01)
    entry = policy.pool.get("b17")
    assert entry is not None and entry.uses_left == 1
    # Control: the same settings with all 20 eligible give 4 uses.
    control = PrequalPolicy(settings, rng=random.Random(1))
    control.set_members([Member(f"b{i}") for i in range(20)], now=0.0)
    control.on_probe("b17", now=0.0, rif=0, latency_s=0.01)
    control_entry = control.pool.get("b17")
    assert control_entry is not None and control_entry.uses_left == 4


# --- rule 7: eligibility -------------------------------------------------------------------------


def make_ineligible(policy: PrequalPolicy, backend: str, kind: str, now: float) -> None:
    """Take ``backend`` out of the candidates: unhealthy, draining, ejected or removed from the members."""
    if kind == "unhealthy":
        policy.set_health(backend, False, now)
    elif kind == "draining":
        policy.set_members([Member(b, draining=b == backend) for b in policy.members], now)
    elif kind == "ejected":
        policy.on_finish(backend, now, latency_s=0.001, outcome=Outcome.FAILURE)
        assert policy.outliers.is_ejected(backend, now)
    elif kind == "removed":
        policy.set_members([Member(b) for b in policy.members if b != backend], now)
    else:  # pragma: no cover
        raise AssertionError(kind)
    assert backend not in policy.candidates(now)


def test_ineligible_backends_are_never_probed() -> None:
    outliers = OutlierSettings(consecutive_failures=1, max_ejected_share=1.0, panic_threshold=0.0)
    policy = make_policy(n=7, outliers=outliers, probes_per_query=3.0, max_idle_s=0.05)
    make_ineligible(policy, "b0", "unhealthy", now=0.0)
    make_ineligible(policy, "b1", "draining", now=0.0)
    make_ineligible(policy, "b2", "ejected", now=0.0)
    probed: set[str] = set()
    chosen: set[str] = set()
    for k in range(300):
        now = k * 0.001
        selection = policy.select(now)
        assert selection is not None
        chosen.add(selection.backend)
        probed.update(selection.probes)
        probed.update(policy.idle_probes(now + 0.0005))
    for k in range(10):  # b2's ejection lasts until 1.0
        probed.update(policy.idle_probes(0.3 + k * 0.06))
    assert probed == {"b3", "b4", "b5", "b6"}
    assert chosen <= {"b3", "b4", "b5", "b6"}


@pytest.mark.parametrize("kind", ["unhealthy", "draining", "ejected", "removed"])
def test_a_late_answer_from_a_non_candidate_is_not_pooled(kind: str) -> None:
    policy = make_policy(n=4, q_rif=1.0, probes_per_query=0.0, outliers=OutlierSettings(consecutive_failures=1))
    make_ineligible(policy, "b0", kind, now=0.0)
    policy.on_probe("b0", now=0.1, rif=0, latency_s=0.0001)  # the best answer, if it counted
    policy.on_probe("b1", now=0.1, rif=0, latency_s=0.010)
    policy.on_probe("b2", now=0.1, rif=0, latency_s=0.020)
    assert "b0" not in policy.pool
    selection = policy.select(now=0.2)
    assert selection is not None and (selection.backend, selection.reason) == ("b1", "cold")


@pytest.mark.parametrize("kind", ["unhealthy", "draining", "ejected", "removed"])
def test_the_pool_drops_a_backend_that_leaves_the_candidates(kind: str) -> None:
    policy = make_policy(n=4, q_rif=1.0, probes_per_query=0.0, outliers=OutlierSettings(consecutive_failures=1))
    policy.on_probe("b0", now=0.0, rif=0, latency_s=0.0001)  # the best
    policy.on_probe("b1", now=0.0, rif=0, latency_s=0.010)
    policy.on_probe("b2", now=0.0, rif=0, latency_s=0.020)
    make_ineligible(policy, "b0", kind, now=0.1)
    assert "b0" not in policy.pool
    selection = policy.select(now=0.2)
    assert selection is not None and (selection.backend, selection.reason) == ("b1", "cold")


def test_an_ejected_backend_is_probed_again_once_it_returns() -> None:
    outliers = OutlierSettings(consecutive_failures=1, base_ejection_s=1.0, panic_threshold=0.0)
    policy = make_policy(n=2, outliers=outliers, probes_per_query=2.0)
    make_ineligible(policy, "b0", "ejected", now=0.0)
    during = policy.select(now=0.5)
    assert during is not None and during.probes == ("b1",)
    after = policy.select(now=1.0)
    assert after is not None and sorted(after.probes) == ["b0", "b1"]


# --- bug fixes: slow start, stale text, the paper's preset ----------------------------------------


def warming_policy(seed: int) -> PrequalPolicy:
    """b4 joins at 0.0 and warms up over 10 s; its probe is the pool's best."""
    policy = make_policy(n=4, seed=seed, slow_start_s=10.0, q_rif=1.0, probes_per_query=0.0, removals_per_query=0.0)
    policy.candidates(0.0)  # the baseline: b0-b3 are not slowed
    policy.set_members([Member(f"b{i}") for i in range(5)], now=0.0)
    for i in range(5):
        policy.on_probe(f"b{i}", now=0.0, rif=0, latency_s=0.001 if i == 4 else 0.010 * (i + 1))
    return policy


def test_slow_start_does_not_charge_the_probe_of_the_backend_it_skips() -> None:
    redirected = kept = 0
    for seed in range(40):
        policy = warming_policy(seed)
        selection = policy.select(now=0.1)
        assert selection is not None
        if selection.backend == "b4":
            kept += 1
            assert "b4" not in policy.pool, "used: its one use is spent"
        else:
            redirected += 1
            entry = policy.pool.get("b4")
            assert entry is not None, "skipped by slow start: its probe must stay"
            assert (entry.rif, entry.uses_left) == (0, 1), "and stay uncharged"
            others = {e.backend: (e.rif, e.uses_left) for e in policy.pool if e.backend != "b4"}
            assert others == {f"b{i}": (0, 1) for i in range(4)}, "no other probe was used either"
    assert redirected >= 30 and kept >= 1, (redirected, kept)  # at 1% of the ramp, 10% of choices stay


def test_slow_start_redirects_the_fallback_too_and_counts_one_selection() -> None:
    policy = make_policy(n=4, seed=3, slow_start_s=10.0, probes_per_query=0.0, fallback="random")
    policy.candidates(0.0)
    policy.set_members([Member(f"b{i}") for i in range(5)], now=0.0)
    picks = [s.backend for s in (policy.select(now=0.1) for _ in range(2000)) if s is not None]
    assert 0.01 < picks.count("b4") / 2000 < 0.04, "a fifth of the random choices, of which 10% kept: ~2%"
    assert policy.selections["fallback"] == 2000


def test_no_core_text_calls_the_fallback_uniformly_random() -> None:
    from pathlib import Path

    import prequal_middleware.core as core

    stale = ("random fallback", "so a uniformly random backend")
    for path in sorted(Path(core.__file__).parent.glob("*.py")):
        text = " ".join(path.read_text(encoding="utf-8").lower().split())
        for phrase in stale:
            assert phrase not in text, f"{path.name} still says {phrase!r}"


def test_paper_preset_has_the_papers_testbed_values() -> None:
    paper = PrequalSettings.paper()
    assert paper.pool_size == 16
    assert paper.max_age_s == 1.0
    assert paper.probes_per_query == 3.0
    assert paper.removals_per_query == 1.0
    assert paper.drift == 1.0
    assert paper.q_rif == 2**-0.25
    assert paper.fallback == "random"
    assert paper.fallback_below == 2
    assert paper.max_reuse == 2
    defaults = PrequalSettings()
    assert (paper.rif_history_size, paper.rif_history_window_s, paper.max_idle_s) == (
        defaults.rif_history_size,
        defaults.rif_history_window_s,
        defaults.max_idle_s,
    )
    assert isinstance(paper, PrequalSettings)


def test_paper_preset_gives_the_worked_reuse_budget() -> None:
    from prequal_middleware.core import reuse_budget

    p = PrequalSettings.paper()
    budget = reuse_budget(p.pool_size, 100, p.probes_per_query, p.removals_per_query, p.drift, p.max_reuse)
    assert budget == pytest.approx(1.316, abs=1e-3), "under the cap: the preset behaves as the paper at n=100"
    assert reuse_budget(p.pool_size, 24, p.probes_per_query, p.removals_per_query, p.drift, p.max_reuse) == 1.0

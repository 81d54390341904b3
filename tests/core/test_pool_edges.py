"""Boundaries and exact ties of the pool, the policy and the estimator (found by mutation testing).

Random draws are pinned with ``FixedRandom``: ``random()`` is in [0, 1), so a draw of exactly 0.0 or
exactly ``1 / ties`` is legal and must not change a strict comparison into a loose one.
"""

from __future__ import annotations

import math
import random

from prequal_middleware.core import (
    LoadTracker,
    LoadTrackerSettings,
    Member,
    Outcome,
    OutlierSettings,
    PrequalPolicy,
    PrequalSettings,
    ProbePool,
    RifHistory,
)
from prequal_middleware.core.probe_pool import randomized_round


class FixedRandom(random.Random):
    """A ``random.Random`` whose ``random()`` always returns ``value`` (``sample`` still works)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def make_pool(rng: random.Random | None = None, **settings: float) -> ProbePool:
    return ProbePool(PrequalSettings(**settings), rng or random.Random(1))  # type: ignore[arg-type]


def make_policy(n: int = 4, rng: random.Random | None = None, **settings: float | str) -> PrequalPolicy:
    policy = PrequalPolicy(PrequalSettings(**settings), rng=rng or random.Random(1))  # type: ignore[arg-type]
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


# --- random draws at their edges ----------------------------------------------------------------


def test_randomized_round_never_rounds_an_integer_up() -> None:
    assert randomized_round(2.0, FixedRandom(0.0)) == 2
    assert randomized_round(2.25, FixedRandom(0.25)) == 2, "up only when the draw is below the fraction"
    assert randomized_round(2.25, FixedRandom(0.2499)) == 3


def test_a_two_way_tie_keeps_the_first_on_a_draw_of_one_half() -> None:
    pool = make_pool(FixedRandom(0.5), q_rif=1.0)
    pool.add("a", 0, 0.010, now=0.0, n_available=100)
    pool.add("b", 0, 0.010, now=0.0, n_available=100)
    assert pool.choose(0.0) == ("a", "cold"), "0.5 * 2 is not below 1: the second tie does not replace"
    low = make_pool(FixedRandom(0.4999), q_rif=1.0)
    low.add("a", 0, 0.010, now=0.0, n_available=100)
    low.add("b", 0, 0.010, now=0.0, n_available=100)
    assert low.choose(0.0) == ("b", "cold")


def test_least_in_flight_tie_keeps_the_first_on_a_draw_of_one_half() -> None:
    policy = make_policy(n=2, rng=FixedRandom(0.5), probes_per_query=0.0)
    selection = policy.select(now=0.0)
    assert selection is not None and (selection.backend, selection.reason) == ("b0", "fallback")
    other = make_policy(n=2, rng=FixedRandom(0.4999), probes_per_query=0.0)
    selection = other.select(now=0.0)
    assert selection is not None and selection.backend == "b1"


# --- HCL selection --------------------------------------------------------------------------------


def test_a_hot_probe_between_cold_ones_does_not_end_the_search() -> None:
    pool = make_pool(q_rif=0.5)
    for rif in (0, 0, 0, 5, 5):
        pool.history.add(rif, now=0.0)  # theta = 0
    pool.add("cold-slow", 0, 0.090, now=0.0, n_available=100)
    pool.add("hot", 5, 0.001, now=0.0, n_available=100)
    pool.add("cold-fast", 0, 0.010, now=0.0, n_available=100)
    assert pool.choose(0.0) == ("cold-fast", "cold")


def test_use_of_an_entry_that_left_the_pool_is_harmless() -> None:
    pool = make_pool(q_rif=1.0)
    pool.add("a", 0, 0.010, now=0.0, n_available=4)  # m >= n: used once
    pool.add("b", 0, 0.020, now=0.0, n_available=4)
    picked = pool.pick(0.0)
    assert picked is not None
    entry, reason = picked
    assert (entry.backend, reason) == ("a", "cold")
    assert (entry.rif, entry.uses_left) == (0, 1), "pick charges nothing"
    assert pool.discard("a") is True
    assert pool.discard("a") is False
    pool.use(entry)  # it failed a query in between, say: its last use finds nothing to remove
    assert (entry.rif, entry.uses_left) == (1, 0)
    assert [e.backend for e in pool] == ["b"]


# --- removal: exact ties and the threshold ----------------------------------------------------------


def test_worst_on_exact_ties_is_the_older_entry() -> None:
    pool = make_pool(q_rif=1.0)
    pool.add("oldest", 0, 0.001, now=0.0, n_available=100)
    pool.add("slow-1", 2, 0.500, now=0.1, n_available=100)
    pool.add("slow-2", 2, 0.500, now=0.2, n_available=100)
    assert pool.remove_per_query(0.2) == ["oldest"]
    assert pool.remove_per_query(0.2) == ["slow-1"]


def test_worst_treats_rif_equal_to_theta_as_cold() -> None:
    pool = make_pool(q_rif=0.5)
    for rif in (1, 1, 1):
        pool.history.add(rif, now=0.0)  # theta = 1
    pool.add("oldest", 0, 0.001, now=0.0, n_available=100)
    pool.add("at-theta", 1, 0.010, now=0.1, n_available=100)
    pool.add("cold-slow", 0, 0.900, now=0.2, n_available=100)
    assert pool.threshold(0.2) == 1.0
    assert pool.remove_per_query(0.2) == ["oldest"]
    assert pool.remove_per_query(0.2) == ["cold-slow"], "nothing is hot: the slowest goes"


# --- the RIF history ---------------------------------------------------------------------------------


def test_history_keeps_a_sample_exactly_at_the_window_edge() -> None:
    history = RifHistory(size=8, window_s=1.0)
    history.add(7, now=1.0)
    history.add(3, now=1.5)
    assert history.threshold(0.0, 2.0) == 3.0 and len(history) == 2, "received exactly window_s ago: still fresh"
    assert history.threshold(0.0, 2.0 + 2**-20) == 3.0 and len(history) == 1


def test_the_pool_history_is_bounded_by_rif_history_size() -> None:
    pool = make_pool(rif_history_size=2, q_rif=0.0)
    pool.add("a", 0, 0.010, now=0.0, n_available=100)
    pool.add("b", 5, 0.010, now=0.0, n_available=100)
    pool.add("c", 6, 0.010, now=0.0, n_available=100)
    assert len(pool.history) == 2 and pool.threshold(0.0) == 5.0, "the RIF 0 answer fell out of the ring"


# --- the policy: idle probing, local mode, forgetting, snapshot ------------------------------------------


def test_idle_probing_fires_exactly_at_max_idle() -> None:
    policy = make_policy(n=4, probes_per_query=0.0, max_idle_s=0.5)
    policy.select(now=1.0)
    assert policy.idle_probes(now=1.25) == ()
    assert len(policy.idle_probes(now=1.5)) == 1, "0.5 s idle is max_idle_s: probe"


def test_idle_probing_sends_at_least_one_probe_and_counts_them() -> None:
    policy = make_policy(n=4, probes_per_query=0.5, max_idle_s=0.5)
    assert len(policy.idle_probes(now=0.0)) == 1, "ceil(0.5) = 1"
    assert len(policy.idle_probes(now=0.5)) == 1
    assert policy.snapshot(0.5).probes_requested == 2
    busy = make_policy(n=6, probes_per_query=2.5, max_idle_s=0.5)
    selection = busy.select(now=0.0)
    assert selection is not None
    sent = len(selection.probes) + len(busy.idle_probes(now=0.5))
    assert sent == 2 + 3 and busy.snapshot(0.5).probes_requested == 5


def test_local_mode_probes_use_the_measured_latency_or_zero() -> None:
    policy = make_policy(n=3, probes_per_query=3.0, q_rif=1.0)
    for backend in ("b0", "b1"):
        policy.set_probe_mode(backend, "local", now=0.0)
    policy.on_start("b0", now=0.0)
    policy.on_finish("b0", now=0.05, latency_s=0.05, outcome=Outcome.SUCCESS)
    policy.select(now=0.1)
    b0, b1 = policy.pool.get("b0"), policy.pool.get("b1")
    assert b0 is not None and b0.latency_s == 0.05
    assert b1 is not None and b1.latency_s == 0.0, "nothing measured yet: 0, as the server estimator says"
    snapshot = {b.id: (b.rif, b.latency_s) for b in policy.snapshot(0.1).backends}
    assert snapshot["b0"] == (0, 0.05) and snapshot["b1"] == (0, None), "local mode shows the gateway's view"
    assert snapshot["b2"] == (None, None), "a remote backend never probed shows nothing"


def test_a_member_that_leaves_is_forgotten_at_once() -> None:
    policy = make_policy(n=3)
    policy.on_probe("b2", now=0.0, rif=4, latency_s=0.010)
    policy.set_members([Member("b0"), Member("b1")], now=0.0)
    assert "b2" not in policy.pool, "dropped when it leaves, before any query"
    policy.set_members([Member("b0"), Member("b1"), Member("b2")], now=0.0)
    back = {b.id: (b.rif, b.latency_s) for b in policy.snapshot(0.0).backends}["b2"]
    assert back == (None, None), "a returning member starts without its old probe"


def test_snapshot_reports_panic_probes_and_no_threshold_without_history() -> None:
    policy = PrequalPolicy(
        PrequalSettings(probes_per_query=2.0),
        rng=random.Random(1),
        outliers=OutlierSettings(panic_threshold=0.9),
    )
    policy.set_members([Member(f"b{i}") for i in range(4)], now=0.0)
    snap = policy.snapshot(0.0)
    assert snap.rif_threshold is None and snap.panic is False and snap.probes_requested == 0
    policy.set_health("b0", False, now=0.0)  # 3 of 4 healthy < 90%: panic
    selection = policy.select(now=0.0)
    assert selection is not None and selection.reason == "panic"
    snap = policy.snapshot(0.0)
    assert snap.panic is True and snap.probes_requested == 2 and snap.selections["panic"] == 1


def test_prequal_policy_has_no_slow_start_by_default() -> None:
    policy = PrequalPolicy(PrequalSettings(q_rif=1.0, probes_per_query=0.0), rng=random.Random(1))
    assert policy.slow_start_s == 0.0
    policy.set_members([Member("b0"), Member("b1")], now=0.0)
    policy.candidates(0.0)
    policy.set_members([Member("b0"), Member("b1"), Member("b2")], now=0.0)
    policy.on_probe("b2", now=0.0, rif=0, latency_s=0.001)
    policy.on_probe("b1", now=0.0, rif=0, latency_s=0.010)
    selection = policy.select(now=0.0)
    assert selection is not None and selection.backend == "b2", "a newcomer is not slowed"


# --- the estimator --------------------------------------------------------------------------------------


def test_estimator_bucket_boundary_at_exact_buckets() -> None:
    tracker = LoadTracker(LoadTrackerSettings(exact_buckets=4, min_samples=1, max_widen=0))
    assert tracker._bucket_of(3) == 3 and tracker._bucket_of(4) == 4
    assert math.isclose(tracker.estimate(0.0), 0.0)

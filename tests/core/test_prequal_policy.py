"""PrequalPolicy as the gateway drives it: per-query probing, idle probing, fallback, error aversion."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from prequal_middleware.core import Member, Outcome, OutlierSettings, PrequalPolicy, PrequalSettings


def make_policy(
    n: int = 10, seed: int = 1, outliers: OutlierSettings | None = None, **settings: float | str
) -> PrequalPolicy:
    prequal = PrequalSettings(**settings)  # type: ignore[arg-type]
    policy = PrequalPolicy(prequal, rng=random.Random(seed), outliers=outliers)
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


def answered(policy: PrequalPolicy, now: float) -> tuple[str, ...]:
    """One query's probe targets, each answered at once (so none is still in flight at the next query)."""
    selection = policy.select(now=now)
    assert selection is not None
    for target in selection.probes:
        policy.on_probe(target, now, 1, 0.001)
    return selection.probes


def test_each_query_asks_for_r_probe_distinct_targets() -> None:
    policy = make_policy(n=10, probes_per_query=3.0, report_max_age_s=0.0)  # the paper's rule: every draw probed
    for k in range(200):
        probes = answered(policy, k * 0.01)
        assert len(probes) == 3
        assert len(set(probes)) == 3, "sampled without replacement"


def test_probe_targets_are_uniform_over_eligible_members() -> None:
    policy = make_policy(n=5, probes_per_query=2.0, report_max_age_s=0.0)
    counts: Counter[str] = Counter()
    for k in range(5000):
        counts.update(answered(policy, k * 0.01))
    expected = 5000 * 2 / 5
    assert all(abs(c - expected) < 0.06 * expected for c in counts.values()), counts


def test_fractional_probe_rate_over_many_queries() -> None:
    policy = make_policy(n=10, probes_per_query=0.7, report_max_age_s=0.0)
    sent = sum(len(answered(policy, k * 0.001)) for k in range(1000))
    assert sent == 700


def test_probes_never_exceed_the_member_count() -> None:
    policy = make_policy(n=2, probes_per_query=5.0)
    selection = policy.select(now=0.0)
    assert selection is not None and sorted(selection.probes) == ["b0", "b1"]


def test_random_fallback_is_uniform_over_eligible_members_whatever_their_load() -> None:
    policy = make_policy(n=4, probes_per_query=0.0, fallback="random")
    for _ in range(5):
        policy.on_start("b0", now=0.0)
    counts = Counter(s.backend for s in (policy.select(now=0.0) for _ in range(4000)) if s is not None)
    assert policy.selections["fallback"] == 4000
    assert all(900 < c < 1100 for c in counts.values()), counts


def test_fallback_picks_the_fewest_requests_in_flight_ties_at_random() -> None:
    policy = make_policy(n=4, probes_per_query=0.0)
    assert policy.settings.fallback == "least_in_flight"
    counts = Counter(s.backend for s in (policy.select(now=0.0) for _ in range(4000)) if s is not None)
    assert all(900 < c < 1100 for c in counts.values()), f"all idle: uniform over the ties {counts}"
    for backend, n in (("b0", 3), ("b1", 1), ("b2", 1), ("b3", 2)):
        for _ in range(n):
            policy.on_start(backend, now=0.0)
    counts = Counter(s.backend for s in (policy.select(now=0.0) for _ in range(2000)) if s is not None)
    assert set(counts) == {"b1", "b2"} and min(counts.values()) > 900, counts
    # Each choice is sent: a gateway that sees all traffic fills the emptiest backend first.
    picks = []
    for _ in range(4):
        selection = policy.select(now=0.0)
        assert selection is not None and selection.reason == "fallback"
        policy.on_start(selection.backend, now=0.0)
        picks.append(selection.backend)
    assert sorted(picks[:2]) == ["b1", "b2"], picks  # 1 in flight each: both before anyone at 2
    assert len(set(picks[2:])) == 2 and set(picks[2:]) <= {"b1", "b2", "b3"}, picks  # then b1-b3 tie at 2


def test_selection_uses_probe_results() -> None:
    policy = make_policy(n=4, q_rif=0.84)
    for i, (rif, latency) in enumerate([(0, 0.050), (1, 0.010), (9, 0.001), (2, 0.030)]):
        policy.on_probe(f"b{i}", now=0.0, rif=rif, latency_s=latency)
    selection = policy.select(now=0.01)
    assert selection is not None and (selection.backend, selection.reason) == ("b1", "cold")


def test_idle_probing_after_max_idle() -> None:
    policy = make_policy(n=6, max_idle_s=0.5, probes_per_query=2.5)
    assert len(policy.idle_probes(now=0.0)) == 3, "nothing has happened yet: probe at once, ceil(2.5)"
    assert policy.idle_probes(now=0.3) == ()
    policy.select(now=0.4)
    assert policy.idle_probes(now=0.8) == (), "a query at 0.4 rearmed the idle timer"
    probes = policy.idle_probes(now=0.91)
    assert len(probes) == 3 and len(set(probes)) == 3
    assert policy.idle_probes(now=1.0) == (), "an idle round rearms the timer too"


def test_probes_from_non_members_are_ignored() -> None:
    policy = make_policy(n=2)
    policy.on_probe("stranger", now=0.0, rif=0, latency_s=0.001)
    assert "stranger" not in policy.pool


def test_failed_query_purges_the_backends_probe() -> None:
    policy = make_policy(n=4)
    policy.on_probe("b1", now=0.0, rif=0, latency_s=0.001)
    policy.on_start("b1", now=0.0)
    policy.on_finish("b1", now=0.001, latency_s=0.001, outcome=Outcome.FAILURE)
    assert "b1" not in policy.pool


def test_fast_failing_backend_is_averted() -> None:
    # b0 answers probes with zero load and fails every query instantly: the sinkhole.
    policy = make_policy(n=4, q_rif=0.84, outliers=OutlierSettings(consecutive_failures=0))
    now = 0.0
    picks: Counter[str] = Counter()
    for _ in range(2000):
        now += 0.001
        for i in range(4):
            policy.on_probe(f"b{i}", now=now, rif=0 if i == 0 else 3, latency_s=0.0001 if i == 0 else 0.020)
        selection = policy.select(now)
        assert selection is not None
        picks[selection.backend] += 1
        policy.on_start(selection.backend, now)
        outcome = Outcome.FAILURE if selection.backend == "b0" else Outcome.SUCCESS
        policy.on_finish(selection.backend, now, latency_s=0.0001, outcome=outcome)
    assert picks["b0"] / 2000 < 0.05, f"the sinkhole got {picks['b0']} of 2000 even with ejection off"


def test_failed_probe_is_not_pooled_and_purges() -> None:
    policy = make_policy(n=3)
    policy.on_probe("b2", now=0.0, rif=0, latency_s=0.01)
    policy.on_probe_failure("b2", now=0.1)
    assert "b2" not in policy.pool
    assert policy.outliers.consecutive_failures("b2") == 0, "a missed probe is not a failed request"


def test_missed_probes_never_eject() -> None:
    # A CPU stall longer than the probe timeout makes healthy backends miss probes in a row.
    policy = make_policy(n=4)
    for k in range(50):
        policy.on_probe_failure("b1", now=k * 0.01)
    assert not policy.outliers.is_ejected("b1", 1.0)
    assert "b1" in policy.candidates(1.0)
    assert policy.outliers.failure_rate("b1", 1.0) == 0.0


def fallback_picks(policy: PrequalPolicy, now: float, n: int = 400) -> Counter[str]:
    picks: Counter[str] = Counter()
    for _ in range(n):
        policy.pool.retain(frozenset())  # keep the pool empty: every choice is the fallback
        selection = policy.select(now)
        assert selection is not None and selection.reason == "fallback"
        picks[selection.backend] += 1
    return picks


def test_fallback_avoids_averse_and_unanswering_backends_while_others_remain() -> None:
    policy = make_policy(n=4, outliers=OutlierSettings(consecutive_failures=0))
    policy.on_finish("b0", now=1.0, latency_s=0.001, outcome=Outcome.FAILURE)
    policy.on_finish("b0", now=1.0, latency_s=0.001, outcome=Outcome.FAILURE)
    policy.on_finish("b0", now=1.0, latency_s=0.001, outcome=Outcome.FAILURE)
    assert policy.outliers.is_averse("b0", 1.0)
    policy.on_probe_failure("b1", now=1.0)
    picks = fallback_picks(policy, now=1.0)
    assert set(picks) == {"b2", "b3"}, picks
    assert min(picks.values()) > 150, "uniform over the trusted ones"
    # b1 answers again: it is trusted again. b0's failure rate decays back under the bound.
    policy.on_probe("b1", now=1.1, rif=0, latency_s=0.001)
    assert set(fallback_picks(policy, now=1.1)) == {"b1", "b2", "b3"}
    assert set(fallback_picks(policy, now=10.0)) == {"b0", "b1", "b2", "b3"}


def test_fallback_uses_everyone_when_no_backend_is_trusted() -> None:
    policy = make_policy(n=2)
    policy.on_probe_failure("b0", now=0.0)
    policy.on_probe_failure("b1", now=0.0)
    assert set(fallback_picks(policy, now=0.0)) == {"b0", "b1"}


def test_local_mode_backends_are_pooled_from_the_gateways_view() -> None:
    policy = make_policy(n=2, probes_per_query=2.0)
    policy.set_probe_mode("b0", "local", now=0.0)
    policy.on_start("b0", now=0.0)
    policy.on_start("b0", now=0.0)
    selection = policy.select(now=0.0)
    assert selection is not None and selection.probes == ("b1",), "no network probe for a local-mode backend"
    entry = policy.pool.get("b0")
    assert entry is not None and entry.rif == 2, "its RIF is the gateway's own in-flight count"
    assert next(b for b in policy.snapshot(0.0).backends if b.id == "b0").probe_mode == "local"


def test_exclude_is_honoured_in_fallback_and_pool() -> None:
    policy = make_policy(n=3, q_rif=1.0)
    for i in range(3):
        policy.on_probe(f"b{i}", now=0.0, rif=0, latency_s=0.001 * (i + 1))
    for _ in range(50):
        selection = policy.select(now=0.0, exclude={"b0"})
        assert selection is not None and selection.backend != "b0"


def test_removed_member_leaves_the_pool() -> None:
    policy = make_policy(n=3)
    for i in range(3):
        policy.on_probe(f"b{i}", now=0.0, rif=0, latency_s=0.01)
    policy.set_members([Member("b0"), Member("b1")], now=0.0)
    policy.select(now=0.0)
    assert "b2" not in policy.pool


def test_snapshot_reports_pool_and_threshold() -> None:
    policy = make_policy(n=3, q_rif=0.5)
    for i in range(3):
        policy.on_probe(f"b{i}", now=0.0, rif=i, latency_s=0.01)
    snap = policy.snapshot(now=0.0)
    assert (snap.policy, snap.pool_size, snap.pool_capacity, snap.rif_threshold) == ("prequal", 3, 16, 1.0)
    assert {b.id: b.rif for b in snap.backends} == {"b0": 0, "b1": 1, "b2": 2}


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_pools_still_select(n: int) -> None:
    policy = make_policy(n=n)
    selection = policy.select(now=0.0)
    assert selection is not None and selection.backend in {f"b{i}" for i in range(n)}

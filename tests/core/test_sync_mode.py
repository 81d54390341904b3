"""Prequal's sync mode in the core: the plan (who is probed, how many answers to wait for), HCL on the
answers (``sync_choice``), too few answers -> ``None`` (the caller's asynchronous choice), the settings."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from prequal_middleware.core import Member, OutlierSettings, PrequalPolicy, PrequalSettings, RifHistory
from prequal_middleware.core.prequal import SyncAnswer, SyncPlan, sync_choice


def history(*rifs: int, now: float = 0.0) -> RifHistory:
    h = RifHistory(128, 2.0)
    for rif in rifs:
        h.add(rif, now)
    return h


def make_policy(n: int = 5, seed: int = 1, **settings: object) -> PrequalPolicy:
    policy = PrequalPolicy(
        PrequalSettings(mode="sync", **settings),  # type: ignore[arg-type]
        rng=random.Random(seed),
        outliers=OutlierSettings(),
    )
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


# --- sync_choice: the pure rule -------------------------------------------------------------------


def test_cold_answers_win_by_latency() -> None:
    # History 0..9: with q = 0.6, theta = sorted[int(0.6 * 9)] = 5. b (rif 9) is hot though fastest.
    answers = [SyncAnswer("a", 4, 0.030), SyncAnswer("b", 9, 0.001), SyncAnswer("c", 5, 0.020)]
    assert sync_choice(answers, 0.0, history(*range(10)), 0.6, random.Random(1)) == ("c", "cold")


def test_all_hot_the_lowest_rif_wins() -> None:
    answers = [SyncAnswer("a", 40, 0.001), SyncAnswer("b", 20, 0.050), SyncAnswer("c", 30, 0.010)]
    assert sync_choice(answers, 0.0, history(*range(10)), 0.6, random.Random(1)) == ("b", "hot")


def test_no_history_everything_is_cold() -> None:
    answers = [SyncAnswer("a", 100, 0.002), SyncAnswer("b", 0, 0.009)]
    assert sync_choice(answers, 0.0, history(), 0.6, random.Random(1)) == ("a", "cold")


def test_too_few_answers_is_none() -> None:
    one = [SyncAnswer("a", 0, 0.001)]
    assert sync_choice(one, 0.0, history(1, 2), 0.6, random.Random(1)) is None
    assert sync_choice([], 0.0, history(1, 2), 0.6, random.Random(1)) is None


def test_ties_are_broken_at_random_reproducibly() -> None:
    answers = [SyncAnswer(b, 1, 0.005) for b in "abc"] + [SyncAnswer("d", 1, 0.006)]

    def picks(seed: int) -> list[str]:
        rng = random.Random(seed)
        out = []
        for _ in range(3000):
            picked = sync_choice(answers, 0.0, history(), 0.6, rng)
            assert picked is not None
            out.append(picked[0])
        return out

    counts = Counter(picks(7))
    assert set(counts) == {"a", "b", "c"}, "d is slower: never a tie"
    assert all(abs(c - 1000) < 120 for c in counts.values()), counts
    assert picks(7) == picks(7), "a seeded rng gives the same choices"


# --- the plan ---------------------------------------------------------------------------------------


def test_plan_draws_d_distinct_uniform_candidates_and_waits_for_d_minus_1() -> None:
    policy = make_policy(n=8, sync_probes=5)
    counts: Counter[str] = Counter()
    for k in range(4000):
        plan = policy.sync_plan(k * 0.001, exclude={"b7"})
        assert len(plan.probes) == 5 and len(set(plan.probes)) == 5
        assert plan.wait_for == 4 and not plan.local
        counts.update(plan.probes)
    assert "b7" not in counts
    expected = 4000 * 5 / 7
    assert all(abs(c - expected) < 0.05 * expected for c in counts.values()), counts


def test_plan_with_few_candidates() -> None:
    two = make_policy(n=2, sync_probes=3).sync_plan(0.0)
    assert sorted(two.probes) == ["b0", "b1"] and two.wait_for == 2, "one answer is no choice"
    one = make_policy(n=1).sync_plan(0.0)
    assert one == SyncPlan(0.0, (), (), 0), "nothing to choose between: no probe"


def test_local_mode_backends_answer_from_the_local_view() -> None:
    policy = make_policy(n=3, sync_probes=3)
    policy.set_probe_mode("b0", "local", 0.0)
    plan = policy.sync_plan(0.0)
    assert plan.local == ("b0",) and sorted(plan.probes) == ["b1", "b2"] and plan.wait_for == 1


# --- select_sync: answers through on_probe, then HCL --------------------------------------------------


def answer(policy: PrequalPolicy, plan: SyncPlan, loads: dict[str, tuple[int, float]], now: float) -> list[str]:
    for backend in plan.probes:
        if backend in loads:
            policy.on_probe(backend, now, *loads[backend])
    return [b for b in plan.probes if b in loads]


def test_select_sync_chooses_among_this_rounds_answers() -> None:
    policy = make_policy(n=3, sync_probes=3)
    for k in range(50):  # a history where RIF 1 is cold and 50 is hot
        policy.pool.history.add(k % 3, 0.0)
    plan = policy.sync_plan(0.001)
    got = answer(policy, plan, {"b0": (50, 0.001), "b1": (1, 0.004), "b2": (1, 0.003)}, 0.002)
    selection = policy.select_sync(plan, got, 0.003)
    assert selection is not None and selection.backend == "b2" and selection.reason == "cold"
    assert selection.probes == ()
    assert policy.sync_choices == 1 and policy.selections["cold"] == 1


def test_sync_choices_age_the_reports_in_queries() -> None:
    """``report_max_queries`` counts every query routed, sync choices included."""
    policy = make_policy(n=3, sync_probes=3, report_max_age_s=0.02, report_max_queries=2, max_idle_s=2.0)
    policy.on_report("b2", 1.0, 0, 0.001)  # b2's only report, before three sync choices
    for k in range(3):
        now = 1.01 + 0.01 * k
        plan = policy.sync_plan(now)
        got = answer(policy, plan, {"b0": (0, 0.001), "b1": (0, 0.002)}, now + 0.001)
        assert policy.select_sync(plan, got, now + 0.002) is not None
    # Past the probes' pending mark; b2's report is 0.6 s old (under max_idle_s) and 4 queries old.
    selection = policy.select(1.6)
    assert selection is not None and "b2" in selection.probes, "sync choices did not age the report"
    assert "b0" not in selection.probes and "b1" not in selection.probes, "2 queries old: still fresh"


def test_select_sync_too_few_answers_is_none_for_the_async_choice() -> None:
    policy = make_policy(n=3, sync_probes=3)
    plan = policy.sync_plan(0.0)
    got = answer(policy, plan, {plan.probes[0]: (0, 0.001)}, 0.001)
    assert policy.select_sync(plan, got, 0.002) is None
    assert policy.sync_fallbacks == 1
    assert policy.select(0.002) is not None, "the caller's fallback: the pool or the fallback rule"


def test_select_sync_ignores_older_reports_and_excluded_backends() -> None:
    policy = make_policy(n=3, sync_probes=3)
    policy.on_probe("b0", 0.0, 0, 0.001)  # before the plan: not this round's answer
    plan = policy.sync_plan(0.01)
    got = answer(policy, plan, {"b1": (3, 0.002), "b2": (3, 0.002)}, 0.011)
    assert policy.select_sync(plan, ["b0", *got], 0.012, exclude={"b1"}) is None, "b0 old, b1 excluded: one left"


def test_requests_sent_since_the_answer_count() -> None:
    # Two concurrent queries see the same answers: the second sees the first's request.
    policy = make_policy(n=2, sync_probes=2, q_rif=0.0)
    plan = policy.sync_plan(0.0)
    got = answer(policy, plan, {"b0": (0, 0.001), "b1": (0, 0.002)}, 0.001)
    first = policy.select_sync(plan, got, 0.002)
    assert first is not None and first.backend == "b0"
    policy.on_start("b0", 0.002)
    second = policy.select_sync(plan, got, 0.003)
    assert second is not None and second.backend == "b1", "b0's answer plus our request: now hot"


def test_the_chosen_backends_pooled_probe_is_charged() -> None:
    policy = make_policy(n=2, sync_probes=2, max_reuse=1)
    plan = policy.sync_plan(0.0)
    got = answer(policy, plan, {"b0": (0, 0.001), "b1": (5, 0.009)}, 0.001)
    assert len(policy.pool) == 2
    selection = policy.select_sync(plan, got, 0.002)
    assert selection is not None and selection.backend == "b0"
    assert "b0" not in policy.pool, "used once: its reuse budget of 1 is spent"


# --- settings -----------------------------------------------------------------------------------------


def test_default_is_async() -> None:
    assert PrequalSettings().mode == "async"


@pytest.mark.parametrize(
    ("field", "value"),
    [("mode", "eager"), ("sync_probes", 1), ("sync_probes", 2.5), ("sync_probes", True), ("sync_wait_s", 0.0)],
)
def test_invalid_sync_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        PrequalSettings(**{field: value})  # type: ignore[arg-type]

"""BasePolicy's bookkeeping: health, slow start, the local latency view, probe misses and snapshots."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Container, Sequence

import pytest

from prequal_middleware.core import BasePolicy, Member, Outcome, OutlierSettings, PrequalPolicy, Selection
from prequal_middleware.core.policy import SLOW_START_MIN_SHARE


class FixedRandom(random.Random):
    """``random()`` always returns ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class FirstPolicy(BasePolicy):
    """Always the lowest id, asking for a probe of it (to see that a redirect keeps the probes)."""

    name = "first"

    def _choose(self, candidates: Sequence[str], now: float, exclude: Container[str]) -> Selection:
        first = min(candidates)
        return Selection(first, "policy", (first,))


def first_policy(n: int, rng: random.Random | None = None, slow_start_s: float = 0.0, **kw: object) -> FirstPolicy:
    policy = FirstPolicy(rng=rng or random.Random(1), slow_start_s=slow_start_s, **kw)  # type: ignore[arg-type]
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


# --- health ---------------------------------------------------------------------------------------


def test_health_of_an_unknown_backend_is_ignored() -> None:
    policy = first_policy(2)
    policy.set_health("stranger", False, now=0.0)
    assert sorted(policy.candidates(0.0)) == ["b0", "b1"]


def test_a_backend_back_to_health_is_a_candidate_again() -> None:
    policy = first_policy(2)
    policy.set_health("b0", False, now=0.0)
    assert policy.candidates(0.0) == ["b1"]
    policy.set_health("b0", True, now=0.0)
    assert sorted(policy.candidates(0.0)) == ["b0", "b1"]


# --- slow start -----------------------------------------------------------------------------------------


def warming(slow_start_s: float, rng: random.Random, n_old: int = 3) -> FirstPolicy:
    """b0 joins at 0.0 after b1..b<n_old> (the baseline); FirstPolicy always proposes b0 first."""
    policy = FirstPolicy(rng=rng, slow_start_s=slow_start_s)
    policy.set_members([Member(f"b{i}") for i in range(1, n_old + 1)], now=0.0)
    policy.candidates(0.0)
    policy.set_members([Member("b0")] + [Member(f"b{i}") for i in range(1, n_old + 1)], now=0.0)
    policy.candidates(0.0)  # b0 starts warming now
    return policy


def test_a_newcomer_is_slowed_even_with_a_window_under_a_second() -> None:
    policy = warming(0.5, random.Random(4))
    picks = Counter(s.backend for s in (policy.select(now=0.0) for _ in range(1000)) if s is not None)
    assert 50 < picks["b0"] < 160, f"about 10% at the start of the ramp: {picks}"


def test_a_redirect_keeps_the_probes_and_spreads_over_the_others() -> None:
    policy = warming(10.0, random.Random(4))
    picks: Counter[str] = Counter()
    for _ in range(3000):
        selection = policy.select(now=0.0)
        assert selection is not None and selection.probes == ("b0",)
        picks[selection.backend] += 1
    assert all(800 < picks[b] < 1050 for b in ("b1", "b2", "b3")), picks


def test_slow_start_never_turns_down_the_only_candidate() -> None:
    policy = FirstPolicy(rng=random.Random(1), slow_start_s=10.0)
    policy.set_members([Member("b1")], now=0.0)
    policy.candidates(0.0)
    policy.set_members([Member("b0")], now=0.0)
    assert {s.backend for s in (policy.select(now=0.0) for _ in range(50)) if s is not None} == {"b0"}


def test_slow_start_turns_down_a_draw_equal_to_the_share() -> None:
    assert SLOW_START_MIN_SHARE == 0.1
    slowed = warming(10.0, FixedRandom(0.1))
    selection = slowed.select(now=0.0)
    assert selection is not None and selection.backend != "b0", "a draw of 0.1 is not below the 10% share"
    kept = warming(10.0, FixedRandom(0.0999))
    selection = kept.select(now=0.0)
    assert selection is not None and selection.backend == "b0"


def test_slow_start_ends_at_the_end_of_the_window() -> None:
    policy = warming(1.0, FixedRandom(0.99))
    selection = policy.select(now=1.0)
    assert selection is not None and selection.backend == "b0"
    assert policy._warming == {}, "done warming: forgotten"
    later = warming(1.0, FixedRandom(0.99))
    assert all(s is not None and s.backend == "b0" for s in (later.select(now=1.5) for _ in range(20)))


def test_the_first_members_are_the_baseline_even_after_an_empty_start() -> None:
    policy = FirstPolicy(rng=random.Random(1), slow_start_s=10.0)
    assert policy.select(now=0.0) is None  # no members yet
    policy.set_members([Member("b0"), Member("b1")], now=0.0)
    assert all(s is not None and s.backend == "b0" for s in (policy.select(now=0.0) for _ in range(50)))


def test_backends_back_after_all_were_down_warm_up() -> None:
    policy = first_policy(2, slow_start_s=10.0, outliers=OutlierSettings(panic_threshold=0.0))
    policy.candidates(0.0)
    for b in ("b0", "b1"):
        policy.set_health(b, False, now=0.0)
    policy.candidates(0.0)
    policy.set_health("b1", True, now=1.0)
    policy.candidates(1.0)
    policy.set_health("b0", True, now=1.0)
    picks = Counter(s.backend for s in (policy.select(now=1.0) for _ in range(1000)) if s is not None)
    assert picks["b0"] < 300, f"b0 came back at 1.0 and warms up: {picks}"


def test_weighted_redirect_follows_the_weights_and_edges() -> None:
    policy = FirstPolicy(rng=FixedRandom(0.25), slow_start_s=10.0)
    policy.set_members([Member("b1", weight=1.0), Member("b2", weight=3.0)], now=0.0)
    policy.candidates(0.0)
    policy.set_members([Member("b0"), Member("b1", weight=1.0), Member("b2", weight=3.0)], now=0.0)
    # Slowed (0.25 >= 0.1); then x = 0.25 * 4 = 1.0: b1's weight brings it to 0, not below: b2.
    selection = policy.select(now=0.0)
    assert selection is not None and selection.backend == "b2"


# --- the local view: latency EWMA, successes, probe misses -------------------------------------------------


def test_the_latency_ewma_weights_a_new_sample_by_0_3() -> None:
    policy = first_policy(1)
    policy.on_finish("b0", now=0.0, latency_s=0.100, outcome=Outcome.SUCCESS)
    policy.on_finish("b0", now=0.0, latency_s=0.200, outcome=Outcome.SUCCESS)
    latency = {b.id: b.latency_s for b in policy.snapshot(0.0).backends}["b0"]
    assert latency == pytest.approx(0.130)


def test_a_success_resets_the_failure_streak() -> None:
    policy = first_policy(4, outliers=OutlierSettings(consecutive_failures=3))
    for outcome in (Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE):
        policy.on_finish("b0", now=0.0, latency_s=0.01, outcome=outcome)
    assert not policy.outliers.is_ejected("b0", 0.0)
    assert policy.outliers.consecutive_failures("b0") == 2


def test_a_success_makes_a_backend_that_missed_probes_trusted_again() -> None:
    policy = PrequalPolicy(rng=random.Random(2))
    policy.set_members([Member("b0"), Member("b1")], now=0.0)
    policy.on_probe_failure("b0", now=0.0)
    assert list(policy._trusted(["b0", "b1"], 0.0)) == ["b1"]
    policy.on_finish("b0", now=0.1, latency_s=0.01, outcome=Outcome.SUCCESS)
    assert list(policy._trusted(["b0", "b1"], 0.1)) == ["b0", "b1"]


def test_probes_requested_accumulates_over_selections() -> None:
    policy = first_policy(2)
    for _ in range(3):
        policy.select(now=0.0)
    assert policy.snapshot(0.0).probes_requested == 3


# --- snapshots --------------------------------------------------------------------------------------------


def test_backend_snapshot_fields() -> None:
    outliers = OutlierSettings(consecutive_failures=2, base_ejection_s=5.0, failure_weight=0.5)
    policy = FirstPolicy(rng=random.Random(1), outliers=outliers)
    policy.set_members([Member("b0", weight=2.5), Member("b1"), Member("b2")], now=0.0)
    policy.on_finish("b0", now=1.0, latency_s=0.01, outcome=Outcome.FAILURE)
    policy.on_finish("b1", now=1.0, latency_s=0.01, outcome=Outcome.FAILURE)
    policy.on_finish("b1", now=1.0, latency_s=0.01, outcome=Outcome.FAILURE)
    snap = {b.id: b for b in policy.snapshot(1.0).backends}
    assert snap["b0"].weight == 2.5 and snap["b1"].weight == 1.0
    assert (snap["b0"].consecutive_failures, snap["b0"].failure_rate, snap["b0"].ejected_until) == (1, 0.5, None)
    assert snap["b1"].state == "ejected" and snap["b1"].ejected_until == 6.0
    assert snap["b1"].failure_rate == pytest.approx(0.75) and snap["b1"].consecutive_failures == 0
    assert (snap["b2"].consecutive_failures, snap["b2"].failure_rate) == (0, 0.0)


def test_a_backend_back_from_ejection_warms_up_from_its_return() -> None:
    # Ejected at 0.0 for 1 s, with a 0.5 s slow start: at 1.2 it is 40% through its ramp, so a draw of
    # 0.5 turns it down and a draw of 0.3 keeps it.
    outliers = OutlierSettings(consecutive_failures=1, base_ejection_s=1.0, panic_threshold=0.0)
    for draw, slowed in ((0.5, True), (0.3, False)):
        policy = first_policy(3, rng=FixedRandom(draw), slow_start_s=0.5, outliers=outliers)
        policy.candidates(0.0)
        policy.on_finish("b0", now=0.0, latency_s=0.01, outcome=Outcome.FAILURE)
        assert policy.outliers.ejected_until("b0", 0.0) == 1.0
        selection = policy.select(now=1.2)
        assert selection is not None and (selection.backend != "b0") is slowed, draw

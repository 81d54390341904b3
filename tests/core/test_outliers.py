"""Ejection with exponential backoff, the ejection cap, panic mode and error aversion."""

from __future__ import annotations

import random

import pytest

from prequal_middleware.core import Member, Outcome, OutlierDetector, OutlierSettings, RoundRobinPolicy


def fail(detector: OutlierDetector, backend: str, times: int, now: float, members: int = 10) -> bool:
    ejected = False
    for _ in range(times):
        ejected = detector.record_failure(backend, now, members) or ejected
    return ejected


def make_detector(**settings: float) -> OutlierDetector:
    detector = OutlierDetector(OutlierSettings(**settings))  # type: ignore[arg-type]
    for i in range(10):
        detector.add(f"b{i}")
    return detector


def test_consecutive_failures_eject() -> None:
    d = make_detector(consecutive_failures=5, base_ejection_s=1.0)
    assert not fail(d, "b0", 4, now=0.0)
    assert not d.is_ejected("b0", 0.0)
    assert d.record_failure("b0", 0.0, 10)
    assert d.is_ejected("b0", 0.5) and not d.is_ejected("b0", 1.0)


def test_a_success_resets_the_streak() -> None:
    d = make_detector(consecutive_failures=3)
    fail(d, "b0", 2, now=0.0)
    d.record_success("b0", 0.0)
    assert not fail(d, "b0", 2, now=0.0), "two after a success are not three in a row"


def test_backoff_doubles_up_to_the_max() -> None:
    d = make_detector(consecutive_failures=1, base_ejection_s=1.0, max_ejection_s=5.0)
    lengths = []
    now = 0.0
    for _ in range(5):
        assert d.record_failure("b0", now, 10)
        until = d.ejected_until("b0", now)
        assert until is not None
        lengths.append(until - now)
        now = until  # fails again the moment it returns
    assert lengths == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_is_forgiven_after_good_behaviour() -> None:
    d = make_detector(consecutive_failures=1, base_ejection_s=1.0)
    d.record_failure("b0", 0.0, 10)  # out for 1 s
    d.record_failure("b0", 1.0, 10)  # out for 2 s, until 3.0
    d.record_success("b0", 5.0)  # behaved for 2 s since its return: one step forgiven
    d.record_failure("b0", 5.0, 10)
    assert d.ejected_until("b0", 5.0) == 7.0, "back to a 2 s ejection, not 4 s"


def test_ejection_share_is_capped() -> None:
    d = make_detector(consecutive_failures=1, max_ejected_share=0.3)
    ejected = [d.record_failure(f"b{i}", 0.0, 10) for i in range(5)]
    assert ejected == [True, True, True, False, False]
    assert d.ejected_count(0.0) == 3


def test_zero_disables_ejection() -> None:
    d = make_detector(consecutive_failures=0)
    assert not fail(d, "b0", 100, now=0.0)


def test_failure_rate_rises_and_decays() -> None:
    d = make_detector(failure_weight=0.5, failure_decay_s=1.0)
    fail(d, "b0", 2, now=0.0)
    assert d.failure_rate("b0", 0.0) == pytest.approx(0.75)
    assert d.failure_rate("b0", 1.0) == pytest.approx(0.75 * 0.36788, rel=1e-3)
    assert d.penalty("b0", 0.0) == pytest.approx(4.0)
    assert d.penalty("b1", 0.0) == 1.0


def test_panic_threshold() -> None:
    d = make_detector(panic_threshold=0.5)
    assert not d.in_panic(healthy=5, members=10)
    assert d.in_panic(healthy=4, members=10)
    assert d.in_panic(healthy=0, members=10)
    assert not d.in_panic(healthy=0, members=0)
    strict = make_detector(panic_threshold=0.0)
    assert not strict.in_panic(healthy=1, members=10)
    assert strict.in_panic(healthy=0, members=10), "with nobody healthy, route over all"


def test_policy_skips_ejected_backend_and_panics_when_too_few_are_healthy() -> None:
    policy = RoundRobinPolicy(
        rng=random.Random(1), outliers=OutlierSettings(consecutive_failures=1, max_ejected_share=1.0)
    )
    policy.set_members([Member(f"b{i}") for i in range(4)], now=0.0)
    policy.on_start("b0", 0.0)
    policy.on_finish("b0", 0.0, 0.001, Outcome.CONNECT_ERROR)
    picks = {s.backend for s in (policy.select(0.1) for _ in range(30)) if s is not None}
    assert picks == {"b1", "b2", "b3"}
    for b in ("b1", "b2"):
        policy.on_start(b, 0.1)
        policy.on_finish(b, 0.1, 0.001, Outcome.TIMEOUT)
    selection = policy.select(0.2)
    assert selection is not None and selection.reason == "panic", "1 of 4 healthy is below 50%"
    assert {s.backend for s in (policy.select(0.2) for _ in range(40)) if s is not None} == {"b0", "b1", "b2", "b3"}
    assert policy.snapshot(0.2).panic
    # Ejections expire without any call in between: the candidates are recomputed on time.
    selection = policy.select(1.5)
    assert selection is not None and selection.reason == "policy"


def test_unhealthy_and_draining_members_get_no_new_requests() -> None:
    policy = RoundRobinPolicy(rng=random.Random(1))
    policy.set_members([Member("a"), Member("b"), Member("c", draining=True), Member("d")], now=0.0)
    policy.set_health("b", False, now=0.0)
    picks = {s.backend for s in (policy.select(0.0) for _ in range(20)) if s is not None}
    assert picks == {"a", "d"}
    states = {b.id: b.state for b in policy.snapshot(0.0).backends}
    assert states == {"a": "healthy", "b": "unhealthy", "c": "draining", "d": "healthy"}


def test_cancelled_requests_say_nothing_about_health() -> None:
    policy = RoundRobinPolicy(rng=random.Random(1), outliers=OutlierSettings(consecutive_failures=1))
    policy.set_members([Member("a"), Member("b")], now=0.0)
    policy.on_start("a", 0.0)
    policy.on_finish("a", 0.5, 0.5, Outcome.CANCELLED)
    assert policy.outliers.consecutive_failures("a") == 0
    assert policy.snapshot(0.5).backends[0].in_flight == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("consecutive_failures", -1), ("base_ejection_s", 0.0), ("max_ejection_s", 0.5), ("panic_threshold", 2.0)],
)
def test_invalid_settings_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        OutlierSettings(**{field: value})  # type: ignore[arg-type]


def test_slow_start_ramps_a_joining_backend() -> None:
    policy = RoundRobinPolicy(rng=random.Random(3), slow_start_s=10.0)
    policy.set_members([Member("a"), Member("b")], now=0.0)
    assert policy.select(0.0) is not None  # the first members are the baseline: not slowed
    policy.set_members([Member("a"), Member("b"), Member("c")], now=100.0)

    def share_of_c(now: float, n: int = 3000) -> float:
        picks = [s.backend for s in (policy.select(now) for _ in range(n)) if s is not None]
        return picks.count("c") / n

    early = share_of_c(100.0)
    mid = share_of_c(105.0)
    late = share_of_c(111.0)
    assert early == pytest.approx(1 / 3 * 0.1, abs=0.02), "10% of its fair share at first"
    assert mid == pytest.approx(1 / 3 * 0.5, abs=0.03), "half way through the window"
    assert late == pytest.approx(1 / 3, abs=0.02), "a full share once the window has passed"


def test_slow_start_after_ejection() -> None:
    policy = RoundRobinPolicy(
        rng=random.Random(3), slow_start_s=4.0, outliers=OutlierSettings(consecutive_failures=1, base_ejection_s=1.0)
    )
    policy.set_members([Member("a"), Member("b")], now=0.0)
    policy.select(0.0)
    policy.on_start("a", 0.0)
    policy.on_finish("a", 0.0, 0.001, Outcome.FAILURE)  # ejected until 1.0
    picks = [s.backend for s in (policy.select(1.0) for _ in range(2000)) if s is not None]
    assert 0.02 < picks.count("a") / 2000 < 0.09, "back from ejection: slowed (10% of a half share)"
    picks = [s.backend for s in (policy.select(6.0) for _ in range(2000)) if s is not None]
    assert picks.count("a") / 2000 == pytest.approx(0.5, abs=0.03)


def test_one_failure_on_probation_ejects_again() -> None:
    d = make_detector(consecutive_failures=5, base_ejection_s=1.0)
    assert fail(d, "b0", 5, now=0.0)  # out until 1.0
    assert d.record_failure("b0", 1.0, 10), "back from ejection, the first failure ejects it again"
    assert d.ejected_until("b0", 1.0) == 3.0, "for twice as long"
    d.record_success("b0", 3.5)  # a success ends probation
    assert not fail(d, "b0", 4, now=3.6), "then it takes the full streak again"

"""OutlierDetector at its edges: unknown and removed backends, backoff forgiveness, decay, exact ends."""

from __future__ import annotations

import math

import pytest

from prequal_middleware.core import OutlierDetector, OutlierSettings


def make_detector(**settings: float) -> OutlierDetector:
    detector = OutlierDetector(OutlierSettings(**settings))  # type: ignore[arg-type]
    for i in range(10):
        detector.add(f"b{i}")
    return detector


def test_unknown_and_removed_backends_have_no_health() -> None:
    d = make_detector(consecutive_failures=1)
    assert d.record_failure("stranger", 0.0, 10) is False
    assert (d.consecutive_failures("stranger"), d.failure_rate("stranger", 0.0)) == (0, 0.0)
    d.record_failure("b0", 0.0, 10)
    assert d.is_ejected("b0", 0.5)
    d.remove("b0")
    d.remove("b0")  # twice, or a backend never added: no error
    assert not d.is_ejected("b0", 0.5) and d.failure_rate("b0", 0.5) == 0.0 and d.ejected_count(0.5) == 0


def test_a_success_without_a_past_ejection_does_not_shorten_the_next_one() -> None:
    d = make_detector(consecutive_failures=1, base_ejection_s=1.0)
    d.record_success("b0", 0.0)
    assert d.record_failure("b0", 0.0, 10)
    assert d.ejected_until("b0", 0.0) == 1.0


def test_backoff_is_forgiven_only_after_behaving_as_long_as_the_last_ejection() -> None:
    d = make_detector(consecutive_failures=1, base_ejection_s=1.0, max_ejection_s=30.0)
    assert d.record_failure("b0", 0.0, 10)  # 1 s
    d.record_success("b0", 1.5)  # back for 0.5 s < 1 s: no forgiveness
    assert d.record_failure("b0", 1.5, 10)
    assert d.ejected_until("b0", 1.5) == 3.5, "the second ejection lasts 2 s"


def test_forgiveness_takes_one_step_of_backoff() -> None:
    d = make_detector(consecutive_failures=1, base_ejection_s=1.0, max_ejection_s=30.0)
    now = 0.0
    for length in (1.0, 2.0, 4.0):  # three ejections in a row (on probation, one failure each)
        assert d.record_failure("b0", now, 10)
        assert d.ejected_until("b0", now) == now + length
        now += length
    d.record_success("b0", now + 4.0)  # behaved as long as the last ejection: one step forgiven
    assert d.record_failure("b0", now + 4.0, 10)
    assert d.ejected_until("b0", now + 4.0) == now + 8.0, "4 s again (2 ** 2), not 2 s"
    assert d.ejections_total == 4


def test_failure_rate_decays_with_failure_decay_s() -> None:
    d = make_detector(consecutive_failures=0, failure_weight=1.0, failure_decay_s=2.0)
    d.record_failure("b0", 0.0, 10)
    assert d.failure_rate("b0", 0.0) == 1.0
    assert d.failure_rate("b0", 1.0) == pytest.approx(math.exp(-0.5))


def test_ejection_ends_exactly_at_its_end() -> None:
    d = make_detector(consecutive_failures=1, base_ejection_s=1.0)
    d.record_failure("b0", 0.0, 10)
    assert d.ejected_until("b0", 0.999) == 1.0 and d.ejected_count(0.999) == 1
    assert d.ejected_until("b0", 1.0) is None and d.ejected_count(1.0) == 0


def test_averse_means_strictly_above_the_bound() -> None:
    d = make_detector(consecutive_failures=0, failure_weight=0.5, averse_above=0.5)
    d.record_failure("b0", 0.0, 10)
    assert d.failure_rate("b0", 0.0) == 0.5 and not d.is_averse("b0", 0.0)
    d.record_failure("b0", 0.0, 10)
    assert d.is_averse("b0", 0.0)


def test_a_single_member_that_is_down_is_still_routed_to_in_panic() -> None:
    d = make_detector()
    assert d.in_panic(healthy=0, members=1) is True
    assert d.in_panic(healthy=1, members=1) is False
    assert d.in_panic(healthy=0, members=0) is False

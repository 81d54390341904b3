"""RetryBudget: a share of recent requests plus a per-second floor, over a sliding window of 1 s slots."""

from __future__ import annotations

import math
import re

import pytest

from prequal_middleware.core.retry_budget import RetryBudget


def test_the_floor_allows_min_per_s_for_each_second_of_the_window() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=3.0)
    assert budget.available(0.0) == 3.0
    assert [budget.try_withdraw(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.available(0.0) == 0.0, "a refused withdrawal takes nothing"


def test_the_ratio_adds_a_share_of_the_requests() -> None:
    budget = RetryBudget(ratio=0.3, min_per_s=0.0, window_s=10.0)
    for _ in range(3):
        budget.record_request(0.0)
    assert budget.available(0.0) == pytest.approx(0.9)
    assert budget.try_withdraw(0.0) is False, "0.9 of a retry is not a retry"
    budget.record_request(0.5)
    assert budget.try_withdraw(0.5) is True
    assert budget.available(0.5) == pytest.approx(0.2)
    assert budget.try_withdraw(0.5) is False


def test_requests_and_retries_leave_the_window_after_window_s() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=3.0)
    budget.record_request(0.5)
    budget.record_request(1.5)
    budget.record_request(1.5)
    assert budget.try_withdraw(1.5) is True
    assert budget.available(2.99) == 2.0
    assert budget.available(3.0) == 1.0, "second 0 left the window: second 1's two requests and retry remain"
    assert budget.available(4.0) == 0.0, "second 1 left too, with its retry"
    budget.record_request(4.5)
    assert budget.available(4.5) == 1.0


def test_a_long_pause_clears_every_slot() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=3.0)
    for t in (0.0, 1.0, 2.0):
        budget.record_request(t)
        budget.record_request(t)
    assert budget.try_withdraw(2.0) is True
    assert budget.available(2.0) == 5.0
    assert budget.available(100.0) == 0.0
    budget.record_request(100.0)
    assert budget.available(100.0) == 1.0


def test_slots_wrap_around_without_losing_the_current_second() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=2.0)
    budget.record_request(0.0)
    budget.record_request(1.0)
    budget.record_request(2.0)  # reuses second 0's slot
    assert budget.available(2.0) == 2.0
    budget.record_request(2.5)
    assert budget.available(2.9) == 3.0
    assert budget.available(3.0) == 2.0, "second 1 left; second 2 had two"


def test_a_fractional_window_has_whole_second_slots() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=2.0, window_s=2.5)
    assert budget.available(0.0) == 4.0, "two slots of 1 s"
    assert RetryBudget(ratio=0.0, min_per_s=2.0, window_s=1.0).available(0.0) == 2.0


def test_defaults() -> None:
    budget = RetryBudget()
    assert (budget.ratio, budget.min_per_s, budget.window_s) == (0.2, 10.0, 10.0)
    assert budget.available(0.0) == 100.0


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("ratio", -1e-9, "a finite number >= 0"),
        ("ratio", math.inf, "a finite number >= 0"),
        ("min_per_s", -1e-9, "a finite number >= 0"),
        ("min_per_s", math.inf, "a finite number >= 0"),
        ("window_s", 1.0 - 1e-9, "a finite number >= 1"),
        ("window_s", math.inf, "a finite number >= 1"),
    ],
)
def test_invalid_parameters_name_the_field(field: str, value: float, expected: str) -> None:
    message = f"{field} must be {expected}, got {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RetryBudget(**{field: value})


def test_boundary_parameters_are_accepted() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.0, window_s=1.0)
    assert budget.available(0.0) == 0.0
    assert budget.try_withdraw(0.0) is False

"""Every settings field accepts its boundary values, rejects the values just past them, and names itself.

The message is pinned whole (``<field> must be <expected>, got <value>``): it is what an operator reads
when a configuration is wrong.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from prequal_middleware.core import LoadTrackerSettings, OutlierSettings, PrequalSettings

TINY = 1e-9
FINITE_POSITIVE = "a finite number > 0"
FINITE_NON_NEGATIVE = "a finite number >= 0"
INT_AT_LEAST_1 = "an integer >= 1"
UNIT = "a number in [0, 1]"

# (settings class, field, values accepted, values rejected, the expectation the message states)
CASES: list[tuple[type[Any], str, list[Any], list[Any], str]] = [
    (PrequalSettings, "pool_size", [1, 2], [0, -1], INT_AT_LEAST_1),
    (PrequalSettings, "max_age_s", [TINY, 1e9], [0.0, -1.0, math.inf, math.nan], FINITE_POSITIVE),
    (PrequalSettings, "probes_per_query", [0.0, 1e9], [-TINY, math.inf, math.nan], FINITE_NON_NEGATIVE),
    (PrequalSettings, "removals_per_query", [0.0, 1e9], [-TINY, math.inf, math.nan], FINITE_NON_NEGATIVE),
    (PrequalSettings, "drift", [TINY, 1e9], [0.0, math.inf], FINITE_POSITIVE),
    (PrequalSettings, "q_rif", [0.0, 1.0], [-TINY, 1.0 + 1e-12, math.nan], UNIT),
    (PrequalSettings, "max_reuse", [1], [0], INT_AT_LEAST_1),
    (PrequalSettings, "rif_history_size", [1], [0], INT_AT_LEAST_1),
    (PrequalSettings, "rif_history_window_s", [TINY, 1e9], [0.0, math.inf], FINITE_POSITIVE),
    (PrequalSettings, "max_idle_s", [TINY, 1e9], [0.0, math.inf], FINITE_POSITIVE),
    (PrequalSettings, "fallback_below", [1], [0], INT_AT_LEAST_1),
    (
        PrequalSettings,
        "fallback",
        ["least_in_flight", "random"],
        ["least_latency", ""],
        "'least_in_flight' or 'random'",
    ),
    (LoadTrackerSettings, "window_s", [TINY, 1e9], [0.0, math.inf], FINITE_POSITIVE),
    (LoadTrackerSettings, "window_service_times", [0.0, 1e9], [-TINY, math.inf], "a finite number >= 0"),
    (LoadTrackerSettings, "max_window_s", [TINY, 1e9], [0.0, math.inf], FINITE_POSITIVE),
    (LoadTrackerSettings, "service_samples", [1], [0], INT_AT_LEAST_1),
    (LoadTrackerSettings, "samples_per_bucket", [1], [0], INT_AT_LEAST_1),
    (LoadTrackerSettings, "exact_buckets", [1], [0], INT_AT_LEAST_1),
    (LoadTrackerSettings, "min_samples", [1], [0], INT_AT_LEAST_1),
    (LoadTrackerSettings, "max_widen", [0], [-1], "an integer >= 0"),
    (OutlierSettings, "consecutive_failures", [0], [-1], "an integer >= 0"),
    (OutlierSettings, "base_ejection_s", [TINY, 30.0], [0.0, math.inf], FINITE_POSITIVE),
    (OutlierSettings, "max_ejected_share", [0.0, 1.0], [-TINY, 1.0 + 1e-12], UNIT),
    (OutlierSettings, "panic_threshold", [0.0, 1.0], [-TINY, 1.0 + 1e-12], UNIT),
    (OutlierSettings, "failure_weight", [TINY, 1.0], [0.0, 1.0 + 1e-12], "a number in (0, 1]"),
    (OutlierSettings, "failure_decay_s", [TINY, 1e9], [0.0, math.inf], FINITE_POSITIVE),
    (OutlierSettings, "averse_above", [0.0, 1.0], [-TINY, 1.0 + 1e-12], UNIT),
    (OutlierSettings, "trial_timeout_s", [0.0, 1e9], [-TINY, math.inf, math.nan], FINITE_NON_NEGATIVE),
]


def _ids(case: tuple[type[Any], str, list[Any], list[Any], str]) -> str:
    return f"{case[0].__name__}.{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_boundary_values_are_accepted(case: tuple[type[Any], str, list[Any], list[Any], str]) -> None:
    cls, field, good, _, _ = case
    for value in good:
        assert getattr(cls(**{field: value}), field) == value


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_values_past_the_boundary_are_rejected_by_name(case: tuple[type[Any], str, list[Any], list[Any], str]) -> None:
    cls, field, _, bad, expected = case
    for value in bad:
        message = f"{field} must be {expected}, got {value!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            cls(**{field: value})


def test_max_ejection_must_be_finite_and_at_least_the_base() -> None:
    assert OutlierSettings(base_ejection_s=2.0, max_ejection_s=2.0).max_ejection_s == 2.0
    for value in (2.0 - TINY, math.inf):
        message = f"max_ejection_s must be finite and >= base_ejection_s, got {value!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            OutlierSettings(base_ejection_s=2.0, max_ejection_s=value)


def test_the_first_failing_field_is_named() -> None:
    with pytest.raises(ValueError, match="^pool_size must be"):
        PrequalSettings(pool_size=0, max_age_s=0.0)


def test_defaults() -> None:
    p = PrequalSettings()
    assert (p.pool_size, p.max_age_s, p.probes_per_query, p.removals_per_query, p.drift) == (16, 1.0, 3.0, 1.0, 1.0)
    assert (p.q_rif, p.max_reuse, p.rif_history_size, p.rif_history_window_s) == (0.6, 2, 128, 2.0)
    assert (p.max_idle_s, p.fallback_below, p.fallback) == (0.5, 2, "least_in_flight")
    t = LoadTrackerSettings()
    assert (t.window_s, t.samples_per_bucket, t.exact_buckets, t.min_samples, t.max_widen) == (1.0, 16, 32, 3, 2)
    assert (t.window_service_times, t.max_window_s, t.service_samples) == (8.0, 60.0, 32)

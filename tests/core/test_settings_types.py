"""Every settings dataclass of the core refuses a wrongly typed field with a ``ValueError`` naming it.

Checked before the range checks, so the message names the field whether the core runs as plain Python
or compiled by mypyc (where reading a float from an ``int`` field raises a ``TypeError`` naming nothing).
"""

from __future__ import annotations

import re

import pytest

from prequal_middleware.core import OutlierSettings, PrequalSettings
from prequal_middleware.core.load_tracker import LoadTrackerSettings


@pytest.mark.parametrize(
    ("cls", "field", "value", "expected"),
    [
        (PrequalSettings, "pool_size", 2.5, "an integer"),
        (PrequalSettings, "pool_size", True, "an integer"),
        (PrequalSettings, "max_reuse", "2", "an integer"),
        (PrequalSettings, "sync_probes", 2.5, "an integer"),
        (PrequalSettings, "q_rif", "0.5", "a number"),
        (PrequalSettings, "max_age_s", None, "a number"),
        (PrequalSettings, "drift", False, "a number"),
        (PrequalSettings, "cross_check", 1, "True or False"),
        (OutlierSettings, "consecutive_failures", 5.0, "an integer"),
        (OutlierSettings, "failure_weight", "0.3", "a number"),
        (LoadTrackerSettings, "service_samples", 1.5, "an integer"),
        (LoadTrackerSettings, "window_s", [1.0], "a number"),
    ],
)
def test_a_wrongly_typed_field_is_named(cls: type, field: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{field} must be {expected}, got {value!r}")):
        cls(**{field: value})


def test_an_int_is_a_number() -> None:
    assert PrequalSettings(max_age_s=2, drift=1).max_age_s == 2
    assert OutlierSettings(max_ejection_s=60).max_ejection_s == 60
    assert LoadTrackerSettings(window_s=3).window_s == 3

"""``LogThrottle``: one line per key per interval, the held-back count on the next line, bounded keys."""

from __future__ import annotations

import pytest

from prequal_middleware.core.log_throttle import LogThrottle


def test_repeats_within_the_interval_are_held_and_counted() -> None:
    throttle = LogThrottle(interval_s=10.0)
    assert throttle.allow("k", 0.0) == 0
    assert throttle.allow("k", 1.0) is None
    assert throttle.allow("k", 9.9) is None
    assert throttle.held("k") == 2
    assert throttle.allow("other", 5.0) == 0, "keys are apart"
    assert throttle.allow("k", 10.0) == 2, "the next line says how many were held back"
    assert throttle.allow("k", 10.5) is None
    assert throttle.allow("k", 20.0) == 1


def test_keys_are_bounded() -> None:
    throttle = LogThrottle(interval_s=10.0, max_keys=2)
    throttle.allow("a", 0.0)
    throttle.allow("b", 0.0)
    throttle.allow("c", 0.0)  # forgets "a", the least recently logged
    assert throttle.allow("a", 1.0) == 0
    assert throttle.allow("c", 1.0) is None


@pytest.mark.parametrize(("interval", "keys"), [(-1.0, 1), (float("inf"), 1), (1.0, 0)])
def test_settings_are_checked(interval: float, keys: int) -> None:
    with pytest.raises(ValueError):
        LogThrottle(interval, keys)

"""RifHistory keeps its samples sorted as they come and go: its threshold is always the one a full
sort of the fresh, most recent ``size`` samples gives."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from prequal_middleware.core.probe_pool import RifHistory

steps = st.lists(
    st.tuples(st.floats(0.0, 2.0), st.one_of(st.integers(0, 50), st.none()), st.floats(0.0, 1.0)),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 20), window=st.floats(0.1, 5.0), steps=steps)
def test_threshold_matches_a_full_sort(size: int, window: float, steps: list[tuple[float, int | None, float]]) -> None:
    history = RifHistory(size, window)
    kept: list[tuple[float, int]] = []
    now = 0.0
    for advance, rif, q in steps:
        now += advance
        if rif is not None:
            history.add(rif, now)
            kept = [*kept, (now, rif)][-size:]
        fresh = sorted(r for t, r in kept if t >= now - window)
        expected = math.inf if q >= 1.0 or not fresh else float(fresh[int(q * (len(fresh) - 1))])
        assert history.threshold(q, now) == expected
        kept = [(t, r) for t, r in kept if t >= now - window]
        assert len(history) == len(kept)

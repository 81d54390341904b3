"""``TrafficHistory``: values per step, bounds, the window, the backend cap. Fake clock, no I/O."""

from __future__ import annotations

import math

import pytest

from prequal_middleware.core.history import MAX_POINTS, HistorySettings, TrafficHistory, quantile

BOUNDS = (0.01, 0.1, 1.0, math.inf)


def buckets(*counts: float) -> list[tuple[float, float]]:
    """Cumulative counts for ``BOUNDS`` from per-bucket counts."""
    total, out = 0.0, []
    for bound, count in zip(BOUNDS, counts, strict=True):
        total += count
        out.append((bound, total))
    return out


class Counters:
    """Cumulative counters a test advances, as the gateway's Prometheus counters are."""

    def __init__(self) -> None:
        self.requests = 0.0
        self.per_bucket = [0.0] * len(BOUNDS)
        self.backends: dict[str, float] = {}

    def add(self, backends: dict[str, int], bucket: int = 0) -> None:
        n = sum(backends.values())
        self.requests += n
        self.per_bucket[bucket] += n
        for url, count in backends.items():
            self.backends[url] = self.backends.get(url, 0) + count

    def record(self, history: TrafficHistory, now: float) -> bool:
        return history.record(now, self.requests, buckets(*self.per_bucket), dict(self.backends))


def test_a_point_per_step_with_rate_p99_and_shares() -> None:
    h = TrafficHistory(HistorySettings(window_s=60, step_s=5, max_backends=3))
    c = Counters()
    assert not c.record(h, 100.0), "the first call only sets the baseline"
    assert len(h) == 0
    c.add({"http://a": 30, "http://b": 10})
    assert not c.record(h, 104.4), "not a step yet"
    assert c.record(h, 105.0)
    c.add({"http://a": 5, "http://b": 15}, bucket=2)
    assert c.record(h, 110.0)
    data = h.as_json(110.0)
    assert data["age_s"] == [5.0, 0.0]
    assert data["rps"] == [8.0, 4.0]  # 40 requests over 5 s, then 20
    # Within-bucket interpolation: rank 39.6 of 40 in [0, 0.01]; then rank 19.8 of 20 in [0.1, 1.0].
    assert data["p99_ms"] == [pytest.approx(9.9), pytest.approx(991.0)]
    assert data["backends"] == [
        {"url": "http://a", "share": [0.75, 0.25]},
        {"url": "http://b", "share": [0.25, 0.75]},
    ]
    assert (data["window_s"], data["step_s"]) == (60, 5)


def test_a_step_without_requests_has_no_p99_and_no_shares() -> None:
    h = TrafficHistory(HistorySettings(window_s=60, step_s=1))
    c = Counters()
    c.record(h, 0.0)
    c.add({"http://a": 1})
    c.record(h, 1.0)
    c.record(h, 2.0)
    data = h.as_json(2.0)
    assert data["rps"] == [1.0, 0.0]
    assert data["p99_ms"][1] is None
    assert data["backends"] == [{"url": "http://a", "share": [1.0, None]}]


def test_points_are_bounded_and_the_window_drops_old_ones() -> None:
    settings = HistorySettings(window_s=10, step_s=1)
    h = TrafficHistory(settings)
    c = Counters()
    for t in range(100):
        c.add({"http://a": 1})
        c.record(h, float(t))
    assert len(h) == settings.points == 10, "at most window / step points"
    assert h.as_json(99.0)["age_s"] == [float(a) for a in range(9, -1, -1)]
    # After a pause (the gateway was stopped) the old points age out of the window, not of the buffer.
    assert [p.at for p in h.points(104.5)] == [94.0, 95.0, 96.0, 97.0, 98.0, 99.0], "window and a step of slack"
    assert h.points(200.0) == []


def test_backends_are_capped_by_share_with_the_rest_as_other() -> None:
    h = TrafficHistory(HistorySettings(window_s=60, step_s=1, max_backends=2))
    c = Counters()
    c.record(h, 0.0)
    many = {f"http://b{i:02}": i for i in range(1, 21)}  # b20 busiest, then b19, ...
    c.add(many)
    c.record(h, 1.0)
    (point,) = h.points(1.0)
    assert point.backends == (("http://b20", 20), ("http://b19", 19)), "only the busiest two are kept by name"
    assert point.other == sum(range(1, 19))
    data = h.as_json(1.0)
    total = sum(many.values())
    assert [s["url"] for s in data["backends"]] == ["http://b20", "http://b19", None]
    assert [s["share"] for s in data["backends"]] == [
        [round(20 / total, 4)],
        [round(19 / total, 4)],
        [round(sum(range(1, 19)) / total, 4)],
    ]


def test_the_charted_backends_are_the_busiest_over_the_window() -> None:
    h = TrafficHistory(HistorySettings(window_s=60, step_s=1, max_backends=1))
    c = Counters()
    c.record(h, 0.0)
    c.add({"http://a": 10, "http://b": 1})
    c.record(h, 1.0)
    c.add({"http://a": 1, "http://b": 3})
    c.record(h, 2.0)
    data = h.as_json(2.0)
    # b led the second step (a in "other" there), but a carried more over the window: a is charted.
    assert data["backends"] == [
        {"url": "http://a", "share": [round(10 / 11, 4), 0.0]},
        {"url": None, "share": [round(1 / 11, 4), 1.0]},
    ]


def test_departed_members_are_forgotten_and_a_reset_counter_counts_from_zero() -> None:
    h = TrafficHistory(HistorySettings(window_s=60, step_s=1))
    c = Counters()
    c.add({"http://a": 50})
    c.record(h, 0.0)
    del c.backends["http://a"]  # its series was removed when it left
    c.record(h, 1.0)
    assert h._last_backends == {}, "no state kept for a member that left"
    c.backends["http://a"] = 2  # it came back: a new series from zero
    c.requests += 2
    c.record(h, 2.0)
    assert h.points(2.0)[-1].backends == (("http://a", 2),)
    c.backends["http://a"] = 40
    c.record(h, 3.0)
    c.backends["http://a"] = 3  # left and came back within one step: its series restarted, lower
    c.record(h, 4.0)
    assert h.points(4.0)[-1].backends == (("http://a", 3),)


def test_quantile_edges() -> None:
    assert quantile(0.99, []) is None
    assert quantile(0.99, buckets(0, 0, 0, 0)) is None
    assert quantile(0.99, buckets(0, 0, 0, 5)) == 1.0, "in +Inf: the highest finite bound"
    assert quantile(0.5, buckets(0, 4, 0, 0)) == pytest.approx(0.055)


@pytest.mark.parametrize(
    "kwargs",
    [{"step_s": 0.01}, {"window_s": 1, "step_s": 5}, {"window_s": MAX_POINTS * 5 + 5}, {"max_backends": 0}],
)
def test_settings_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="HistorySettings"):
        HistorySettings(**kwargs)  # type: ignore[arg-type]


def test_a_loop_that_wakes_late_still_fills_the_window() -> None:
    settings = HistorySettings(window_s=10, step_s=1)
    h = TrafficHistory(settings)
    c = Counters()
    t = 0.0
    for _ in range(40):
        c.add({"http://a": 1})
        c.record(h, t)
        t += 1.03  # each tick a little late, as asyncio.sleep wakes
    assert len(h.points(t)) == settings.points
    assert {round(p.rps, 6) for p in h.points(t)} == {round(1 / 1.03, 6)}, "per second of the time that passed"

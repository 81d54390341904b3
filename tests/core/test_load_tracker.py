"""The server half: RIF counting, latency per RIF, median, freshness window and widening."""

from __future__ import annotations

import pytest

from prequal_middleware.core import LoadTracker, LoadTrackerSettings


def complete(tracker: LoadTracker, rif_before: int, latency_s: float, now: float) -> None:
    """Record one request that arrived when ``rif_before`` others were in flight."""
    held = [tracker.start(now - latency_s) for _ in range(rif_before)]
    ticket = tracker.start(now - latency_s)
    assert ticket.rif_at_arrival == rif_before
    tracker.finish(ticket, now)
    for other in held:
        tracker.finish(other, now, ok=False)  # errors: counted out, never sampled


def test_rif_counts_requests_in_flight() -> None:
    tracker = LoadTracker()
    tickets = [tracker.start(0.0) for _ in range(3)]
    assert tracker.rif == 3
    tracker.finish(tickets[0], 0.1)
    tracker.finish(tickets[1], 0.1, ok=False)
    assert tracker.rif == 1


def test_finishing_twice_does_not_leak() -> None:
    tracker = LoadTracker()
    ticket = tracker.start(0.0)
    tracker.finish(ticket, 0.1)
    tracker.finish(ticket, 0.2)
    assert tracker.rif == 0, "a second finish (finally after an explicit finish) is a no-op"


def test_no_rif_leak_over_many_requests_with_errors() -> None:
    tracker = LoadTracker()
    tickets = [tracker.start(i * 0.001) for i in range(1000)]
    for i, ticket in enumerate(tickets):
        tracker.finish(ticket, 2.0, ok=i % 3 != 0)
    assert tracker.rif == 0


def test_estimate_is_the_median_at_the_current_rif() -> None:
    tracker = LoadTracker()
    for latency in [0.010, 0.050, 0.020, 0.900, 0.030]:
        complete(tracker, 0, latency, now=1.0)
    assert tracker.report(1.0) == (0, pytest.approx(0.030)), "median, robust to the 0.9 s outlier"


def test_estimate_is_conditioned_on_rif() -> None:
    tracker = LoadTracker()
    for _ in range(5):
        complete(tracker, 0, 0.010, now=1.0)
        complete(tracker, 4, 0.080, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.010)
    held = [tracker.start(1.0) for _ in range(4)]
    # With 4 in flight, a new query would see what the queries that arrived at RIF 4 saw.
    assert tracker.estimate(1.0) == pytest.approx(0.080)
    for ticket in held:
        tracker.finish(ticket, 1.0, ok=False)


def test_even_count_median_averages_the_middle_two() -> None:
    tracker = LoadTracker()
    for latency in [0.010, 0.020, 0.030, 0.040]:
        complete(tracker, 0, latency, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.025)


def test_only_fresh_samples_count() -> None:
    tracker = LoadTracker(LoadTrackerSettings(window_s=1.0, window_service_times=0.0))  # a fixed window
    for _ in range(3):
        complete(tracker, 0, 0.500, now=1.0)
    complete(tracker, 0, 0.010, now=2.5)
    assert tracker.estimate(2.5) == pytest.approx(0.010)
    assert tracker.estimate(4.0) == 0.0, "no fresh sample: optimistic zero, stale highs must not starve"


def test_widens_to_neighbouring_buckets_when_too_few() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=3, max_widen=2))
    complete(tracker, 3, 0.030, now=1.0)  # at RIF 3: one sample
    complete(tracker, 2, 0.020, now=1.0)  # one step away
    complete(tracker, 5, 0.050, now=1.0)  # two steps away
    complete(tracker, 6, 0.990, now=1.0)  # three steps away: beyond max_widen
    held = [tracker.start(1.0) for _ in range(3)]
    # RIF 3: one sample at +-0, one at +-1, one at +-2: the median of 20, 30 and 50 ms.
    assert tracker.estimate(1.0) == pytest.approx(0.030)
    for ticket in held:
        tracker.finish(ticket, 1.0, ok=False)


def test_stops_widening_once_enough() -> None:
    tracker = LoadTracker(LoadTrackerSettings(min_samples=2, max_widen=2))
    for _ in range(2):
        complete(tracker, 0, 0.010, now=1.0)
    complete(tracker, 1, 0.500, now=1.0)
    assert tracker.estimate(1.0) == pytest.approx(0.010), "RIF 0 alone has 2 samples: RIF 1 is not mixed in"


def test_large_rifs_share_logarithmic_buckets_and_memory_is_bounded() -> None:
    tracker = LoadTracker(LoadTrackerSettings(samples_per_bucket=4, exact_buckets=32))
    assert tracker._bucket_of(31) == 31
    assert tracker._bucket_of(32) == tracker._bucket_of(63) == 32
    assert tracker._bucket_of(64) == 33
    assert tracker._bucket_of(10**12) == len(tracker._buckets) - 1
    for i in range(100):
        complete(tracker, 0, 0.001 * i, now=1.0)
    bucket = tracker._buckets[0]
    assert bucket is not None and len(bucket) == 4, "each bucket is a bounded ring"


def test_error_completions_are_not_sampled() -> None:
    tracker = LoadTracker()
    for _ in range(10):
        ticket = tracker.start(1.0)
        tracker.finish(ticket, 1.0001, ok=False)
    assert tracker.estimate(1.0001) == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("window_s", 0.0),
        ("window_service_times", -1.0),
        ("max_window_s", 0.0),
        ("service_samples", 0),
        ("samples_per_bucket", 0),
        ("max_widen", -1),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        LoadTrackerSettings(**{field: value})  # type: ignore[arg-type]

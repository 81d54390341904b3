"""The estimator's freshness window follows the service time (issue 15, section 3), on a fake clock.

A service whose requests take seconds finishes few requests per second: with a fixed 1 s window most
probes found no fresh sample and answered 0, so Prequal's cold branch saw every replica as equally
fast. The window is now max(window_s, min(max_window_s, k x median recent latency)).
"""

from __future__ import annotations

import heapq
import random

import pytest

from prequal_middleware.core import LoadTracker, LoadTrackerSettings
from prequal_middleware.core.load_tracker import _LOG_BUCKETS, RequestTicket

FIXED = LoadTrackerSettings(window_service_times=0.0)  # the old rule: always window_s


def drive(
    tracker: LoadTracker, *, rate_qps: float, service_s: tuple[float, float], seconds: float, seed: int = 1
) -> list[tuple[int, float]]:
    """Poisson arrivals at ``rate_qps``, each served in a uniform ``service_s`` (no queue: every request
    runs at once, like handlers awaiting I/O); a probe every 0.25 s after the first 20 s. Returns the
    probes' (RIF, estimate)."""
    rng = random.Random(seed)
    ends: list[tuple[float, int, RequestTicket]] = []
    probes: list[tuple[int, float]] = []
    now, next_probe, n = 0.0, 20.0, 0
    while now < seconds:
        arrival = now + rng.expovariate(rate_qps)
        while ends and ends[0][0] <= arrival:
            end, _, ticket = heapq.heappop(ends)
            while next_probe < end:
                probes.append(tracker.report(next_probe))
                next_probe += 0.25
            tracker.finish(ticket, end)
        while next_probe < arrival:
            probes.append(tracker.report(next_probe))
            next_probe += 0.25
        now = arrival
        n += 1
        heapq.heappush(ends, (now + rng.uniform(*service_s), n, tracker.start(now)))
    return probes


def zero_share(probes: list[tuple[int, float]]) -> float:
    return sum(1 for _, estimate in probes if estimate == 0.0) / len(probes)


@pytest.mark.parametrize("rate_qps", [0.5, 1.0, 3.0])
def test_a_slow_service_gets_estimates_where_the_fixed_window_had_none(rate_qps: float) -> None:
    fixed = drive(LoadTracker(FIXED), rate_qps=rate_qps, service_s=(2.0, 5.0), seconds=600.0)
    follows = drive(LoadTracker(), rate_qps=rate_qps, service_s=(2.0, 5.0), seconds=600.0)
    assert [rif for rif, _ in fixed] == [rif for rif, _ in follows], "same arrivals: the same RIFs occur"
    # The old rule: at most of the RIFs that occur, nothing finished in the last second.
    assert zero_share(fixed) > 0.4
    assert zero_share(follows) < 0.05
    # And what it reports is the service time, not noise: 2-5 s at every RIF that occurs.
    assert all(2.0 <= estimate <= 5.0 for _, estimate in follows if estimate)


def test_a_slow_service_widens_the_window_to_k_median_service_times() -> None:
    tracker = LoadTracker()
    drive(tracker, rate_qps=1.0, service_s=(3.0, 3.0), seconds=60.0)
    k = tracker.settings.window_service_times
    assert tracker.window() == pytest.approx(k * 3.0)


def test_a_fast_service_keeps_the_fixed_window_and_the_same_estimates() -> None:
    fixed, follows = LoadTracker(FIXED), LoadTracker()
    a = drive(fixed, rate_qps=400.0, service_s=(0.0005, 0.0015), seconds=30.0)
    b = drive(follows, rate_qps=400.0, service_s=(0.0005, 0.0015), seconds=30.0)
    assert follows.window() == 1.0
    assert a == b, "a 1 ms service answers every probe exactly as with the fixed 1 s window"


def test_one_stuck_request_does_not_stretch_the_window() -> None:
    tracker = LoadTracker()
    ticket = tracker.start(0.0)
    for i in range(100):
        t = tracker.start(1.0 + i * 0.01)
        tracker.finish(t, 1.001 + i * 0.01)
    tracker.finish(ticket, 600.0)  # stuck for 10 minutes, then answered
    assert tracker.window() == 1.0, "the median of recent latencies ignores one outlier"


def test_the_window_is_bounded_above() -> None:
    tracker = LoadTracker(LoadTrackerSettings(max_window_s=60.0))
    for _ in range(40):  # the service turned very slow: every request takes 100 s
        ticket = tracker.start(0.0)
        tracker.finish(ticket, 100.0)
    assert tracker.window() == 60.0
    assert tracker.estimate(160.0) == pytest.approx(100.0), "exactly max_window_s after: still fresh"
    assert tracker.estimate(160.0 + 2**-20) == 0.0, "past max_window_s the samples expire, however slow"


def test_window_s_stays_the_floor_when_above_max_window_s() -> None:
    tracker = LoadTracker(LoadTrackerSettings(window_s=5.0, max_window_s=2.0))
    ticket = tracker.start(0.0)
    tracker.finish(ticket, 10.0)
    assert tracker.window() == 5.0


def test_memory_stays_bounded_with_a_long_window() -> None:
    settings = LoadTrackerSettings(samples_per_bucket=8, service_samples=16)
    tracker = LoadTracker(settings)
    rng = random.Random(3)
    held: list[RequestTicket] = []
    for i in range(20_000):  # slow requests at RIFs up to ~2000, all within one 60 s window
        now = i * 0.001
        held.append(tracker.start(now))
        if len(held) > rng.randrange(1, 2000):
            tracker.finish(held.pop(rng.randrange(len(held))), now + 0.0005)
    stored = sum(len(b) for b in tracker._buckets if b) + len(tracker._recent)
    bound = (settings.exact_buckets + _LOG_BUCKETS) * settings.samples_per_bucket + settings.service_samples
    assert tracker.window() > settings.window_s, "the long window is in force"
    assert stored <= bound
    assert sum(1 for b in tracker._buckets if b) > 32, "samples spread over exact and logarithmic buckets"

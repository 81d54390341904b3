"""``TrafficHistory``: the last few minutes of one pool's traffic, one point per step, in bounded memory.

Sans-IO. The caller owns the counters (cumulative, as Prometheus counters are) and hands their current
values to ``record(now, ...)`` as often as it likes; a point is kept once per ``step_s``, made of the
differences since the previous point:

- requests per second (the pool's answered requests over the step),
- the 99th percentile of their duration, interpolated within histogram buckets as Prometheus'
  ``histogram_quantile`` does (so as precise as the buckets), None in a step without requests,
- each backend's attempts, the ``max_backends`` busiest of the step by name and the rest as one
  "other" count.

Memory is bounded by ``window_s / step_s`` points of at most ``max_backends + 1`` counts each, plus the
last cumulative value of each current member (to take differences; members that leave are forgotten).
A counter that went down (a departed member's series removed and started again) counts from zero.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The most points one history keeps, whatever window and step are asked for.
MAX_POINTS = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class HistorySettings:
    """What the status page's charts cover.

    Parameters:
        window_s: how far back the charts go.
        step_s: one point per this many seconds (sampled by the gateway's gauge loop, so at least once
            a second whatever is set here).
        max_backends: backends charted by name in each pool, the busiest; the others are summed as
            "other".
    """

    window_s: float = 300.0
    step_s: float = 5.0
    max_backends: int = 5

    def __post_init__(self) -> None:
        step, window = self.step_s, self.window_s
        if not (isinstance(step, (int, float)) and 0.1 <= step < math.inf):
            raise ValueError(f"HistorySettings.step_s must be a number >= 0.1, got {step!r}")
        if not (isinstance(window, (int, float)) and step <= window <= step * MAX_POINTS):
            raise ValueError(f"HistorySettings.window_s must be between step_s and {MAX_POINTS} steps, got {window!r}")
        if not (isinstance(self.max_backends, int) and 1 <= self.max_backends <= 50):
            raise ValueError(f"HistorySettings.max_backends must be an integer in [1, 50], got {self.max_backends!r}")

    @property
    def points(self) -> int:
        """The most points a history keeps."""
        return max(1, round(self.window_s / self.step_s))


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One step: when it ended, requests per second, p99 duration, the busiest backends' attempts, the rest."""

    at: float
    rps: float
    p99_s: float | None
    backends: tuple[tuple[str, int], ...]
    other: int

    @property
    def attempts(self) -> int:
        return self.other + sum(count for _, count in self.backends)


Buckets = Sequence[tuple[float, float]]
"""A histogram's cumulative counts by upper bound, ascending, ending with ``math.inf``."""


class TrafficHistory:
    """One pool's recent traffic; see the module docstring."""

    def __init__(self, settings: HistorySettings | None = None) -> None:
        self.settings = settings if settings is not None else HistorySettings()
        self._points: deque[HistoryPoint] = deque(maxlen=self.settings.points)
        self._last_at: float | None = None
        self._last_requests = 0.0
        self._last_buckets: dict[float, float] = {}
        self._last_backends: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._points)

    def due(self, now: float) -> bool:
        """Whether ``record(now, ...)`` would keep a point (read the counters only then)."""
        # A tenth of a step early is due: a loop ticking every step wakes a little late each time, and
        # points drifting later would stretch the window's points over more than the window.
        return self._last_at is None or now - self._last_at >= 0.9 * self.settings.step_s

    def record(self, now: float, requests: float, durations: Buckets, backends: Mapping[str, float]) -> bool:
        """The counters' cumulative values at ``now``; True when a point was kept.

        ``requests``: requests answered; ``durations``: their duration histogram; ``backends``: attempts
        per backend (its members now). The first call only sets the baseline.
        """
        if not self.due(now):
            return False
        last_at, self._last_at = self._last_at, now
        deltas = {url: _delta(value, self._last_backends.get(url, 0.0)) for url, value in backends.items()}
        self._last_backends = dict(backends)  # members that left are forgotten here
        buckets = [(bound, _delta(count, self._last_buckets.get(bound, 0.0))) for bound, count in durations]
        self._last_buckets = dict(durations)
        answered = _delta(requests, self._last_requests)
        self._last_requests = requests
        if last_at is None:
            return False
        busiest = sorted(((url, int(n)) for url, n in deltas.items() if n > 0), key=lambda item: (-item[1], item[0]))
        keep = self.settings.max_backends
        self._points.append(
            HistoryPoint(
                at=now,
                rps=answered / (now - last_at),
                p99_s=quantile(0.99, buckets),
                backends=tuple(busiest[:keep]),
                other=sum(n for _, n in busiest[keep:]),
            )
        )
        return True

    def points(self, now: float) -> list[HistoryPoint]:
        """The points of the last ``window_s`` (and a step, the time since the last point), oldest first.

        The buffer bounds their number; the horizon drops those left from before a pause."""
        horizon = now - self.settings.window_s - self.settings.step_s
        return [p for p in self._points if p.at > horizon]

    def as_json(self, now: float) -> dict[str, Any]:
        """The points as parallel lists for charts: ages (seconds before ``now``), rps, p99 in ms, and
        each charted backend's share of the attempts per point (the ``max_backends`` busiest over the
        window by name, the rest as one series with ``"url": null``; a share is null in a point
        without attempts)."""
        points = self.points(now)
        totals: dict[str, int] = {}
        for p in points:
            for url, count in p.backends:
                totals[url] = totals.get(url, 0) + count
        keep = self.settings.max_backends
        named = [url for url, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:keep]]
        series: list[dict[str, Any]] = [{"url": url, "share": []} for url in named]
        other: list[float | None] = []
        for p in points:
            total = p.attempts
            counts = dict(p.backends)
            for s, url in zip(series, named, strict=True):
                s["share"].append(None if total == 0 else round(counts.get(url, 0) / total, 4))
            rest = total - sum(counts.get(url, 0) for url in named)
            other.append(None if total == 0 else round(rest / total, 4))
        if any(share for share in other):
            series.append({"url": None, "share": other})
        return {
            "window_s": self.settings.window_s,
            "step_s": self.settings.step_s,
            "age_s": [round(now - p.at, 3) for p in points],
            "rps": [round(p.rps, 3) for p in points],
            "p99_ms": [None if p.p99_s is None else round(p.p99_s * 1000, 3) for p in points],
            "backends": series,
        }


def _delta(value: float, last: float) -> float:
    # A counter that went down was removed and started again: it counts from zero.
    return value - last if value >= last else value


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of a histogram of cumulative bucket counts, interpolated linearly within its
    bucket (from 0 for the first); the highest finite bound when it falls in the ``+Inf`` bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound

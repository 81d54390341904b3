"""``PoolHistories``: each pool's ``TrafficHistory``, fed from the counters ``PrequalMetrics`` already keeps.

The scheduler's gauge loop calls ``sample(now, pools)`` every second; the counters are read (with
prometheus_client's ``collect()``) only when some pool's history is due a point, every ``step_s``. So
the request path pays nothing: the counts are the ones the forwarder makes for ``/metrics`` anyway.

Under ``PROMETHEUS_MULTIPROC_DIR`` each worker reads its own counters: its history is its own share
of the traffic, as its status page's tables are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from prequal_middleware.core.history import HistorySettings, TrafficHistory
from prequal_middleware.gateway.metrics import PrequalMetrics


class PoolHistories:
    """The ``TrafficHistory`` of every pool by name, sampled from ``metrics``."""

    def __init__(self, metrics: PrequalMetrics, settings: HistorySettings | None = None) -> None:
        self.settings = settings if settings is not None else HistorySettings()
        self._metrics = metrics
        self._pools: dict[str, TrafficHistory] = {}

    def sample(self, now: float, pools: Iterable[str]) -> None:
        """Record a point for each of ``pools`` that is due one; pools not listed are forgotten."""
        names = list(pools)
        for gone in self._pools.keys() - set(names):
            del self._pools[gone]
        histories = [self._pools.setdefault(name, TrafficHistory(self.settings)) for name in names]
        if not any(h.due(now) for h in histories):
            return
        requests, durations, attempts = self._read()
        for name, history in zip(names, histories, strict=True):
            buckets = sorted(durations.get(name, {}).items())
            history.record(now, requests.get(name, 0.0), buckets, attempts.get(name, {}))

    def as_json(self, pool: str, now: float) -> dict[str, Any] | None:
        """The pool's history for the status page, or None before it was first sampled."""
        history = self._pools.get(pool)
        return None if history is None else history.as_json(now)

    def _read(self) -> tuple[dict[str, float], dict[str, dict[float, float]], dict[str, dict[str, float]]]:
        """Requests and attempts by pool (and backend), and the request-duration buckets by pool."""
        m = self._metrics
        requests: dict[str, float] = {}
        durations: dict[str, dict[float, float]] = {}
        attempts: dict[str, dict[str, float]] = {}
        for family in m.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    pool = s.labels["pool"]
                    requests[pool] = requests.get(pool, 0.0) + s.value
        for family in m.request_duration.collect():
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = s.labels["le"]
                    durations.setdefault(s.labels["pool"], {})[math.inf if le == "+Inf" else float(le)] = s.value
        for family in m.upstream_requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    by_backend = attempts.setdefault(s.labels["pool"], {})
                    backend = s.labels["backend"]
                    by_backend[backend] = by_backend.get(backend, 0.0) + s.value
        return requests, durations, attempts

"""``PrequalMetrics``: the gateway's Prometheus metrics, on a ``CollectorRegistry`` you inject.

Never the global registry: two gateways in one process (or a test suite) keep separate metrics.
Labels are bounded: ``pool`` (a pool's name: its prefix for a pool declared by one; every route to
the pool counts under it), ``backend`` (a member's URL), ``code_class``
(``2xx`` ... ``5xx``), and small enums (``outcome``, ``reason``, ``result``, ``state``, ``event``); never a
raw path or a client address.

Works under ``PROMETHEUS_MULTIPROC_DIR`` (``uvicorn --workers N``): every metric is a plain counter,
gauge or histogram (no custom collector), gauges declare how workers combine, and ``render`` reads
all workers' files in that mode.

The request path does not call prometheus_client: ``count`` and ``observe`` add to plain dicts (about
0.2 µs each, against 1-2 µs for a labelled child's ``inc``/``observe``, which takes a lock and, for a
histogram, walks its buckets in Python), and ``flush`` adds what they hold to the Prometheus metrics.
``render`` flushes first, so ``/metrics`` is always current; the gateway's gauge loop flushes every
second, so a registry read another way (your own exporter) is at most a second behind. Under
``PROMETHEUS_MULTIPROC_DIR`` nothing is held back: every worker's ``/metrics`` reads the others' files,
and a worker may stop between two flushes.

``render`` (the admin ``/metrics``) leaves out the ``*_created`` series prometheus_client adds to
counters and histograms: they double the series count and Prometheus' text format does not need them.
It drops them from its own output rather than calling ``prometheus_client.disable_created_metrics()``,
which would change every registry in the process. Exposing ``PrequalMetrics.registry`` through an
exporter of your own keeps them unless you set ``PROMETHEUS_DISABLE_CREATED_SERIES=true``.

    metrics = PrequalMetrics(CollectorRegistry())
    gateway = Gateway(pools=[...], metrics=metrics)
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Request latencies from sub-millisecond proxying to multi-second upstreams.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Probes are loopback or in-datacenter round trips.
PROBE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_CODE_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
# A background loop's error is logged once per distinct error per this many seconds; the rest are counted.
LOOP_ERROR_LOG_INTERVAL_S = 60.0
# Distinct errors remembered for that; beyond it the oldest are forgotten (their next one is logged again).
LOOP_ERROR_KINDS = 256


def code_class(status: int) -> str:
    return _CODE_CLASSES.get(status // 100, "other")


class PrequalMetrics:
    """Every metric the gateway exports (prefix ``prequal_``).

    Parameters:
        registry: where the metrics live; a fresh ``CollectorRegistry()`` by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "prequal_requests",
            "Requests the gateway answered, by pool and status class",
            ["pool", "code_class"],
            registry=r,
        )
        self.request_duration = Histogram(
            "prequal_request_duration_seconds",
            "Time from a request's arrival to its last response byte, by pool",
            ["pool"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            "prequal_upstream_requests",
            "Attempts sent to backends, by outcome (success, failure, connect_error, timeout, cancelled)",
            ["pool", "backend", "outcome"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "prequal_upstream_latency_seconds",
            "Time from sending an attempt to the backend's response headers, by pool",
            ["pool"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "prequal_in_flight",
            "Requests in flight to the pool's backends, sampled every second",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.selections = Counter(
            "prequal_selections",
            "Backend choices by reason (cold, hot, fallback, panic, policy)",
            ["pool", "reason"],
            registry=r,
        )
        self.retries = Counter("prequal_retries", "Attempts retried on another backend", ["pool"], registry=r)
        self.gateway_errors = Counter(
            "prequal_gateway_errors",
            "Error responses the gateway made itself, by error",
            ["pool", "error"],
            registry=r,
        )
        self.probes = Counter(
            "prequal_probes",
            "Probes by result (ok, failed, unsupported, skipped)",
            ["pool", "result"],
            registry=r,
        )
        self.probe_duration = Histogram(
            "prequal_probe_duration_seconds",
            "Probe round trips that answered",
            ["pool"],
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.probe_pool_size = Gauge(
            "prequal_probe_pool_size",
            "Probes pooled (Prequal), summed over clients",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backends = Gauge(
            "prequal_backends",
            "Members by state (healthy, unhealthy, ejected, draining)",
            ["pool", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ejections = Counter("prequal_ejections", "Backends ejected by outlier detection", ["pool"], registry=r)
        self.health_checks = Counter(
            "prequal_health_checks",
            "Active health checks by result (ok, failed)",
            ["pool", "result"],
            registry=r,
        )
        self.registry_events = Counter(
            "prequal_registry_events",
            "Registry events (register, heartbeat, unregister, expired, rejected)",
            ["event"],
            registry=r,
        )
        self.registry_stale = Gauge(
            "prequal_registry_stale_seconds",
            "Seconds since the registry's store became unreachable (0 when fresh)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.probe_backends = Gauge(
            "prequal_probe_backends",
            "Backends the pool's probe client keeps state for (departed members are dropped)",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.probe_connections = Gauge(
            "prequal_probe_connections",
            "Probe connections open, idle or busy",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.loop_errors = Counter(
            "prequal_loop_errors",
            "Iterations of a background loop that raised and were skipped, by loop",
            ["loop"],
            registry=r,
        )
        self.build_info = Gauge(
            "prequal_build_info",
            "Always 1; the labels say which prequal-middleware, Python and upstream transport run",
            ["version", "python", "transport"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._cache: dict[tuple[Any, ...], Any] = {}
        # What the request path counted and observed since the last flush (see ``count``, ``observe``).
        self._counts: dict[tuple[Any, ...], int] = {}
        self._observed: dict[tuple[Any, ...], list[float]] = {}
        self._bounds: dict[Histogram, tuple[float, ...]] = {
            h: (*buckets, math.inf)
            for h, buckets in (
                (self.request_duration, DURATION_BUCKETS),
                (self.upstream_latency, DURATION_BUCKETS),
                (self.probe_duration, PROBE_BUCKETS),
            )
        }
        self._batched_histograms = True  # False once a prometheus_client without the layout we add to is seen
        # With several workers another worker's /metrics reads this one's files: no batching, each count
        # is written at once, as a worker could stop (or be read) between two flushes.
        self._direct = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def set_build_info(self, transport: str) -> None:
        """Publish ``prequal_build_info`` (one series: a restart with another transport replaces it)."""
        from prequal_middleware import __version__  # the package is fully imported by the time a gateway starts

        self.build_info.clear()
        self.build_info.labels(__version__, platform.python_version(), transport).set(1)

    def child(self, metric: Any, *labels: str) -> Any:
        """The labelled child, cached: ``labels()`` takes a lock and builds a key on every call."""
        key = (id(metric), *labels)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = metric.labels(*labels)
        return found

    def count(self, metric: Counter, *labels: str) -> None:
        """Add 1 to ``metric{labels}`` at the next ``flush`` (the request path's cheap ``inc``)."""
        if self._direct:
            self.child(metric, *labels).inc()
            return
        key = (metric, *labels)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    def observe(self, metric: Histogram, value: float, *labels: str) -> None:
        """Observe ``value`` in ``metric{labels}`` at the next ``flush`` (the request path's cheap ``observe``).

        Kept as a count per bucket and a sum, so ``flush`` costs the same however many were observed.
        """
        if self._direct or not self._batched_histograms:
            self.child(metric, *labels).observe(value)
            return
        key = (metric, *labels)
        bounds = self._bounds[metric]
        row = self._observed.get(key)
        if row is None:
            row = self._observed[key] = [0.0] * (len(bounds) + 1)  # a count per bucket, then the sum
        # As prometheus_client: the first bucket whose upper bound is >= value (+Inf always is).
        row[bisect.bisect_left(bounds, value)] += 1
        row[-1] += value

    def flush(self) -> None:
        """Add what ``count`` and ``observe`` gathered since the last flush to the Prometheus metrics."""
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for (metric, *labels), n in counts.items():
            self.child(metric, *labels).inc(n)
        for (metric, *labels), row in observed.items():
            self._add_observations(self.child(metric, *labels), self._bounds[metric], row)

    def _add_observations(self, child: Any, bounds: tuple[float, ...], row: list[float]) -> None:
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        if self._batched_histograms and isinstance(buckets, list) and total is not None and len(buckets) == len(bounds):
            # prometheus_client's Histogram keeps a value per bucket (not cumulative) and one for the
            # sum, each with an ``inc``: what ``observe`` does n times, done once.
            # tests/test_metrics_tally.py pins that this gives what ``observe`` gives.
            total.inc(row[-1])
            for i, n in enumerate(row[:-1]):
                if n:
                    buckets[i].inc(n)
            return
        if self._batched_histograms:
            self._batched_histograms = False
            logging.getLogger(__name__).warning(
                "this prometheus_client stores histograms in another way: observations are replayed one by one"
            )
        # Each observation at its bucket's upper bound (the largest finite one for +Inf's): the bucket
        # counts stay exact, the sum is approximate for what was gathered before this was noticed.
        for i, n in enumerate(row[:-1]):
            value = bounds[i] if i < len(bounds) - 1 else bounds[-2] * 2
            for _ in range(int(n)):
                child.observe(value)

    def forget_backend(self, pool: str, backend: str) -> None:
        """Drop a departed member's series (keeps label cardinality bounded under churn)."""
        self.flush()  # else its pending counts would bring the series back at the next flush
        for outcome in ("success", "failure", "connect_error", "timeout", "cancelled"):
            self._cache.pop((id(self.upstream_requests), pool, backend, outcome), None)
            try:
                self.upstream_requests.remove(pool, backend, outcome)
            except KeyError:
                pass

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; all workers' values under ``PROMETHEUS_MULTIPROC_DIR``."""
        self.flush()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(_WithoutCreated(merged)), CONTENT_TYPE
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE


class _WithoutCreated:
    """A registry's metrics without their ``*_created`` samples; only our exposition, not the registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():
            created = metric.name + "_created"
            # collect() builds fresh Metric objects on every call: trimming them changes nothing shared.
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class LoopErrorLog:
    """What a background loop does with an iteration that raised: count it, log it rarely, go on.

    Each distinct error (loop, exception type, message) is logged with its traceback at most once per
    ``interval_s``; the next time it is logged says how many were not. Every one is counted in
    ``prequal_loop_errors_total{loop}``. A loop that fails on every iteration (a poisoned value that
    stays) therefore writes one log line a minute, not one per second or per probe.

    Parameters:
        metrics: where errors are counted.
        clock: monotonic seconds.
        logger: where errors are logged.
        interval_s: how long an error stays quiet after it was logged.
    """

    def __init__(
        self,
        metrics: PrequalMetrics,
        clock: Callable[[], float],
        logger: logging.Logger,
        interval_s: float = LOOP_ERROR_LOG_INTERVAL_S,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._logger = logger
        self._interval_s = interval_s
        self._seen: dict[tuple[str, str, str], list[float]] = {}  # -> [logged at, not logged since]

    def failed(self, loop: str, exc: BaseException) -> None:
        """Record that an iteration of ``loop`` raised ``exc`` (call from its ``except`` block)."""
        try:
            self._metrics.child(self._metrics.loop_errors, loop).inc()
        except Exception:  # the error log must not fail the loop it protects
            pass
        key = (loop, type(exc).__qualname__, str(exc)[:200])
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval_s:
            seen[1] += 1
            return
        quiet = 0 if seen is None else int(seen[1])
        self._seen.pop(key, None)
        if len(self._seen) >= LOOP_ERROR_KINDS:
            del self._seen[next(iter(self._seen))]  # insertion order: the one logged longest ago
        self._seen[key] = [now, 0]
        more = f" ({quiet} more like it since it was last logged)" if quiet else ""
        self._logger.error("%s loop: an iteration failed and was skipped%s", loop, more, exc_info=exc)

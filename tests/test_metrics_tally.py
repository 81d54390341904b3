"""``PrequalMetrics.count`` / ``observe`` / ``flush``: the request path's cheap counting gives, once
flushed, exactly what prometheus_client's own ``inc`` and ``observe`` give."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from prequal_middleware.gateway.metrics import DURATION_BUCKETS, PROBE_BUCKETS, PrequalMetrics


def samples(metrics: PrequalMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if not family.name.startswith("prequal_build_info")
    }


def feed(seed: int) -> list[tuple[str, float, tuple[str, ...]]]:
    """Counts and observations over two pools and three backends; values on, below, between and
    beyond the buckets' bounds (a bound itself belongs to its bucket: ``le``)."""
    rng = random.Random(seed)
    values = [0.0, *DURATION_BUCKETS, *PROBE_BUCKETS, 45.0, 1e-7]
    events: list[tuple[str, float, tuple[str, ...]]] = []
    for _ in range(2000):
        pool = rng.choice(["/a", "/b"])
        kind = rng.randrange(4)
        value = rng.choice(values) if rng.random() < 0.5 else rng.uniform(0, 0.2)
        if kind == 0:
            events.append(("requests", 1, (pool, rng.choice(["2xx", "5xx"]))))
        elif kind == 1:
            events.append(("upstream_requests", 1, (pool, f"http://b{rng.randrange(3)}", "success")))
        elif kind == 2:
            events.append(("request_duration", value, (pool,)))
        else:
            events.append(("probe_duration", value, (pool,)))
    return events


def apply_direct(metrics: PrequalMetrics, events: list[tuple[str, float, tuple[str, ...]]]) -> None:
    for name, value, labels in events:
        child = metrics.child(getattr(metrics, name), *labels)
        child.inc() if name.endswith("requests") else child.observe(value)


def apply_tallied(metrics: PrequalMetrics, events: list[tuple[str, float, tuple[str, ...]]]) -> None:
    for name, value, labels in events:
        if name.endswith("requests"):
            metrics.count(getattr(metrics, name), *labels)
        else:
            metrics.observe(getattr(metrics, name), value, *labels)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flushed_counts_and_histograms_equal_prometheus_clients_own(seed: int) -> None:
    direct, tallied = PrequalMetrics(CollectorRegistry()), PrequalMetrics(CollectorRegistry())
    events = feed(seed)
    apply_direct(direct, events[:1000])
    apply_tallied(tallied, events[:1000])
    tallied.flush()  # a flush in the middle, as the gauge loop does
    apply_direct(direct, events[1000:])
    apply_tallied(tallied, events[1000:])
    expected, got = samples(direct), samples(tallied)  # render() flushes the rest
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key  # sums add in another order


def test_nothing_reaches_the_registry_until_a_flush() -> None:
    metrics = PrequalMetrics(CollectorRegistry())
    metrics.count(metrics.requests, "/a", "2xx")
    metrics.observe(metrics.request_duration, 0.003, "/a")
    read = metrics.registry.get_sample_value
    assert read("prequal_requests_total", {"pool": "/a", "code_class": "2xx"}) is None
    metrics.flush()
    assert read("prequal_requests_total", {"pool": "/a", "code_class": "2xx"}) == 1.0
    assert read("prequal_request_duration_seconds_bucket", {"pool": "/a", "le": "0.0025"}) == 0.0
    assert read("prequal_request_duration_seconds_bucket", {"pool": "/a", "le": "0.005"}) == 1.0
    assert read("prequal_request_duration_seconds_sum", {"pool": "/a"}) == pytest.approx(0.003)
    metrics.flush()  # nothing pending: nothing added twice
    assert read("prequal_requests_total", {"pool": "/a", "code_class": "2xx"}) == 1.0
    assert read("prequal_request_duration_seconds_count", {"pool": "/a"}) == 1.0


def test_under_multiprocess_mode_every_count_is_written_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")  # read at construction only
    metrics = PrequalMetrics(CollectorRegistry())
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    metrics.count(metrics.requests, "/a", "2xx")
    metrics.observe(metrics.request_duration, 0.003, "/a")
    read = metrics.registry.get_sample_value
    assert read("prequal_requests_total", {"pool": "/a", "code_class": "2xx"}) == 1.0
    assert read("prequal_request_duration_seconds_count", {"pool": "/a"}) == 1.0


def test_a_departed_backend_stays_gone_after_the_next_flush() -> None:
    metrics = PrequalMetrics(CollectorRegistry())
    metrics.count(metrics.upstream_requests, "/a", "http://gone", "success")
    metrics.forget_backend("/a", "http://gone")
    metrics.flush()
    assert not [key for key in samples(metrics) if ("backend", "http://gone") in key[1]]


def test_another_histogram_layout_falls_back_to_observing_each_value() -> None:
    metrics = PrequalMetrics(CollectorRegistry())
    child = metrics.child(metrics.request_duration, "/a")
    del child._buckets  # a prometheus_client that keeps its buckets another way
    for value in (0.0007, 0.0007, 0.02, 99.0):
        metrics.observe(metrics.request_duration, value, "/a")
    metrics.child(metrics.request_duration, "/a").observe = lambda v: seen.append(v)
    seen: list[float] = []
    metrics.flush()
    # each at its bucket's bound; +Inf's beyond the last finite bound
    assert sorted(seen) == [0.001, 0.001, 0.025, 60.0]
    metrics.observe(metrics.request_duration, 0.3, "/a")  # from now on: at once, the value itself
    assert seen[-1] == 0.3

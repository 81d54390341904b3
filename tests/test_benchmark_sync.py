"""``benchmarks.overhead --rates`` with ``gateway_prequal_sync``: sync / async latency, per round."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.overhead import TARGETS_BY_NAME, Settings
from benchmarks.overhead_rates import async_twin, sync_against_async, sync_table
from benchmarks.overhead_targets import APPS
from tests.test_benchmark_rates import _sample


def test_the_sync_target_exists_and_is_not_run_by_default() -> None:
    assert "gateway_prequal_sync" in APPS and not TARGETS_BY_NAME["gateway_prequal_sync"].default


def test_async_twin() -> None:
    assert async_twin("gateway_prequal_sync") == "gateway_prequal"
    assert async_twin("gateway_prequal_sync@abc") == "gateway_prequal@abc"
    assert async_twin("gateway_prequal") is None


def test_latency_ratios_are_medians_of_same_round_pairs() -> None:
    settings = Settings(3, 10, 2, [16], ["gateway_prequal", "gateway_prequal_sync"], 0, 1, rates=[100.0])
    samples = []
    for r, (p50_async, p50_sync, p99_sync) in enumerate([(1.0, 1.5, 6.0), (2.0, 2.2, 3.3), (1.0, 2.0, 9.0)], 1):
        samples.append(dataclasses.replace(_sample("gateway_prequal", 100.0, r, 1, 1), p50_ms=p50_async, p99_ms=3.0))
        samples.append(
            dataclasses.replace(_sample("gateway_prequal_sync", 100.0, r, 1, 1), p50_ms=p50_sync, p99_ms=p99_sync)
        )
    samples.append(dataclasses.replace(_sample("gateway_prequal_sync", 100.0, 4, 1, 1), p50_ms=99.0))  # no pair
    (row,) = sync_against_async(samples, settings)
    assert row["p50_ratio"] == pytest.approx(1.5)  # 1.5, 1.1, 2.0
    assert row["p50_added_ms"] == pytest.approx(0.5)  # 0.5, 0.2, 1.0
    assert row["p99_ratio"] == pytest.approx(2.0)  # 2.0, 1.1, 3.0
    assert row["rounds"] == 3
    assert "| gateway_prequal_sync vs gateway_prequal | 100 | 1.50 | 0.50 | 2.00 |" in sync_table([row])

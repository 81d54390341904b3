"""The discrete-event fleet simulator: determinism, accounting, arrivals, a policy comparison and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simulate import main
from prequal_middleware.core import PrequalSettings
from prequal_middleware.core.sim_fleet import TRUNCATED_MEAN_FACTOR, build_fleet, draw_work
from prequal_middleware.core.simulator import SimConfig, fleet_for, percentile, simulate

# A small fleet with the default pool (m=16 of 20 replicas): Eq. 1 is undefined there, so each probe is
# used once (reuse_budget).
SMALL = SimConfig(replicas=20, clients=10, seconds=10.0, seed=3, prequal=PrequalSettings())


def _small(**changes: Any) -> SimConfig:
    return dataclasses.replace(SMALL, **changes)


def test_same_seed_gives_identical_results_and_another_seed_does_not() -> None:
    first = simulate(SMALL, "prequal", 0.9)
    again = simulate(SMALL, "prequal", 0.9)
    other = simulate(_small(seed=4), "prequal", 0.9)
    assert first.to_dict() == again.to_dict()
    assert first.events > 0 and first.requests > 1000
    assert other.requests != first.requests
    assert other.p99_ms != first.p99_ms


def test_every_policy_sees_the_same_arrivals() -> None:
    results = [simulate(SMALL, policy, 0.8) for policy in ("prequal", "round_robin", "random")]
    assert len({r.requests for r in results}) == 1
    assert len({r.rate_qps for r in results}) == 1
    assert results[0].p99_ms != results[1].p99_ms  # same arrivals, different routing


@pytest.mark.parametrize("policy", ["prequal", "round_robin", "least_request", "peak_ewma", "least_latency"])
def test_light_load_has_no_errors_and_requests_add_up(policy: str) -> None:
    result = simulate(SMALL, policy, 0.3)
    assert result.errors == 0
    assert result.successes == result.requests > 300
    assert abs(sum(result.replica_share) - 1.0) < 1e-9
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.p999_ms < 5000.0


def test_deadline_errors_are_counted_and_requests_add_up() -> None:
    config = _small(deadline_s=1.0)
    result = simulate(config, "round_robin", 1.1)
    assert result.deadline_errors > 50
    assert result.no_backend_errors == 0
    assert result.errors == result.deadline_errors + result.no_backend_errors
    assert result.requests == result.successes + result.errors
    assert result.p999_ms == pytest.approx(1000.0)  # errors count at the deadline
    assert result.p50_ms < 1000.0


@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_poisson_arrival_count_is_within_four_sigma_of_rate_times_time(warmup: float) -> None:
    # Measured requests are those sent in [warmup * seconds, seconds): Poisson(rate * that time).
    for seed in (1, 2, 3):
        config = _small(seconds=20.0, warmup_fraction=warmup, seed=seed)
        result = simulate(config, "random", 1.0)
        expected = result.rate_qps * config.seconds * (1.0 - warmup)
        assert abs(result.requests - expected) <= 4.0 * math.sqrt(expected), (seed, result.requests, expected)


def test_service_runs_at_the_allocation_while_the_antagonist_is_busy_and_faster_while_idle() -> None:
    # Identical replicas, headroom 2: an always-busy antagonist halves the speed of every query.
    same = {
        "allocation_min": 1.0,
        "allocation_max": 1.0,
        "headroom_min": 2.0,
        "headroom_max": 2.0,
        "burst_rate_hz": 0.0,
    }
    idle = simulate(_small(antagonist_duty_min=0.0, antagonist_duty_max=0.0, **same), "round_robin", 0.2)
    busy = simulate(_small(antagonist_duty_min=1.0, antagonist_duty_max=1.0, **same), "round_robin", 0.2)
    assert busy.requests == idle.requests
    assert busy.p50_ms / idle.p50_ms == pytest.approx(2.0, rel=0.1)
    assert busy.p99_ms / idle.p99_ms == pytest.approx(2.0, rel=0.15)


def test_load_one_is_the_fleets_guaranteed_capacity() -> None:
    config = SMALL
    fleet = fleet_for(config)
    assert fleet == fleet_for(config) != build_fleet(config, random.Random(0))
    allocations = [r.allocation for r in fleet.replicas]
    assert all(config.allocation_min <= a <= config.allocation_max for a in allocations)
    assert all(r.fast_speed >= r.allocation * config.headroom_min - 1e-12 for r in fleet.replicas)
    expected = sum(config.slots * a for a in allocations) / (config.work_mu_s * TRUNCATED_MEAN_FACTOR)
    assert fleet.capacity_qps == pytest.approx(expected)
    assert simulate(config, "random", 0.5).rate_qps == pytest.approx(0.5 * expected)
    for r in fleet.replicas:
        assert all(0.0 <= start <= end <= config.horizon_s for start, end in r.busy)
        assert r.allocation <= r.mean_speed(1.0, 10.0) <= r.fast_speed


def test_work_is_a_normal_truncated_at_zero_by_redrawing() -> None:
    rng = random.Random(5)
    draws = [draw_work(rng, 0.2) for _ in range(40_000)]
    assert min(draws) > 0.0
    # E[X | X > 0] for Normal(mu, mu) is 1.2876 mu; the standard error here is about 0.0008.
    assert statistics.fmean(draws) == pytest.approx(0.2 * TRUNCATED_MEAN_FACTOR, abs=0.004)
    assert TRUNCATED_MEAN_FACTOR == pytest.approx(1.2876, abs=1e-4)


def test_percentile_is_nearest_rank() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0.5) == 2.0
    assert percentile(values, 0.75) == 3.0
    assert percentile(values, 0.99) == 4.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([], 0.5) == 0.0


def test_prequal_beats_load_blind_policies_under_heterogeneous_load() -> None:
    policies = ("prequal", "prequal_probeall", "round_robin", "random")
    results = {policy: simulate(SMALL, policy, 0.9) for policy in policies}
    prequal = results["prequal"]
    assert prequal.errors == 0
    assert prequal.p99_ms < 0.8 * results["round_robin"].p99_ms, {p: r.p99_ms for p, r in results.items()}
    assert prequal.p99_ms < 0.8 * results["random"].p99_ms, {p: r.p99_ms for p, r in results.items()}
    # It routes by capacity: faster replicas get more queries; round robin spreads evenly.
    assert prequal.share_speed_corr > 0.5
    assert abs(results["round_robin"].share_speed_corr) < 0.5
    # Every draw probed without piggybacked reports; with them, the fresh reports answer some draws.
    assert results["prequal_probeall"].probes_per_query == pytest.approx(3.0, abs=0.05)
    assert 0.0 < prequal.probes_per_query < results["prequal_probeall"].probes_per_query
    assert prequal.mean_pool_size is not None and prequal.mean_pool_size > 4
    assert results["round_robin"].probes_per_query == 0.0 and results["round_robin"].mean_pool_size is None


def test_invalid_config_and_load_are_rejected() -> None:
    with pytest.raises(ValueError, match="replicas"):
        SimConfig(replicas=0)
    with pytest.raises(ValueError, match="allocation_min"):
        SimConfig(allocation_min=2.0, allocation_max=1.0)
    with pytest.raises(ValueError, match="load"):
        simulate(SMALL, "prequal", 0.0)


def test_cli_quick_writes_the_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results" / "sim.json"  # the directory is created
    code = main(
        ["--quick", "--policies", "prequal,round_robin", "--load", "0.5,0.9", "--seconds", "4", "--json", str(path)]
    )
    assert code == 0
    document = json.loads(path.read_text())
    assert set(document) == {"config", "results"}
    config = document["config"]
    assert config["replicas"] == 20 and config["clients"] == 10 and config["seconds"] == 4.0
    assert config["policies"] == ["prequal", "round_robin"] and config["loads"] == [0.5, 0.9]
    assert config["prequal"]["pool_size"] == 16 and config["prequal"]["probes_per_query"] == 3.0
    assert config["deadline_s"] == 5.0 and config["capacity_qps"] > 0 and config["quick"] is True
    results = document["results"]
    assert [(r["policy"], r["load"]) for r in results] == [
        ("prequal", 0.5),
        ("round_robin", 0.5),
        ("prequal", 0.9),
        ("round_robin", 0.9),
    ]
    for r in results:
        for key in ("requests", "errors"):
            assert isinstance(r[key], int) and r[key] >= 0
        for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms"):
            assert isinstance(r[key], float) and r[key] > 0
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["p999_ms"]
        assert r["requests"] == r["successes"] + r["errors"]
        assert len(r["replica_share"]) == 20
    out, err = capsys.readouterr()
    assert "p99_ms" in out and out.count("prequal") == 2 and out.count("round_robin") == 2
    assert err.count("\n") == 4 and "[4/4] round_robin load=0.9" in err


def test_cli_overrides_prequal_settings(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    args = [
        "--quick",
        "--policies",
        "prequal",
        "--seconds",
        "3",
        "--probes-per-query",
        "1.5",
        "--report-max-age-s",
        "0",
    ]
    args += ["--q-rif", "0.5", "--fallback", "random", "--removals-per-query", "0.5", "--deadline-s", "2"]
    args += ["--json", str(path)]
    assert main(args) == 0
    document = json.loads(path.read_text())
    assert document["config"]["prequal"]["q_rif"] == 0.5
    assert document["config"]["prequal"]["fallback"] == "random"
    assert document["config"]["prequal"]["removals_per_query"] == 0.5
    assert document["config"]["deadline_s"] == 2.0
    assert document["config"]["prequal"]["report_max_age_s"] == 0.0
    assert document["results"][0]["probes_per_query"] == pytest.approx(1.5, abs=0.05)


def test_cli_rejects_unknown_policy() -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--policies", "nope"])

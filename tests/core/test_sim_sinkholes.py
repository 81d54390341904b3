"""The simulator's sinkholes and retries, its replicas' tracker settings, and the time scaling (issue 15)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simulate import avoided_share, baseline_config, main, sinkhole_rows
from prequal_middleware.config import RetrySettings
from prequal_middleware.core import PrequalSettings, simulator as sim
from prequal_middleware.core.load_tracker import LoadTracker, LoadTrackerSettings
from prequal_middleware.core.policy import BasePolicy
from prequal_middleware.core.prequal import PrequalPolicy
from prequal_middleware.core.settings import OutlierSettings
from prequal_middleware.core.sim_fleet import build_fleet
from prequal_middleware.core.simulator import SimConfig, simulate, time_scaled
from prequal_middleware.core.types import BackendId, Outcome

# Ejection off, so every request a policy sends a sinkhole reaches it and the counts are easy to predict.
NO_EJECTION = OutlierSettings(consecutive_failures=0)
SMALL = SimConfig(replicas=4, clients=2, seconds=6.0, seed=5, sinkholes=1, outliers=NO_EJECTION)
SINKHOLE = "replica-003"  # the last replica


def _small(**changes: Any) -> SimConfig:
    return dataclasses.replace(SMALL, **changes)


def test_sinkholes_are_the_last_replicas_add_no_capacity_and_leave_the_others_as_they_were() -> None:
    config = SimConfig(replicas=20, sinkholes=2, seed=7)
    fleet = build_fleet(config, random.Random(1))
    base = build_fleet(baseline_config(config), random.Random(1))
    assert [s.sinkhole for s in fleet.replicas] == [False] * 18 + [True] * 2
    assert fleet.replicas[:18] == base.replicas
    assert fleet.capacity_qps == pytest.approx(base.capacity_qps)
    assert baseline_config(config).replicas == 18 and baseline_config(config).sinkholes == 0
    with pytest.raises(ValueError, match="sinkholes"):
        SimConfig(replicas=3, sinkholes=3)
    with pytest.raises(ValueError, match="attempts"):
        SimConfig(attempts=0)


class _Recording(PrequalPolicy):
    """Prequal that keeps what it hears from the sinkhole."""

    seen: list[tuple[str, float, Any]] = []

    def on_probe(self, backend: BackendId, now: float, rif: int, latency_s: float) -> None:
        self.seen.append(("probe" if backend == SINKHOLE else "honest probe", 0.0, (rif, latency_s)))
        super().on_probe(backend, now, rif, latency_s)

    def on_report(self, backend: BackendId, now: float, rif: int, latency_s: float) -> None:
        if backend == SINKHOLE:
            self.seen.append(("report", 0.0, (rif, latency_s)))
        super().on_report(backend, now, rif, latency_s)

    def on_finish(self, backend: BackendId, now: float, latency_s: float, outcome: Outcome) -> None:
        if backend == SINKHOLE:
            self.seen.append(("finish", latency_s, outcome))
        super().on_finish(backend, now, latency_s, outcome)


def test_a_sinkhole_fails_every_request_fast_and_reports_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    _Recording.seen = []

    def recording(name: str, config: SimConfig, rng: random.Random) -> BasePolicy:
        return _Recording(config.prequal, rng=rng, outliers=config.outliers)

    monkeypatch.setattr(sim, "_policy", recording)
    config = _small(sinkhole_fail_s=0.003, network_delay_s=0.001, warmup_fraction=0.0)
    result = simulate(config, "prequal", 0.3)
    finishes = [(latency, outcome) for kind, latency, outcome in _Recording.seen if kind == "finish"]
    answers = {value for kind, _, value in _Recording.seen if kind in ("probe", "report")}
    reports = sum(1 for kind, _, _ in _Recording.seen if kind == "report")
    honest = sum(1 for kind, _, _ in _Recording.seen if kind == "honest probe")
    assert len(finishes) > 20 and reports == len(finishes)  # every failure carries its report
    # The latency-0 diagnostic counts the honest replicas' answers only (a few may be on the wire at the end).
    assert honest <= result.honest_answers <= honest + 10
    # Every attempt there fails, one fail time and two network delays after it was sent.
    assert {outcome for _, outcome in finishes} == {Outcome.FAILURE}
    assert all(latency == pytest.approx(0.005) for latency, _ in finishes)
    assert answers == {(0, 0.0)}  # probes and piggybacked reports both say idle
    assert result.sinkhole_attempts > 0 and result.failed == result.sinkhole_attempts  # no retries by default


@pytest.mark.parametrize("policy", ["round_robin", "random", "prequal"])
def test_a_failed_attempt_is_retried_on_another_replica_and_counted(policy: str) -> None:
    without = simulate(_small(attempts=1), policy, 0.5)
    assert without.retries == 0 and without.attempts == without.requests
    assert without.failed == without.sinkhole_attempts > 10
    assert without.errors == without.failed + without.deadline_errors + without.no_backend_errors
    assert without.successes == without.requests - without.errors

    retried = simulate(_small(attempts=2), policy, 0.5)
    # One sinkhole: every retry excludes it, lands on an honest replica and succeeds.
    assert retried.retries == retried.sinkhole_attempts > 10
    assert retried.attempts == retried.requests + retried.retries
    assert retried.failed == 0 and retried.successes == retried.requests
    assert retried.p99_ok_ms <= retried.p99_ms


def test_retries_stop_when_the_budget_is_spent() -> None:
    spent = _small(attempts=3, retry_budget_ratio=0.0, retry_budget_min_per_s=0.0)
    result = simulate(spent, "round_robin", 0.5)
    assert result.retries == 0 and result.failed == result.sinkhole_attempts > 10
    some = simulate(dataclasses.replace(spent, retry_budget_min_per_s=0.2), "round_robin", 0.5)
    assert 0 < some.retries < some.sinkhole_attempts  # 2 retries per 10 s window per client


def test_the_retry_budget_defaults_are_the_gateways() -> None:
    gateway, config = RetrySettings(), SimConfig()
    assert (config.retry_budget_ratio, config.retry_budget_min_per_s, config.retry_budget_window_s) == (
        gateway.budget_ratio,
        gateway.budget_min_per_s,
        gateway.budget_window_s,
    )


def test_the_oracle_never_sends_to_a_sinkhole_and_matches_the_fleet_without_them() -> None:
    config = SimConfig(replicas=10, clients=2, seconds=5.0, seed=2, sinkholes=2)
    with_sinkholes = simulate(config, "oracle", 0.9)
    without = simulate(baseline_config(config), "oracle", 0.9)
    assert with_sinkholes.sinkhole_attempts == 0 and with_sinkholes.failed == 0
    assert with_sinkholes.requests == without.requests
    assert with_sinkholes.p99_ok_ms == without.p99_ok_ms and with_sinkholes.p50_ms == without.p50_ms


def test_avoided_share_and_failures_on_known_numbers() -> None:
    # 1000 requests, 2 sinkholes of 20: round robin (an even share) sends them 100.
    assert avoided_share(10, 1000, 2, 20) == pytest.approx(0.9)
    assert avoided_share(100, 1000, 2, 20) == pytest.approx(0.0)
    assert avoided_share(0, 1000, 2, 20) == 1.0
    assert avoided_share(0, 0, 2, 20) is None
    config = SimConfig(replicas=20, sinkholes=2)
    template = simulate(SimConfig(replicas=2, clients=1, seconds=1.0), "round_robin", 0.1)

    def run(policy: str, sinkhole: int, failed: int, p99: float) -> sim.RunResult:
        return dataclasses.replace(
            template, policy=policy, load=0.9, requests=1000, sinkhole_attempts=sinkhole, failed=failed, p99_ok_ms=p99
        )

    results = [run("prequal", 30, 1, 110.0), run("round_robin", 60, 2, 500.0)]
    baseline = [run("prequal", 0, 0, 100.0), run("round_robin", 0, 0, 500.0)]
    rows = {r["policy"]: r for r in sinkhole_rows(results, baseline, config)}
    assert rows["prequal"]["even_share_attempts"] == pytest.approx(100.0)
    assert rows["prequal"]["avoided"] == pytest.approx(0.7)
    assert rows["prequal"]["avoided_vs_round_robin"] == pytest.approx(0.5)
    assert rows["prequal"]["failed_share"] == pytest.approx(0.001)
    assert rows["prequal"]["p99_change"] == pytest.approx(0.1)
    assert rows["round_robin"]["avoided"] == pytest.approx(0.4) and rows["round_robin"]["p99_change"] == 0.0


def test_the_config_tracker_settings_reach_every_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[LoadTrackerSettings] = []

    class Spy(LoadTracker):
        def __init__(self, settings: LoadTrackerSettings | None = None) -> None:
            super().__init__(settings)
            made.append(self.settings)

    monkeypatch.setattr(sim, "LoadTracker", Spy)
    settings = LoadTrackerSettings(window_s=0.5, window_service_times=3.0)
    simulate(_small(sinkholes=0, seconds=1.0, tracker=settings), "prequal", 0.2)
    assert len(made) == 4 and all(s is settings for s in made)


def test_the_fixed_window_answers_latency_zero_more_often_on_a_slow_service() -> None:
    slow = time_scaled(SimConfig(replicas=10, clients=4, seconds=4.0, seed=1, prequal=PrequalSettings()), 8.0)
    fixed = simulate(dataclasses.replace(slow, tracker=LoadTrackerSettings(window_service_times=0)), "prequal", 0.7)
    following = simulate(slow, "prequal", 0.7)
    assert fixed.honest_answers > 500 and following.honest_answers > 500
    assert fixed.zero_latency_share > following.zero_latency_share + 0.2


SCALED = {
    "seconds",
    "deadline_s",
    "work_mu_s",
    "antagonist_period_min_s",
    "antagonist_period_max_s",
    "burst_min_s",
    "burst_max_s",
}


def test_time_scaling_scales_every_service_time_constant_and_nothing_else() -> None:
    base = SimConfig(seed=3)
    scaled = time_scaled(base, 8.0)
    for field in dataclasses.fields(SimConfig):
        before, after = getattr(base, field.name), getattr(scaled, field.name)
        if field.name in SCALED:
            assert after == pytest.approx(8.0 * before), field.name
        elif field.name == "burst_rate_hz":
            assert after == pytest.approx(before / 8.0)
        else:
            assert after == before, field.name
    assert scaled.mean_work_s == pytest.approx(8.0 * base.mean_work_s)
    with pytest.raises(ValueError, match="time scale"):
        time_scaled(base, 0.0)


def test_a_time_scaled_fleet_has_the_same_shape_at_the_same_load() -> None:
    base = SimConfig(replicas=10, clients=4, seconds=4.0, seed=1)
    fast, slow = simulate(base, "round_robin", 0.7), simulate(time_scaled(base, 4.0), "round_robin", 0.7)
    assert slow.rate_qps == pytest.approx(fast.rate_qps / 4.0)
    assert abs(slow.requests - fast.requests) <= 0.02 * fast.requests


def test_cli_sinkholes_and_time_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sink.json"
    args = ["--replicas", "10", "--clients", "2", "--seconds", "2", "--policies", "prequal,round_robin"]
    args += ["--sinkholes", "1", "--attempts", "2", "--warmup-fraction", "0", "--time-scale", "2"]
    args += ["--window-service-times", "0", "--consecutive-failures", "3", "--json", str(path)]
    assert main(args) == 0
    document = json.loads(path.read_text())
    config = document["config"]
    assert config["sinkholes"] == 1 and config["attempts"] == 2 and config["warmup_fraction"] == 0.0
    assert config["time_scale"] == 2.0 and config["seconds"] == 4.0 and config["work_mu_s"] == pytest.approx(0.4)
    assert config["tracker"]["window_service_times"] == 0.0 and config["outliers"]["consecutive_failures"] == 3
    rows = document["sinkholes"]
    assert [r["policy"] for r in rows] == ["prequal", "round_robin"]
    assert all(r["baseline_p99_ms"] > 0 and r["avoided"] is not None for r in rows)
    assert "sinkholes: avoided share" in capsys.readouterr().out

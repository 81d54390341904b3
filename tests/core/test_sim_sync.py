"""Sync mode in the fleet simulator: determinism, the wait inside every latency and deadline, the choice
among a round's answers, and the CLI's settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.simulate import main
from prequal_middleware.core import PrequalSettings
from prequal_middleware.core.load_tracker import LoadTracker, RequestTicket
from prequal_middleware.core.simulator import SIM_POLICIES, SimConfig, simulate

SMALL = SimConfig(replicas=20, clients=10, seconds=10.0, seed=3, prequal=PrequalSettings())

# Identical replicas (one speed, no antagonist) at light load: nothing queues, so a query's latency is
# the network's round trip, its work at the one speed, and its sync wait; the work draws are the same
# in every run of a seed (common random numbers).
IDENTICAL = dataclasses.replace(
    SMALL,
    allocation_min=1.0,
    allocation_max=1.0,
    headroom_min=1.5,
    headroom_max=1.5,
    antagonist_duty_min=0.0,
    antagonist_duty_max=0.0,
    burst_rate_hz=0.0,
)


def _sync(config: SimConfig, **settings: Any) -> SimConfig:
    return dataclasses.replace(config, prequal=dataclasses.replace(config.prequal, **settings))


def test_same_seed_same_result_and_sync_probes_d_per_query() -> None:
    first = simulate(SMALL, "prequal_sync", 0.9)
    assert first.to_dict() == simulate(SMALL, "prequal_sync", 0.9).to_dict()
    other = simulate(dataclasses.replace(SMALL, seed=4), "prequal_sync", 0.9)
    assert other.p99_ms != first.p99_ms
    asynchronous = simulate(SMALL, "prequal", 0.9)
    assert first.requests == asynchronous.requests > 2000  # the same arrivals
    assert first.errors == 0 and first.p99_ms != asynchronous.p99_ms
    # Every round got its answers in time (a 1 ms round trip, 10 ms to wait): no asynchronous choice,
    # so no probe beyond the d = 3 of each query but the idle ones.
    assert first.sync_fallback_rate == 0.0 and first.fallback_rate == 0.0
    assert 3.0 <= first.probes_per_query < 3.02
    assert first.sync_wait_ms == pytest.approx(2000.0 * SMALL.network_delay_s)
    assert asynchronous.sync_wait_ms == 0.0 and asynchronous.sync_fallback_rate is None


def test_the_mode_setting_makes_prequal_sync_as_in_the_gateway() -> None:
    assert "prequal_sync" in SIM_POLICIES
    by_setting = simulate(_sync(SMALL, mode="sync"), "prequal", 0.7)
    by_name = simulate(SMALL, "prequal_sync", 0.7)
    assert {**by_setting.to_dict(), "policy": "-"} == {**by_name.to_dict(), "policy": "-"}


@pytest.mark.parametrize(
    ("delay_s", "wait_s", "waited_ms", "fallback_rate"),
    [
        (0.005, 0.05, 10.0, 0.0),  # the answers come after a 10 ms round trip, inside the wait
        (0.01, 0.005, 5.0, 1.0),  # a 20 ms round trip: every wait runs out, the asynchronous choice decides
    ],
)
def test_every_latency_includes_its_wait(delay_s: float, wait_s: float, waited_ms: float, fallback_rate: float) -> None:
    config = _sync(dataclasses.replace(IDENTICAL, network_delay_s=delay_s), sync_wait_s=wait_s)
    asynchronous = simulate(config, "prequal", 0.05)
    sync = simulate(config, "prequal_sync", 0.05)
    assert sync.requests == asynchronous.requests > 100
    assert sync.errors == asynchronous.errors == 0
    assert sync.sync_wait_ms == pytest.approx(waited_ms)
    assert sync.sync_fallback_rate == fallback_rate
    # Each latency is the asynchronous one plus the wait (nothing queues), so every percentile moves by it.
    for metric in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
        assert getattr(sync, metric) - getattr(asynchronous, metric) == pytest.approx(waited_ms, abs=1e-6), metric
    if fallback_rate:  # the asynchronous choice asks for its own probes on top of the d = 3
        assert sync.probes_per_query > 3.5


def test_a_deadline_reached_during_the_wait_ends_the_query_unsent() -> None:
    # Answers after 40 ms, a 30 ms deadline: every query times out waiting, none reaches a replica.
    config = _sync(dataclasses.replace(IDENTICAL, network_delay_s=0.02, deadline_s=0.03), sync_wait_s=0.5)
    result = simulate(config, "prequal_sync", 0.05)
    assert result.requests > 100
    assert result.deadline_errors == result.errors == result.requests
    assert result.attempts == 0 and sum(result.replica_share) == 0.0
    assert result.sync_wait_ms == pytest.approx(30.0)
    assert result.p50_ms == pytest.approx(30.0)


def _starts_at_the_least_loaded(monkeypatch: pytest.MonkeyPatch, config: SimConfig, policy: str) -> tuple[int, int]:
    """Run ``policy`` and count the queries that reached a replica with the fewest in flight, and all."""
    trackers: list[LoadTracker] = []
    counts = [0, 0]
    init, start = LoadTracker.__init__, LoadTracker.start

    def tracked_init(self: LoadTracker, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        trackers.append(self)

    def checked_start(self: LoadTracker, now: float) -> RequestTicket:
        counts[0] += self.rif == min(t.rif for t in trackers)
        counts[1] += 1
        return start(self, now)

    monkeypatch.setattr(LoadTracker, "__init__", tracked_init)
    monkeypatch.setattr(LoadTracker, "start", checked_start)
    simulate(config, policy, 0.9)
    monkeypatch.undo()
    assert len(trackers) == config.replicas
    return counts[0], counts[1]


def test_sync_mode_sends_each_query_to_the_least_loaded_replica_it_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    # One client, two replicas, both probed (d = 2: it waits for both), no network delay: the answers are
    # the replicas' RIF when the query is sent, and with Q_RIF 0 HCL takes the lowest RIF (the hot ones
    # are above the lowest RIF in the history, which holds this round's answers; the cold ones equal it).
    config = dataclasses.replace(
        SMALL, replicas=2, clients=1, seconds=60.0, network_delay_s=0.0, prequal=PrequalSettings(q_rif=0.0)
    )
    config = _sync(config, sync_probes=2)
    least, total = _starts_at_the_least_loaded(monkeypatch, config, "prequal_sync")
    assert total > 1000 and least == total
    # The check can fail: random choices (and stale asynchronous ones) often join the longer queue.
    for policy in ("random", "prequal"):
        least, total = _starts_at_the_least_loaded(monkeypatch, config, policy)
        assert least < 0.95 * total, policy
    assert simulate(config, "prequal_sync", 0.9).sync_fallback_rate == 0.0


def test_the_cli_runs_sync_mode_and_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sync.json"
    args = ["--quick", "--seconds", "3", "--policies", "prequal,prequal_sync", "--load", "0.7"]
    assert main([*args, "--sync-probes", "4", "--sync-wait-s", "0.02", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "wait_ms" in table and "sync_fb" in table
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["config"]["prequal"]["sync_probes"] == 4
    assert document["config"]["prequal"]["sync_wait_s"] == 0.02
    assert document["config"]["prequal"]["mode"] == "async"  # prequal stays asynchronous beside prequal_sync
    by_policy = {r["policy"]: r for r in document["results"]}
    assert 4.0 <= by_policy["prequal_sync"]["probes_per_query"] < 4.1
    assert by_policy["prequal_sync"]["sync_wait_ms"] == pytest.approx(1.0)
    assert by_policy["prequal"]["sync_fallback_rate"] is None
    for bad, message in (
        (["--sync-probes", "1"], "sync_probes must be an integer >= 2"),
        (["--sync-wait-s", "0"], "sync_wait_s must be a finite number > 0"),
        (["--network-delay-s", "-0.001"], "network_delay_s"),
    ):
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err

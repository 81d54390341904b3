"""The simulator's oracle (the fleet model's bound) and the CLI's excess-over-the-oracle figures."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

import prequal_middleware.core as core
from benchmarks import plotting
from benchmarks.simulate import format_limit, is_peer, limit_rows, main, removed_share
from prequal_middleware.config import UpstreamPool
from prequal_middleware.core import POLICY_CLASSES, PrequalSettings, create_policy
from prequal_middleware.core.sim_oracle import OracleView, oracle_choose, project_slots
from prequal_middleware.core.simulator import ORACLE, ORACLE_MEANWORK, SIM_POLICIES, RunResult, SimConfig, simulate
from prequal_middleware.exceptions import ConfigurationError

RNG = random.Random(0)


def _view(slots: int, speed: float, running: tuple[float, ...] = (), waiting: tuple[float, ...] = ()) -> OracleView:
    """A replica in service on ``running`` (end times) with ``waiting`` works routed at time 0 behind them."""
    view = OracleView(slots, speed)
    for i, end in enumerate(running):
        key = ("running", i)
        view.route(key, 0.0, 0.0, 0.0)
        view.start(key, end)
    view.stale = True  # the hand-built running ends replace the projection
    for i, work in enumerate(waiting):
        view.route(("waiting", i), 0.0, 0.0, work)
    return view


# --- the rule on hand-built fleet states ---------------------------------------------------------------


def test_projection_serves_the_fifo_on_the_earliest_free_slot_at_the_current_speed() -> None:
    # Two slots: one busy until 3, one free from now (1). The queued works 2 and 1 at speed 2 take 1 s
    # and 0.5 s: the first starts at 1 on the free slot (ends 2), the second at 2 (ends 2.5).
    heap = project_slots(1.0, 2, [3.0], [(1.0, 2.0), (1.5, 1.0)], 2.0)
    assert sorted(heap) == [2.5, 3.0]
    # A query still on the network starts when it arrives, not before.
    assert sorted(project_slots(0.0, 1, [], [(4.0, 1.0)], 1.0)) == [5.0]
    with pytest.raises(ValueError, match="in service"):
        project_slots(0.0, 1, [1.0, 2.0], [], 1.0)


def test_oracle_picks_the_soonest_expected_completion_not_the_shortest_queue_or_the_fastest() -> None:
    fast_busy = _view(1, 2.0, running=(10.0,))  # the fastest, busy until 10
    slow_idle = _view(1, 0.5)  # idle but slow
    nearly_free = _view(1, 1.0, running=(0.5,))  # frees at 0.5
    views = [fast_busy, slow_idle, nearly_free]
    # work 1: 10 + 0.5 / 0 + 2 / 0.5 + 1 -> the replica with a query in service.
    assert [v.finish_at(0.0, 0.0, 1.0) for v in views] == [10.5, 2.0, 1.5]
    assert oracle_choose(views, 0.0, 0.0, 1.0, RNG) == 2
    # work 0.1: 10.05 / 0.2 / 0.6 -> the slow idle one: the query's own work at each speed counts.
    assert oracle_choose(views, 0.0, 0.0, 0.1, RNG) == 1
    # A queue counts by its work at the current speed: 3 units at speed 3 end at 1, then 1 unit ends at 4/3.
    queued_fast = _view(1, 3.0, waiting=(3.0,))
    assert queued_fast.finish_at(0.0, 0.0, 1.0) == pytest.approx(4.0 / 3.0)
    assert oracle_choose([*views, queued_fast], 0.0, 0.0, 1.0, RNG) == 3


def test_routing_a_query_books_the_earliest_slot() -> None:
    view = _view(2, 1.0)
    view.route("a", 0.0, 0.0, 2.0)  # slot 1 until 2
    view.route("b", 0.0, 0.0, 3.0)  # slot 2 until 3
    assert view.finish_at(0.0, 0.0, 1.0) == 3.0  # after "a"
    view.start("a", 2.0)
    view.start("b", 3.0)
    view.finish("a")
    assert view.finish_at(2.0, 2.0, 1.0) == 3.0  # exact: ends fixed at the start need no rebuild
    with pytest.raises(RuntimeError, match="FIFO"):
        view.route("c", 2.0, 2.0, 1.0)
        view.route("d", 2.0, 2.0, 1.0)
        view.start("d", 3.0)


def test_a_speed_change_or_a_dropped_query_rebuilds_the_projection() -> None:
    view = _view(1, 2.0, running=(1.0,), waiting=(2.0,))  # the queued 2 units end at 2 at speed 2
    assert view.finish_at(0.0, 0.0, 2.0) == 3.0
    view.set_speed(1.0)  # the antagonist woke: the queued work now takes 2 s
    assert view.finish_at(0.5, 0.5, 2.0) == 5.0
    view.drop(("waiting", 0))  # timed out in the queue
    assert view.finish_at(0.5, 0.5, 2.0) == 3.0
    assert not view.waiting


def test_ties_are_broken_at_random_by_the_seeded_rng() -> None:
    views = [_view(1, 1.0), _view(1, 1.0), _view(1, 1.0, running=(1.0,)), _view(1, 1.0)]
    picks = [oracle_choose(views, 0.0, 0.0, 1.0, random.Random(seed)) for seed in range(40)]
    assert set(picks) == {0, 1, 3}  # every tied replica, never the later one
    again = [oracle_choose(views, 0.0, 0.0, 1.0, random.Random(seed)) for seed in range(40)]
    assert picks == again
    with pytest.raises(ValueError, match="no replica"):
        oracle_choose([], 0.0, 0.0, 1.0, RNG)


def test_the_oracle_is_only_constructible_in_the_simulator() -> None:
    # It reads the replicas' true queues and speeds: no gateway policy can, so it is no gateway policy.
    for name in (ORACLE, ORACLE_MEANWORK):
        assert name in SIM_POLICIES and name not in POLICY_CLASSES
        with pytest.raises(ValueError, match="policy must be one of"):
            create_policy(name)
        with pytest.raises(ConfigurationError, match="policy must be one of"):
            UpstreamPool(prefix="/", upstreams=["http://127.0.0.1:1"], policy=name)
    assert not any("oracle" in name.lower() for name in core.__all__)


# --- the simulator drives it with the true state --------------------------------------------------------

SMALL = SimConfig(replicas=20, clients=10, seconds=10.0, seed=3, prequal=PrequalSettings())


def test_with_constant_speeds_every_projected_end_is_the_true_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # No antagonist: the speeds never change, so what the oracle projects at routing is what happens.
    projected: dict[int, float] = {}
    checked: list[float] = []
    route, start = OracleView.route, OracleView.start

    def spy_route(self: OracleView, query: Any, now: float, arrival: float, work: float) -> None:
        projected[id(query)] = self.finish_at(now, arrival, work)
        route(self, query, now, arrival, work)

    def spy_start(self: OracleView, query: Any, end: float) -> None:
        checked.append(abs(projected[id(query)] - end))
        start(self, query, end)

    monkeypatch.setattr(OracleView, "route", spy_route)
    monkeypatch.setattr(OracleView, "start", spy_start)
    steady = dataclasses.replace(SMALL, antagonist_duty_min=0.0, antagonist_duty_max=0.0, burst_rate_hz=0.0)
    result = simulate(steady, ORACLE, 1.2)
    assert len(checked) >= result.requests > 2000
    assert max(checked) < 1e-9


def test_oracle_p99_is_below_every_policy_on_a_seeded_run() -> None:
    # The bound of the model: no policy should beat it. p99 here is about the 25th worst of ~2,300
    # requests; across seeds a policy's p99 moves by about 10% at this size, and the oracle is more than
    # 25% below the best policy at each load, so noise cannot order them and a weakened oracle fails.
    for load in (0.5, 1.1):
        results = {p: simulate(SMALL, p, load) for p in SIM_POLICIES if p != ORACLE_MEANWORK}
        oracle = results.pop(ORACLE)
        assert oracle.errors == 0 and oracle.probes_per_query == 0.0
        assert {r.requests for r in results.values()} == {oracle.requests}  # common random numbers
        best = min(r.p99_ms for r in results.values())
        assert oracle.p99_ms <= 0.8 * best, (load, oracle.p99_ms, {p: r.p99_ms for p, r in results.items()})
        assert oracle.p999_ms <= min(r.p999_ms for r in results.values())
        assert simulate(SMALL, ORACLE, load) == oracle  # deterministic, ties included


# --- the excess and the share ---------------------------------------------------------------------------


def test_removed_share_on_known_numbers() -> None:
    assert removed_share(800.0, 1000.0, 500.0) == pytest.approx(0.4)
    assert removed_share(500.0, 1000.0, 500.0) == 1.0  # Prequal at the bound
    assert removed_share(1000.0, 1000.0, 500.0) == 0.0  # no better than the best peer
    assert removed_share(1200.0, 1000.0, 500.0) == pytest.approx(-0.4)  # worse: negative, said as it is
    assert removed_share(600.0, 500.0, 500.0) is None  # best peer at the oracle: undefined, no ZeroDivisionError
    assert removed_share(600.0, 450.0, 500.0) is None  # a peer below the bound: no share to speak of


def _result(policy: str, load: float, p99: float, p999: float) -> RunResult:
    return RunResult(
        policy=policy,
        load=load,
        rate_qps=1.0,
        requests=1,
        successes=1,
        errors=0,
        deadline_errors=0,
        no_backend_errors=0,
        p50_ms=1.0,
        p90_ms=1.0,
        p99_ms=p99,
        p999_ms=p999,
        mean_ms=1.0,
        probes_per_query=0.0,
        fallback_rate=0.0,
        mean_pool_size=None,
        rif_p50=0.0,
        rif_p99=0.0,
        rif_max=0,
        replica_share=(1.0,),
        share_speed_corr=0.0,
        events=1,
    )


def test_limit_rows_take_the_best_peer_among_non_prequal_non_oracle_policies() -> None:
    results = [
        _result("oracle", 0.9, 500.0, 700.0),
        _result("prequal", 0.9, 800.0, 1000.0),
        _result("prequal_probeall", 0.9, 510.0, 710.0),  # a Prequal variant is no peer
        _result("peak_ewma", 0.9, 1000.0, 5000.0),
        _result("least_request", 0.9, 1100.0, 1300.0),
        _result("oracle", 1.2, 600.0, 900.0),
        _result("prequal", 1.2, 700.0, 1000.0),
        _result("round_robin", 1.2, 600.0, 900.0),
    ]
    names = ("oracle", "oracle_meanwork", "prequal", "prequal_nocheck", "round_robin")
    assert [p for p in names if is_peer(p)] == ["round_robin"]
    rows = limit_rows(results, deadline_ms=5000.0)
    by = {(r["load"], r["metric"]): r for r in rows}
    assert set(by) == {(0.9, "p99_ms"), (0.9, "p999_ms"), (1.2, "p99_ms"), (1.2, "p999_ms")}
    p99 = by[0.9, "p99_ms"]
    assert (p99["best_peer"], p99["prequal_excess_ms"], p99["best_peer_excess_ms"]) == ("peak_ewma", 300.0, 500.0)
    assert p99["share_removed"] == pytest.approx(0.4) and not p99["censored"]
    p999 = by[0.9, "p999_ms"]  # peak_ewma at the deadline: least_request is the best peer
    assert p999["best_peer"] == "least_request" and p999["share_removed"] == pytest.approx(1 - 300 / 600)
    assert by[1.2, "p99_ms"]["share_removed"] is None  # round robin at the oracle
    text = format_limit(rows)
    assert "n/a" in text and "40%" in text and "50%" in text
    # A censored best peer (at the deadline): the share is a lower bound, printed as such.
    censored = limit_rows(
        [_result("oracle", 1, 500, 500), _result("prequal", 1, 800, 800), _result("rr", 1, 5000, 5000)], 5000.0
    )
    assert censored[0]["censored"] and "≥93%" in format_limit(censored)
    # No oracle, or no Prequal, or no peer in the run: no rows.
    assert limit_rows([r for r in results if r.policy != "oracle"], 5000.0) == []
    assert limit_rows([r for r in results if r.policy in ("oracle", "prequal")], 5000.0) == []


def test_cli_reports_the_excess_and_the_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sim.json"
    args = ["--quick", "--policies", "prequal,round_robin,oracle", "--load", "0.9", "--seconds", "4"]
    assert main([*args, "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    by = {r["policy"]: r for r in document["results"]}
    assert by["oracle"]["p99_excess_ms"] == 0.0
    for policy in ("prequal", "round_robin"):
        assert by[policy]["p99_excess_ms"] == pytest.approx(by[policy]["p99_ms"] - by["oracle"]["p99_ms"])
        assert by[policy]["p999_excess_ms"] == pytest.approx(by[policy]["p999_ms"] - by["oracle"]["p999_ms"])
    (p99, p999) = document["limit"]
    assert (p99["metric"], p99["best_peer"], p999["metric"]) == ("p99_ms", "round_robin", "p999_ms")
    expected = 1 - by["prequal"]["p99_excess_ms"] / by["round_robin"]["p99_excess_ms"]
    assert p99["share_removed"] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert "p99-or" in out and "p999-or" in out and "Prequal removes" in out
    # Without the oracle the output is as before: no excess, no limit.
    assert main([*args[:2], "prequal,round_robin", *args[3:], "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    assert "limit" not in document and "p99_excess_ms" not in document["results"][0]


@pytest.mark.skipif(not plotting.have_matplotlib(), reason="matplotlib (the bench extra) is not installed")
def test_cli_plots_the_oracle_from_json_files(tmp_path: Path) -> None:
    files = []
    for seed in (1, 2):
        files.append(str(tmp_path / f"s{seed}.json"))
        args = ["--quick", "--policies", "prequal,oracle", "--load", "0.5,0.9", "--seconds", "3", "--seed", str(seed)]
        assert main([*args, "--json", files[-1]]) == 0
    png = tmp_path / "img" / "limit.png"
    assert main(["--plot", str(png), "--from-json", *files]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_from_json_needs_a_plot_path(tmp_path: Path) -> None:
    assert main(["--from-json", str(tmp_path / "none.json")]) == 2


def test_the_size_blind_oracle_guesses_the_mean_and_corrects_at_each_start() -> None:
    # It routes on the mean work; each start reveals the true end, and the projection is rebuilt from it.
    view = OracleView(1, 1.0, exact=False)
    view.route("a", 0.0, 0.0, 1.0)  # guessed 1, truly 3
    assert view.finish_at(0.0, 0.0, 1.0) == 2.0
    view.start("a", 3.0)
    assert view.finish_at(0.0, 0.0, 1.0) == 4.0
    blind = simulate(SMALL, ORACLE_MEANWORK, 0.9)
    seeing = simulate(SMALL, ORACLE, 0.9)
    assert blind.requests == seeing.requests and blind.errors == 0
    assert seeing.p99_ms < blind.p99_ms  # the sizes are worth something

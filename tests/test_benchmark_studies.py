"""Smoke tests of ``python -m benchmarks.studies``: each study at ``--quick`` (shortened), its JSON checked.

    pytest tests/test_benchmark_studies.py

In-process ``main([...])`` into a temporary directory; about 10 s in all. The PNGs are checked only when
matplotlib is installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import studies
from benchmarks.plotting import have_matplotlib
from prequal_middleware.core import POLICY_CLASSES, PrequalSettings, reuse_budget
from prequal_middleware.core.simulator import ORACLE, SimConfig

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("policy", "load", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "seed")
PNG = {"compare": "compare-p99", "qrif": "qrif", "probes": "probes", "pool": "pool"}


def run_study(tmp_path: Path, study: str, *extra: str) -> dict[str, Any]:
    argv = ["--quick", "--seconds", "3", "--studies", study, "--json-dir", str(tmp_path), "--img-dir", str(tmp_path)]
    assert studies.main([*argv, *extra]) == 0
    document: dict[str, Any] = json.loads((tmp_path / f"studies-{study}-quick.json").read_text(encoding="utf-8"))
    assert set(document) >= {"config", "results", "summary"}
    assert document["config"]["study"] == study
    assert document["config"]["seeds"] == [1]
    assert document["config"]["simulator"]["seconds"] == 3
    for record in document["results"]:
        for key in REQUIRED:
            assert key in record, (key, record)
        assert record["requests"] > 0
        assert 0 <= record["errors"] <= record["requests"]
        assert 0 < record["p50_ms"] <= record["p90_ms"] <= record["p99_ms"] <= record["p999_ms"] <= 5000
    check_oracle(document)
    if have_matplotlib() and "--no-plots" not in extra:
        png = tmp_path / f"studies-{PNG[study]}-quick.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return document


def check_oracle(document: dict[str, Any]) -> None:
    """The oracle runs in every cell of the study, and every other record carries its excess over it."""
    results = document["results"]
    oracles = {(r["seed"], r["sim_load"], r.get("replicas")): r for r in results if r["policy"] == ORACLE}
    assert oracles
    assert all(r["variant"] == ORACLE for r in oracles.values())
    for r in results:
        if r["policy"] == ORACLE:
            assert "p99_excess_ms" not in r
            continue
        oracle = oracles[(r["seed"], r["sim_load"], r.get("replicas"))]
        assert r["p99_excess_ms"] == r["p99_ms"] - oracle["p99_ms"]
        assert r["p999_excess_ms"] == r["p999_ms"] - oracle["p999_ms"]
    # The summary, which the tables and plots are made from, holds the oracle's rows.
    rows = studies.oracle_rows(document["summary"])
    assert rows and all(row["policy"] == ORACLE and "p99_ms" in row for row in rows)
    assert len(rows) + len(studies.policy_rows(document["summary"])) == len(document["summary"])


def test_compare_covers_every_policy_at_both_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = run_study(tmp_path, "compare")
    results = document["results"]
    cells = {(r["load"], r["variant"]) for r in results}
    variants = {*POLICY_CLASSES, "prequal q=0.75", ORACLE}
    assert cells == {(load, v) for load in (0.7, 0.9) for v in variants}
    assert len(results) == len(cells)  # one seed
    assert {r["q_rif"] for r in results if r["policy"] == "prequal"} == {0.75, PrequalSettings().q_rif}
    out, err = capsys.readouterr()
    assert "| 0.9 | least_latency |" in out  # the table
    assert "| 0.9 | oracle |" in out and "p99-or" in out
    assert err.count("compare ") >= len(results)  # a progress line per run


def test_qrif_sweeps_the_papers_values_on_a_two_speed_fleet(tmp_path: Path) -> None:
    document = run_study(tmp_path, "qrif")
    results = [r for r in document["results"] if r["policy"] != ORACLE]
    assert [r["q_rif"] for r in results] == list(studies.PAPER_Q_RIF)
    assert len(studies.PAPER_Q_RIF) == 14
    for r in results:
        assert r["policy"] == "prequal" and r["load"] == 0.75
        assert 1.3 < r["capacity_factor"] < 2.0  # about half the replicas run at twice the speed
        assert math.isclose(r["sim_load"], 0.75 * r["capacity_factor"])
    assert document["config"]["simulator"]["headroom_min"] == 2.0
    (oracle,) = [r for r in document["results"] if r["policy"] == ORACLE]
    assert oracle["sim_load"] == results[0]["sim_load"]  # the same two-speed fleet at the same load
    summary = studies.policy_rows(document["summary"])
    assert [row["q_rif"] for row in summary] == list(studies.PAPER_Q_RIF)
    assert set(summary[0]["p99_ms"]) == {"median", "min", "max"}


def test_probes_sweeps_the_rates_under_every_cap_rule(tmp_path: Path) -> None:
    document = run_study(tmp_path, "probes")
    assert {r["load"] for r in document["results"] if r["policy"] == ORACLE} == set(studies.PROBE_LOADS)
    results = [r for r in document["results"] if r["policy"] != ORACLE]
    rates = [rate for _, rate in studies.PROBE_RATES]
    cells = {(r["load"], r["r_probe"], r["cap_rule"]) for r in results}
    assert cells == {
        (load, rate, rule) for load in studies.PROBE_LOADS for rate in rates for rule in studies.PROBE_CAPS
    }
    assert len(results) == len(cells)  # one seed
    for r in results:
        assert r["r_remove"] == 0.25
        assert 1.0 <= r["b_reuse"] <= r["max_reuse"]
        assert r["mean_pool_size"] is not None and 0 <= r["fallback_rate"] <= 1
    by_cell = {(r["r_probe"], r["cap_rule"]): r for r in results if r["load"] == studies.PROBE_LOADS[0]}
    assert [by_cell[(rate, "eq1")]["max_reuse"] for rate in rates] == [32] * 7
    assert [by_cell[(rate, "default")]["max_reuse"] for rate in rates] == [2] * 7
    assert [by_cell[(rate, "scaled")]["max_reuse"] for rate in rates] == [2, 2, 2, 2, 2, 3, 4]
    assert by_cell[(0.5, "eq1")]["b_reuse"] > 4
    for (rate, rule), r in by_cell.items():  # a cap that does not change the budget: simulated once, reported twice
        twin = by_cell[(rate, "default")]
        if r["shared_run"] and twin["shared_run"] and r["b_reuse"] == twin["b_reuse"]:
            assert r["p99_ms"] == twin["p99_ms"] and r["requests"] == twin["requests"], (rate, rule)


def test_cap_rules_sharing_a_budget_are_simulated_once() -> None:
    runs = [r for r in studies.probe_runs(SimConfig(), seeds=[1], loads=[0.9]) if r.policy != ORACLE]
    simulated = {(run.fields["r_probe_label"], run.fields["cap_rule"]) for run in runs}
    copied = {(run.fields["r_probe_label"], copy["cap_rule"]) for run in runs for copy in run.copies}
    assert len(simulated) + len(copied) == 7 * 3
    # At 100 replicas, r_probe 4, 2 sqrt(2) and 2 have budgets below 2 even with half the fleet ejected.
    assert {("4", "eq1"), ("2√2", "eq1"), ("2", "eq1"), ("1", "default"), ("1/2", "scaled")} <= simulated
    assert {("4", "default"), ("2", "scaled"), ("1", "scaled")} <= copied
    assert len(runs) == 3 * 1 + 2 * 2 + 2 * 3  # 4, 2 sqrt(2), 2: one run; sqrt(2), 1: two; 1/sqrt(2), 1/2: three


def test_parallel_runs_give_the_same_results(tmp_path: Path) -> None:
    serial = run_study(tmp_path / "serial", "compare", "--no-plots")
    parallel = run_study(tmp_path / "parallel", "compare", "--no-plots", "--jobs", "2")

    def strip(document: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in document["results"]]

    assert strip(serial) == strip(parallel)


def test_two_speed_fleet_has_two_speeds() -> None:
    config = studies.two_speed_fleet(SimConfig(replicas=200, seconds=10.0, burst_rate_hz=0.0))
    _, speeds = studies.fleet_speeds(config)
    assert {round(s, 6) for s in speeds} <= {1.0, 2.0}
    assert 70 < studies.slow_replicas(config) < 130


@pytest.mark.parametrize("argv", [["--studies", "nope"], ["--seeds", "x"], ["--jobs", "0"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        code = studies.main(argv)
        raise SystemExit(code)
    assert raised.value.code == 2


def test_help_does_not_import_matplotlib() -> None:
    code = "import sys, benchmarks.studies as s; s.build_parser().format_help(); print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- the pool study (issue 15, section 3) -----------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 2), (5, 2), (6, 2), (8, 2), (9, 3), (12, 4), (20, 6), (36, 12), (47, 15)])
def test_fleet_pool_size_is_a_third_of_the_fleet_between_2_and_16(n: int, m: int) -> None:
    assert studies.fleet_pool_size(n) == m
    assert studies.fleet_pool_size(48) == studies.fleet_pool_size(1000) == 16


def test_with_16_eq1_has_no_budget_up_to_24_replicas_and_the_derived_pool_gives_one() -> None:
    s = PrequalSettings()
    budgets = {
        n: reuse_budget(16, n, s.probes_per_query, s.removals_per_query, s.drift, s.max_reuse) for n in range(2, 60)
    }
    assert {n for n, b in budgets.items() if b == 1.0} == set(range(2, 25))
    for n in range(6, 60):  # n // 3 keeps Eq. 1's denominator >= 1: a budget in (1, 2], never clamped from above
        m = studies.fleet_pool_size(n)
        denominator = (1 - m / n) * s.probes_per_query - s.removals_per_query
        assert denominator >= 1 - 1e-9, n
        assert 1.0 < reuse_budget(m, n, s.probes_per_query, s.removals_per_query, s.drift, s.max_reuse) <= 2.0


def test_pool_study_runs_both_rules_and_the_oracle_per_fleet_and_load(tmp_path: Path) -> None:
    document = run_study(tmp_path, "pool", "--pool-fleets", "6,60", "--pool-loads", "0.9")
    results = document["results"]
    cells = {(r["replicas"], r["variant"]): r for r in results}
    assert set(cells) == {(n, v) for n in (6, 60) for v in ("fixed", "derived", ORACLE)}
    assert {r["clients"] for r in results} == {4}
    assert cells[(6, "fixed")]["pool_size"] == 16 and cells[(6, "fixed")]["b_reuse"] == 1.0
    assert cells[(6, "derived")]["pool_size"] == 2 and cells[(6, "derived")]["b_reuse"] == 2.0
    # At 60 replicas both rules give 16: simulated once, reported under both.
    assert cells[(60, "derived")]["shared_run"] and cells[(60, "derived")]["p99_vs_fixed_ms"] == 0
    assert cells[(6, "derived")]["p99_vs_fixed_ms"] == cells[(6, "derived")]["p99_ms"] - cells[(6, "fixed")]["p99_ms"]
    assert document["config"]["pool_rules"]["derived"]["pool_size"] == {"6": 2, "60": 16}


# --- the oracle in the plots ---------------------------------------------------------------------


class _Recorder:
    """Stands in for matplotlib's figures, axes and artists: any attribute is another recorder, every call is logged."""

    def __init__(self, log: list[tuple[str, tuple[Any, ...], dict[str, Any]]], name: str = "") -> None:
        self._log = log
        self._name = name

    def __getattr__(self, name: str) -> _Recorder:
        return _Recorder(self._log, name)

    def __call__(self, *args: Any, **kwargs: Any) -> _Recorder:
        self._log.append((self._name, args, kwargs))
        return _Recorder(self._log)

    def __iter__(self) -> Any:
        return iter([_Recorder(self._log)])

    def __getitem__(self, index: Any) -> _Recorder:
        return _Recorder(self._log)


class _FakePyplot:
    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def subplots(self, rows: int = 1, columns: int = 1, squeeze: bool = True, **_: Any) -> tuple[_Recorder, Any]:
        grid = [[_Recorder(self.log) for _ in range(columns)] for _ in range(rows)]
        if squeeze and rows == columns == 1:
            return _Recorder(self.log), grid[0][0]
        return _Recorder(self.log), grid


@pytest.mark.parametrize("study", ["compare", "qrif", "probes", "pool"])
def test_every_plot_draws_the_oracle_black_and_dashed(
    study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("--pool-fleets", "6", "--pool-loads", "0.9") if study == "pool" else ()
    document = run_study(tmp_path, study, "--no-plots", *extra)
    summary = document["summary"]
    fake = _FakePyplot()
    from benchmarks import plotting

    monkeypatch.setattr(plotting, "pyplot", lambda: fake)
    monkeypatch.setattr(plotting, "save", lambda fig, path: path)
    # Through --from-json: the plot is made from the summary the study wrote, without simulating.
    assert studies.main(["--from-json", str(tmp_path / f"studies-{study}-quick.json"), "--img-dir", str(tmp_path)]) == 0
    dashed = [
        (name, args, kwargs)
        for name, args, kwargs in fake.log
        if name in ("axhline", "plot") and kwargs.get("linestyle") == "--" and "oracle" in str(kwargs.get("label"))
    ]
    drawn = {round(float(args[0] if name == "axhline" else args[1][0]), 6) for name, args, _ in dashed}
    expected = {round(row["p99_ms"]["median"], 6) for row in studies.oracle_rows(summary)}
    assert expected and expected <= drawn


def test_the_default_run_is_the_papers_three_studies() -> None:
    # The documented `python -m benchmarks.studies --jobs 2` regenerates the paper's studies; the pool
    # study (its own fleets and run length) runs only when asked for.
    assert studies.build_parser().parse_args([]).studies == ["compare", "qrif", "probes"]
    assert studies.build_parser().parse_args(["--studies", "pool"]).studies == ["pool"]

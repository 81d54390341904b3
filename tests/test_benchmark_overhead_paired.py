"""``python -m benchmarks.overhead_paired``: a tiny real run (the JSON checked), and its summary's rules.

Needs ``wrk`` and ``taskset`` for the real run (skipped without them; CI installs wrk). About 20 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.overhead_paired import Slice, combined, median_interval, pairs, summarize

REPO = Path(__file__).resolve().parents[1]
MISSING = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]


def piece(target: str, index: int, rps: float, interference: float = 0.0, connections: int = 16) -> Slice:
    return Slice(target, connections, index, int(rps * 2), rps, 5.0, 1e6 / rps, interference, 0, 0.0, 50.0)


def test_pairs_are_each_target_against_the_baseline_then_prequal_against_round_robin() -> None:
    targets = ["gateway_round_robin", "aiohttp_raw", "gateway_prequal"]
    assert pairs(targets) == [
        ("gateway_round_robin", "aiohttp_raw"),
        ("gateway_prequal", "aiohttp_raw"),
        ("gateway_prequal", "gateway_round_robin"),
    ]
    assert pairs(["gateway_round_robin", "gateway_prequal"]) == [("gateway_prequal", "gateway_round_robin")]
    assert pairs(["aiohttp_raw", "direct"]) == [("direct", "aiohttp_raw")]


def test_the_summary_pairs_slices_by_index_and_leaves_out_contended_ones() -> None:
    # The machine slows down by half from slice 3 on: per-slice ratios stay 1.2, whole-run figures would not.
    slices = []
    for i, speed in enumerate([1.0, 1.0, 0.5, 0.5, 0.5], start=1):
        slices.append(piece("aiohttp_raw", i, 1000 * speed))
        slices.append(piece("gateway_round_robin", i, 1200 * speed, interference=50.0 if i == 5 else 0.0))
    slices.append(piece("gateway_round_robin", 6, 9999))  # no partner in slice 6: left out
    [row] = summarize(slices, ["aiohttp_raw", "gateway_round_robin"], max_interference_pct=20.0)
    assert row["ratio"] == "gateway_round_robin / aiohttp_raw"
    assert row["connections"] == 16
    assert (row["slices"], row["contended_slices"]) == (4, 1)
    assert row["rps_median"] == pytest.approx(1.2)
    assert row["rps_p25"] == pytest.approx(1.2) and row["rps_p75"] == pytest.approx(1.2)
    assert row["cpu_median"] == pytest.approx(1 / 1.2, rel=1e-3)
    assert row["rps_pooled"] == pytest.approx(1.2, rel=1e-3)


def test_the_median_and_quartiles_of_the_per_slice_ratios() -> None:
    ratios = [0.8, 0.9, 1.0, 1.1, 1.5]
    slices = []
    for i, ratio in enumerate(ratios, start=1):
        slices.append(piece("gateway_round_robin", i, 1000))
        slices.append(piece("gateway_prequal", i, 1000 * ratio))
    [row] = summarize(slices, ["gateway_round_robin", "gateway_prequal"], max_interference_pct=20.0)
    assert row["ratio"] == "gateway_prequal / gateway_round_robin"
    assert (row["rps_p25"], row["rps_median"], row["rps_p75"]) == pytest.approx((0.9, 1.0, 1.1))


def test_the_medians_interval_is_seeded_and_brackets_the_median() -> None:
    assert median_interval([1.0]) is None
    assert median_interval([1.1] * 10) == (1.1, 1.1)
    values = [0.8 + 0.01 * i for i in range(41)]  # median 1.0
    interval = median_interval(values)
    assert interval is not None and interval == median_interval(values), "the same slices, the same interval"
    low, high = interval
    assert 0.9 < low < 1.0 < high < 1.1
    wider = median_interval(values[::4])  # fewer slices, a wider interval
    assert wider is not None and wider[1] - wider[0] > high - low


def test_runs_combined_pair_slices_only_within_a_run(tmp_path: Path) -> None:
    def run_file(name: str, raw: float, gateway: float, targets: list[str]) -> Path:
        slices = [piece("aiohttp_raw", 1, raw), piece("gateway_round_robin", 1, gateway)]
        path = tmp_path / name
        path.write_text(json.dumps({"config": {"targets": targets}, "slices": [s.__dict__ for s in slices]}))
        return path

    first = run_file("a.json", 1000, 1200, ["aiohttp_raw", "gateway_round_robin"])
    second = run_file("b.json", 500, 400, ["gateway_round_robin", "aiohttp_raw"])
    slices, targets = combined([first, second])
    assert targets == ["aiohttp_raw", "gateway_round_robin"]
    assert len(slices) == 4 and len({s.slice for s in slices}) == 2, "each run's slice 1 stays its own"
    [row] = summarize(slices, targets, max_interference_pct=20.0)
    assert row["slices"] == 2
    assert row["rps_median"] == pytest.approx((1.2 + 0.8) / 2)  # 1200/1000 and 400/500, never 1200/500


@pytest.mark.skipif(bool(MISSING), reason=f"needs {' and '.join(MISSING)} (not installed)")
def test_a_tiny_run_writes_every_slice_and_the_ratios(tmp_path: Path) -> None:
    out = tmp_path / "paired.json"
    command = [sys.executable, "-m", "benchmarks.overhead_paired", "--targets", "aiohttp_raw,gateway_round_robin"]
    command += ["--connections", "4", "--slices", "2", "--slice-s", "1", "--warmup", "0", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "| gateway_round_robin / aiohttp_raw | 4 |" in done.stdout

    data = json.loads(out.read_text())
    assert data["config"]["slices"] == 2 and data["config"]["slice_s"] == 1
    got = sorted((s["slice"], s["target"]) for s in data["slices"])
    assert got == [(1, "aiohttp_raw"), (1, "gateway_round_robin"), (2, "aiohttp_raw"), (2, "gateway_round_robin")]
    for s in data["slices"]:
        assert s["connections"] == 4 and s["errors"] == 0, s
        assert s["requests"] > 0 and s["rps"] > 0 and s["cpu_us_per_req"] > 0 and s["p99_ms"] > 0, s
        assert s["upstream_cpu_us_per_req"] > 0, s  # both targets proxy to the upstreams
        assert s["probes_per_req"] == 0.0, s  # round robin and the raw proxy send no probe
    figures = {r["target"]: r for r in data["targets"]}
    assert set(figures) == {"aiohttp_raw", "gateway_round_robin"}
    rr = figures["gateway_round_robin"]
    # A target's figures come from its quiet slices only: on a busy machine (CI) both of its slices can be
    # contended, and then there is no figure, not a made-up 0.
    assert rr["probes_per_req"] == (0.0 if rr["slices"] else None), rr
    [row] = data["summary"]
    assert row["ratio"] == "gateway_round_robin / aiohttp_raw"
    assert row["slices"] + row["contended_slices"] == 2
    if row["slices"]:
        assert row["rps_median"] > 0 and row["rps_pooled"] > 0


def test_unknown_targets_are_refused() -> None:
    command = [sys.executable, "-m", "benchmarks.overhead_paired", "--targets", "aiohttp_raw,nope"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--targets: unknown nope" in done.stderr

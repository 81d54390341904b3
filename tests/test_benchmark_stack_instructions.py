"""``benchmarks.stack_instructions`` through its real entry point: real uvicorn processes under callgrind.

Performance is measured, not tested: the counts are checked for sanity only (a whole proxied request is
hundreds of thousands of instructions, not the start-up's billions nor nothing), and the ratios for
being the counts' own quotients.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.stack_instructions import ratios

REPO = Path(__file__).resolve().parent.parent

needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("valgrind", "callgrind_control", "taskset")),
    reason="needs valgrind and taskset (.ci/run installs them)",
)


@needs_tools
def test_a_short_run_counts_a_proxy_and_its_baseline(tmp_path: Path) -> None:
    out = tmp_path / "stack.json"
    argv = [sys.executable, "-m", "benchmarks.stack_instructions", "--targets", "aiohttp_raw,gateway_prequal"]
    argv += ["--connections", "4", "--warmup", "5", "--requests", "40", "--json", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["target"]: r for r in result["results"]}
    assert set(rows) == {"aiohttp_raw", "gateway_prequal"}
    for row in rows.values():
        assert row["requests"] == 160
        assert 50_000 < row["instructions_per_request"] < 5_000_000, row
        # Every request reached a backend once (health checks may add a few), whatever the proxy.
        assert 1.0 <= row["upstream_requests_per_request"] < 1.2, row
    (ratio,) = [r for r in result["ratios"] if r["ratio"] == "gateway_prequal / aiohttp_raw"]
    expected = rows["gateway_prequal"]["instructions_per_request"] / rows["aiohttp_raw"]["instructions_per_request"]
    assert ratio["instructions"] == pytest.approx(expected, abs=1e-3)
    assert "| gateway_prequal | 4 |" in done.stdout


def test_ratios_pair_each_target_with_its_baselines() -> None:
    results = [
        {"target": "aiohttp_raw", "connections": 16, "instructions_per_request": 400},
        {"target": "gateway_round_robin", "connections": 16, "instructions_per_request": 300},
        {"target": "gateway_prequal", "connections": 16, "instructions_per_request": 330},
        {"target": "gateway_round_robin@abc", "connections": 16, "instructions_per_request": 600},
        {"target": "gateway_round_robin", "connections": 64, "instructions_per_request": 250},
    ]
    got = {(r["connections"], r["ratio"]): r["instructions"] for r in ratios(results)}
    assert got == {
        (16, "gateway_round_robin / aiohttp_raw"): 0.75,
        (16, "gateway_prequal / aiohttp_raw"): 0.825,
        (16, "gateway_round_robin@abc / aiohttp_raw"): 1.5,
        (16, "gateway_prequal / gateway_round_robin"): 1.1,
        (16, "gateway_round_robin / gateway_round_robin@abc"): 0.5,
    }


def test_an_unknown_target_is_refused_before_anything_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.stack_instructions", "--targets", "envoy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--targets: unknown envoy" in done.stderr

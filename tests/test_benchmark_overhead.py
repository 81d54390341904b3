"""Smoke test of ``python -m benchmarks.overhead``: a tiny real run, the JSON it writes checked.

    pytest tests/test_benchmark_overhead.py

Needs ``wrk`` and ``taskset`` (skipped without them; CI installs wrk). Takes about 15 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prequal_middleware.core.compiled import describe
from tools import build_core

REPO = Path(__file__).resolve().parents[1]
MISSING = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the overhead benchmark needs {' and '.join(MISSING)} (not installed)"
)


def test_quick_run_writes_the_results(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    command = [sys.executable, "-m", "benchmarks.overhead", "--quick", "--duration", "1"]
    command += ["--targets", "direct,gateway_prequal", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "| gateway_prequal | 16 |" in done.stdout  # the table

    data = json.loads(out.read_text())
    assert data["config"]["rounds"] == 1
    assert data["config"]["duration_s"] == 1
    assert data["config"]["connections"] == [16]
    # Which build of the sans-IO core the targets ran (tox's py env: compiled in place).
    compiled = sorted(build_core.compiled_in_tree())
    assert data["config"]["core_compiled"] == compiled
    assert f"sans-IO core: {describe(compiled)}" in done.stderr
    results = {r["target"]: r for r in data["results"]}
    assert set(results) == {"direct", "gateway_prequal"}
    for result in results.values():
        assert result["connections"] == 16
        for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
            assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result)
        assert result["p50_ms"] <= result["p99_ms"]
        assert result["errors"] == 0 and not result["flagged"], result
        assert result["rounds"] == 1 and len(result["samples"]) == 1
    assert results["direct"]["probes_per_req"] is None  # no upstream behind it
    # Counted at the upstreams; the reports on the responses answer almost every draw under steady load
    # (piggybacked reports, docs/benchmarks.md: 2.00 probes per request before, 0.00 after).
    probes_per_req = results["gateway_prequal"]["probes_per_req"]
    assert isinstance(probes_per_req, float) and 0 <= probes_per_req < 0.1, probes_per_req


def test_baseline_rev_runs_the_same_target_from_another_revision(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    command = [sys.executable, "-m", "benchmarks.overhead", "--quick", "--duration", "1", "--warmup", "0"]
    command += ["--targets", "gateway_round_robin", "--baseline-rev", "HEAD", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    data = json.loads(out.read_text())
    assert [r["target"] for r in data["results"]] == ["gateway_round_robin", "gateway_round_robin@HEAD"]
    (versus,) = data["versus_baseline_rev"]
    assert (versus["target"], versus["rev"], versus["connections"], versus["rounds"]) == (
        "gateway_round_robin",
        "HEAD",
        16,
        1,
    )
    assert versus["rps_ratio"] > 0 and versus["cpu_ratio"] > 0
    assert "| gateway_round_robin vs @HEAD | 16 |" in done.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "prequal-baseline-" not in worktrees.stdout, "the baseline worktree is removed"

"""``benchmarks.instructions`` through its real entry point: valgrind's counts, per request, per policy.

The figures are not asserted beyond sanity (performance is measured, not tested): a run must count both
policies from this tree, in a plausible range, with their ratio; the JSON must say which build ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import build_core

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (.ci/run installs it)")


def test_a_short_run_counts_both_policies(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    argv = [sys.executable, "-m", "benchmarks.instructions", "--warmup", "50", "--requests", "200"]
    done = subprocess.run(
        [*argv, "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["core_compiled"] == sorted(build_core.compiled_in_tree())
    counts = {r["policy"]: r["instructions_per_request"] for r in result["results"] if r["tree"] == "current"}
    assert set(counts) == {"round_robin", "prequal"}
    # A proxied request is tens to hundreds of thousands of instructions: not a count of start-up only
    # (millions), nor of nothing.
    assert all(20_000 < n < 2_000_000 for n in counts.values()), counts
    ratio = result["ratios"]["current: prequal / round_robin"]
    assert ratio == pytest.approx(counts["prequal"] / counts["round_robin"], abs=1e-3)
    assert "| current | prequal |" in done.stdout


def test_an_unknown_policy_is_refused_before_anything_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--policies", "least_request"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "policies are round_robin, prequal" in done.stderr

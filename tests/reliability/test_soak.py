"""Case 10: ``python -m benchmarks.soak`` for one minute: mixed traffic while backends churn.

The benchmark drives a gateway process and five backend processes (one SIGKILLed and restarted, one
stopping and starting with self-registration, one unregistered and registered through the admin API)
with GETs, uploads, downloads and streams, all checked byte for byte. This test runs it for 60 s and
asserts no failure beyond the injected faults (requests in flight at a SIGKILL) and bounded growth of
the gateway's memory and file descriptors after the warm-up. ``--minutes 10`` is the long run whose
figures the benchmark writes into docs/reliability.md itself (``--doc``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.procs import REPO, child_env, die_with_parent
from tests.reliability.report import LONG_SOAK_END, LONG_SOAK_START, Report

SECONDS = 60
RATE = 100
RSS_GROWTH_BOUND_MIB = 15.0
# Open descriptors follow concurrency (client connections, keep-alive and probe connections per backend),
# which churn moves up and down by tens; a leak per event would add hundreds over the run's 24 events.
FD_GROWTH_BOUND = 40


@pytest.mark.soak
@pytest.mark.budget(300)
def test_soak_one_minute(tmp_path: Path, report: Report) -> None:
    summary_path, doc = tmp_path / "soak.json", tmp_path / "doc.md"
    argv = [sys.executable, "-m", "benchmarks.soak", "--seconds", str(SECONDS), "--rate", str(RATE)]
    argv += ["--json", str(summary_path), "--doc", str(doc), "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(
        argv,
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        preexec_fn=die_with_parent,
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert summary_path.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    s = json.loads(summary_path.read_text())
    rss_growth = s["rss_mib"]["end"] - s["rss_mib"]["after_warmup"]
    fd_growth = s["fds"]["end"] - s["fds"]["after_warmup"]
    report.record(
        10,
        "python -m benchmarks.soak --seconds 60: gateway process + 5 backend processes, mixed GET/POST/PUT/"
        "download/stream traffic checked byte for byte, a churn event every 2.5 s",
        load=f"{RATE} req/s for {SECONDS} s ({s['requests']} requests)",
        happened=(
            f"{s['ok']} ok, {s['errors_injected']} cut by a SIGKILL while in flight, {s['errors_unexpected']} "
            f"unexpected; churn: {', '.join(f'{k} {v}' for k, v in s['churn'].items())}; gateway RSS "
            f"{s['rss_mib']['start']} → {s['rss_mib']['after_warmup']} (after {s['warmup_s']:g} s) → "
            f"{s['rss_mib']['end']} MiB, fds {s['fds']['start']} → {s['fds']['after_warmup']} → {s['fds']['end']} "
            f"(max {s['fds']['max_after_warmup']}); echo p99 {s['latency_ms']['p99']} ms"
        ),
        figure=(
            f"0 unexpected errors (bound 0); RSS growth after warm-up {rss_growth:+.1f} MiB (bound < "
            f"{RSS_GROWTH_BOUND_MIB:g}); fd growth {fd_growth:+d} (bound < {FD_GROWTH_BOUND})"
        ),
    )
    text = doc.read_text()
    report.section(10, "Soak, one minute", text.split(LONG_SOAK_START, 1)[1].split(LONG_SOAK_END, 1)[0])
    assert s["errors_unexpected"] == 0, s["unexpected_samples"]
    assert done.returncode == 0, done.stdout[-2000:]
    assert s["requests"] >= 0.95 * RATE * SECONDS
    assert s["churn"].get("SIGKILL", 0) >= 3 and s["churn"].get("SIGTERM (self-unregisters)", 0) >= 3
    assert rss_growth < RSS_GROWTH_BOUND_MIB
    assert fd_growth < FD_GROWTH_BOUND

"""Case 1: a backend SIGKILLed under steady load: no client sees a failure, and it gets no traffic within 1 s."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.reliability.load import OpenLoop, describe_failures, get, percentile
from tests.reliability.procs import backend_proc, gateway_proc, running
from tests.reliability.report import Report
from tests.reliability.support import attempts, metric, ms, pools_env, seconds_until

RATE = 200
DURATION_S = 10.0
KILL_AT_S = 4.0
QUIET_BOUND_S = 1.0
# 20 ms of service time: a few requests are in flight at the victim when it dies, so the kill breaks
# exchanges already sent (retried on another backend) as well as connections not yet made.
PATH = "/api/echo?ms=20"


def test_backend_sigkilled_under_load(log_dir: Path, report: Report) -> None:
    backends = [backend_proc(f"b{i}", log_dir) for i in range(4)]
    urls = [b.url for b in backends]
    gateway = gateway_proc("gateway", log_dir, pools_env({"/api": urls}), record_attempts=True)
    victim = backends[0]
    with running(*backends), running(gateway, ready_path="/_prequal/healthz"):
        seconds_until(
            lambda: {httpx.get(gateway.url + "/api/echo").headers["x-backend"] for _ in range(40)} >= {"b0"},
            10,
            "the victim to take traffic",
        )
        load = OpenLoop(gateway.url, rate=RATE, duration_s=DURATION_S, request=get(PATH)).start()
        time.sleep(KILL_AT_S)
        killed_at = victim.kill()
        results = load.join()
        seen = attempts(gateway.url)
        retries = metric(gateway.url, "prequal_retries_total", pool="/api")
        failed_attempts = sum(
            metric(gateway.url, "prequal_upstream_requests_total", backend=victim.url, outcome=o)
            for o in ("failure", "connect_error", "timeout")
        )

    in_window = [a for a in seen if a[0] >= load.started_at]
    before = [t for t, b in in_window if b == victim.url and t < killed_at]
    after = [t for t, b in in_window if b == victim.url and t >= killed_at]
    quiet_after = (max(after) - killed_at) if after else 0.0
    share_before = len(before) / max(1, sum(1 for t, _ in in_window if t < killed_at))
    failures = [r for r in results if not r.ok]
    p99 = percentile([r.elapsed for r in results], 0.99)
    report.record(
        1,
        "4 backend processes, one SIGKILLed at t=4 s (prequal)",
        load=f"{RATE} req/s GET (20 ms service time) for {DURATION_S:.0f} s ({len(results)} requests)",
        happened=(
            f"{len(failures)} failed GETs seen by clients; victim had {share_before:.0%} of attempts before the kill; "
            f"{len(after)} attempts reached it after the kill ({failed_attempts:.0f} failed attempts in all), "
            f"{retries:.0f} retries; client p99 {ms(p99)}"
        ),
        figure=f"no traffic to the dead backend {ms(quiet_after)} after the kill (bound < {ms(QUIET_BOUND_S)})",
    )
    assert before, "the victim took no traffic before the kill: the case proves nothing"
    assert not failures, describe_failures(failures)
    assert quiet_after < QUIET_BOUND_S, f"the dead backend still got attempts {quiet_after:.3f} s after the kill"

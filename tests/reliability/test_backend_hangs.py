"""Case 2: a backend that hangs: 504 at the configured timeout, the others unaffected, its in-flight capped.

Two ways to hang:

- a black hole (a raw asyncio server) that accepts requests and never answers them while its probes
  report zero load: Prequal's favourite, so only ``max_in_flight_per_backend`` keeps traffic from piling
  onto it. The server itself counts the requests it holds open at once: the figure is what arrived,
  not what the gateway believes;
- a real backend process frozen with SIGSTOP (the kernel still accepts connections), resumed with SIGCONT.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.reliability.load import OpenLoop, Result, describe_failures, get, percentile
from tests.reliability.procs import backend_proc, gateway_proc, running
from tests.reliability.rawservers import BlackHole, LoopThread
from tests.reliability.report import Report
from tests.reliability.support import by_status, ms, pools_env, seconds_until

TIMEOUT_S = 1.0
# A 504 cannot come before the timeout (less the client's clock noise), but may come late on a stalled
# machine; a timeout not enforced at all would show as the client's own 10 s.
EARLY_S = 0.10
LATE_S = 0.50
LIMIT = 4
# The limit of a pool shared with healthy backends. Twice the frozen one's: 150 req/s of 5 ms requests
# keep ~1 in flight per healthy backend, but a stall of the shared 2-core machine (a full suite's
# neighbours) let 7 arrivals find every healthy backend at 4 once, and the 503s that followed were the
# limit doing its job, not the fault under test.
SHARED_LIMIT = 8
RATE = 150
PATH = "/api/echo?ms=5"
# Harm done by the hung backend (healthy requests queued behind it, or sent to it first) shows as
# latencies near the 1 s timeout; the p99 of the others stays below half of it. Not compared with the
# baseline's p99: one stall of the shared machine moves a 6 s run's p99 by 100 ms.
P99_BOUND_S = 0.5 * TIMEOUT_S


def pool(upstreams: Sequence[str], limit: int = SHARED_LIMIT) -> dict[str, object]:
    return {
        "/api": {
            "upstreams": list(upstreams),
            "timeouts": {"response_headers_s": TIMEOUT_S},
            "max_in_flight_per_backend": limit,
        }
    }


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def timing_ok(r: Result) -> bool:
    return TIMEOUT_S - EARLY_S <= r.elapsed <= TIMEOUT_S + LATE_S


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread().start()
    yield thread
    thread.stop()


def test_black_hole_backend(log_dir: Path, report: Report, loop: LoopThread) -> None:
    hole = BlackHole(loop).start()
    backends = [backend_proc(f"b{i}", log_dir) for i in range(3)]
    gateway = gateway_proc("gateway", log_dir, pools_env(pool([b.url for b in backends])))
    try:
        with running(*backends), running(gateway, ready_path="/_prequal/healthz"):
            httpx.get(gateway.url + "/api/echo")
            baseline = OpenLoop(gateway.url, rate=RATE, duration_s=5, request=get(PATH)).start().join()
            registered = httpx.post(gateway.url + "/_prequal/register", json={"url": hole.url})
            assert registered.status_code == 201, registered.text
            hung = OpenLoop(gateway.url, rate=RATE, duration_s=6, request=get(PATH)).start().join()
            after_s = seconds_until(lambda: hole.holding == 0, 5, "the gateway to close every held request")
    finally:
        hole.stop()

    base_ok = [r.elapsed for r in baseline if r.ok]
    others = [r.elapsed for r in hung if r.ok]
    timeouts = [r for r in hung if r.status == 504]
    unexpected = [r for r in hung if not r.ok and r.status != 504] + [r for r in baseline if not r.ok]
    p99_base, p99_hung = percentile(base_ok, 0.99), percentile(others, 0.99)
    worst = max((r.elapsed - TIMEOUT_S for r in timeouts), key=abs, default=0.0)
    report.record(
        2,
        f"black hole (answers probes with zero load, never answers requests) joins 3 healthy backends; "
        f"timeout {TIMEOUT_S:g} s, max_in_flight_per_backend={SHARED_LIMIT}",
        load=f"{RATE} req/s GET, 5 s baseline then 6 s with the black hole ({len(hung)} requests)",
        happened=(
            f"{len(timeouts)} requests reached it and got 504 after {ms(min(r.elapsed for r in timeouts))}"
            f"-{ms(max(r.elapsed for r in timeouts))}; statuses {by_status(hung)}; others' p99 {ms(p99_base)} "
            f"before, {ms(p99_hung)} with it; at most {hole.max_holding} requests held at once by the black hole "
            f"({hole.requests} in all); all released {ms(after_s)} after the load"
            if timeouts
            else f"no request reached the black hole; statuses {by_status(hung)}"
        ),
        figure=(
            f"504 at the timeout {worst * 1000:+.0f} ms at worst (bound -{ms(EARLY_S)}/+{ms(LATE_S)}); p99 "
            f"{ms(p99_hung)} vs {ms(p99_base)} before (bound < {ms(P99_BOUND_S)}); held at once "
            f"{hole.max_holding} (bound ≤ {SHARED_LIMIT})"
        ),
    )
    assert hole.requests >= LIMIT, "the black hole got too little traffic to show anything"
    assert not unexpected, describe_failures(unexpected)
    assert all(timing_ok(r) for r in timeouts), [round(r.elapsed, 3) for r in timeouts if not timing_ok(r)]
    assert p99_hung < P99_BOUND_S, (p99_base, p99_hung)
    assert hole.max_holding <= SHARED_LIMIT


def test_sigstopped_backend(log_dir: Path, report: Report) -> None:
    backends = [backend_proc(f"b{i}", log_dir) for i in range(4)]
    victim = backends[0]
    pools = {**pool([b.url for b in backends]), "/solo": pool([victim.url], LIMIT)["/api"]}
    gateway = gateway_proc("gateway", log_dir, pools_env(pools))
    burst = 10
    with running(*backends), running(gateway, ready_path="/_prequal/healthz"):
        httpx.get(gateway.url + "/solo/echo")
        load = OpenLoop(gateway.url, rate=RATE, duration_s=8, request=get(PATH)).start()
        time.sleep(2.0)
        victim.signal(signal.SIGSTOP)
        # A burst at the frozen backend alone: the first LIMIT hang until the timeout, the rest find it at its limit.
        solo = OpenLoop(gateway.url, rate=1000, duration_s=burst / 1000, request=get("/solo/echo")).start().join()
        time.sleep(3.0 - TIMEOUT_S)
        victim.signal(signal.SIGCONT)
        resumed_at = time.time()
        results = load.join()
        back_s = seconds_until(
            lambda: httpx.get(gateway.url + "/solo/echo", timeout=5).status_code == 200, 10, "the victim to serve"
        )

    hung = [r for r in solo if r.status == 504]
    limited = [r for r in solo if r.status == 503]
    timeouts = [r for r in results if r.status == 504]
    unexpected = [r for r in results if not r.ok and r.status != 504]
    # The limit is a pool setting: each pool counts its own requests to the backend.
    overlap = max_overlap([(r.start, r.end) for r in hung])
    shared_overlap = max_overlap([(r.start, r.end) for r in timeouts])
    served_again = [r.end for r in results if r.backend == "b0" and r.start > resumed_at]
    worst = max((r.elapsed - TIMEOUT_S for r in hung + timeouts), key=abs, default=0.0)
    report.record(
        2,
        f"one of 4 backend processes frozen (SIGSTOP) for 3 s, then SIGCONT; timeout {TIMEOUT_S:g} s, "
        f"max_in_flight_per_backend={SHARED_LIMIT} ({LIMIT} in the solo pool); right after the stop, "
        f"{burst} requests at once to a pool whose only member it is",
        load=f"{RATE} req/s GET on the 4-backend pool for 8 s ({len(results)} requests) + the burst",
        happened=(
            f"burst: {len(hung)} hung and got 504 after {ms(min((r.elapsed for r in hung), default=0))}-"
            f"{ms(max((r.elapsed for r in hung), default=0))}, {len(limited)} got 503 no_backend at once "
            f"(in {ms(max((r.elapsed for r in limited), default=0))}); 4-backend pool: statuses {by_status(results)}, "
            f"p99 of the 200s {ms(percentile([r.elapsed for r in results if r.ok], 0.99))}, traffic to it again "
            + (f"{ms(min(served_again) - resumed_at)} after SIGCONT" if served_again else f"{ms(back_s)} after")
        ),
        figure=f"504 at the timeout {worst * 1000:+.0f} ms at worst (bound -{ms(EARLY_S)}/+{ms(LATE_S)}); "
        f"in flight to it at once: solo pool {overlap} (bound ≤ {LIMIT}), shared pool {shared_overlap} "
        f"(bound ≤ {SHARED_LIMIT})",
        order=1,
    )
    assert len(hung) == LIMIT and len(limited) == burst - LIMIT, by_status(solo)
    assert all(r.elapsed < 0.5 * TIMEOUT_S for r in limited)
    assert not unexpected, describe_failures(unexpected)
    assert all(timing_ok(r) for r in hung + timeouts), [
        round(r.elapsed, 3) for r in hung + timeouts if not timing_ok(r)
    ]
    assert overlap <= LIMIT and shared_overlap <= SHARED_LIMIT

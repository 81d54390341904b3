"""Case 6: a backend that starts failing fast (instant 500s) while its probes report zero load.

To a load-aware balancer it looks like the idlest, fastest backend there is (Prequal's "sinkholing");
error aversion and ejection must take it out. The victim is the backend with the largest share while
healthy (Prequal favours some); its share of the upstream attempts is measured from the gateway's own
record (``--record-attempts``) per 250 ms window, aligned to the moment it starts failing, and over
every 250 ms interval (sliding windows: the same measure without depending on where windows fall).

The gateway's probe timeout is 250 ms here, not 50 ms, so that the measure is of error aversion and
ejection alone. Missed probes once counted as failed requests: on a loaded 2-CPU machine healthy
backends missed 50 ms probes, were ejected, filled the ejection cap, and Prequal's random fallback
(which then ignored error aversion) handed the fast failer half the traffic. The deterministic
reproduction on the sans-IO core is ``test_probe_timeouts_do_not_hand_traffic_to_a_fast_failer``.
"""

from __future__ import annotations

import bisect
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import pytest

from prequal_middleware.core import Member, Outcome
from prequal_middleware.core.prequal import PrequalPolicy
from tests.reliability.load import OpenLoop, Result, get
from tests.reliability.procs import backend_proc, gateway_proc, running
from tests.reliability.report import Report
from tests.reliability.support import attempts, by_status, ms, pools_env, shares

RATE = 200
BEFORE_S = 2.0
AFTER_S = 5.0
WINDOW_S = 0.25
SHARE_BOUND = 0.05
WITHIN_S = 1.0
PROBE_TIMEOUT_S = 0.25


@dataclass
class Run:
    victim: str
    flipped_at: float
    share_before: float
    seen: list[tuple[float, str]]
    results: list[Result]


def sliding_max_share(seen: Sequence[tuple[float, str]], target: str, start: float, end: float) -> float:
    """The largest share ``target`` has of the events in any ``WINDOW_S`` interval starting at one of its own."""
    times = sorted(t for t, _ in seen if start <= t < end)
    own = sorted(t for t, b in seen if b == target and start <= t < end)
    best = 0.0
    for t in own:
        total = bisect.bisect_left(times, t + WINDOW_S) - bisect.bisect_left(times, t)
        hits = bisect.bisect_left(own, t + WINDOW_S) - bisect.bisect_left(own, t)
        best = max(best, hits / total)
    return best


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, report: Report) -> Run:
    log_dir = tmp_path_factory.mktemp("fast-failer")
    backends = [backend_proc(f"b{i}", log_dir) for i in range(4)]
    pools = {"/api": {"upstreams": [b.url for b in backends], "probes": {"timeout_s": PROBE_TIMEOUT_S}}}
    gateway = gateway_proc("gateway", log_dir, pools_env(pools), record_attempts=True)
    with running(*backends), running(gateway, ready_path="/_prequal/healthz"):
        httpx.get(gateway.url + "/api/echo")
        load = OpenLoop(gateway.url, rate=RATE, duration_s=BEFORE_S + AFTER_S, request=get("/api/echo?ms=2")).start()
        time.sleep(BEFORE_S)
        healthy = [b for t, b in attempts(gateway.url) if t >= load.started_at + 0.5]
        victim, count = Counter(healthy).most_common(1)[0]
        flipped_at = time.time()
        assert httpx.post(victim + "/_control/fail?on=1").json()["failing"] is True
        results = load.join()
        seen = attempts(gateway.url)
    result = Run(victim, flipped_at, count / len(healthy), seen, results)
    record(report, result)
    return result


def record(report: Report, r: Run) -> None:
    windows = shares(r.seen, r.victim, r.flipped_at, r.flipped_at + AFTER_S - WINDOW_S, WINDOW_S)
    aligned_late = max(w[1] for w in windows if w[0] >= WITHIN_S)
    sliding_late = sliding_max_share(r.seen, r.victim, r.flipped_at + WITHIN_S, r.flipped_at + AFTER_S)
    first_low = next((w[0] for w in windows if w[1] < SHARE_BOUND), AFTER_S)
    after = [round(t - r.flipped_at, 3) for t, b in r.seen if b == r.victim and t >= r.flipped_at + WITHIN_S]
    report.record(
        6,
        "one of 4 backends (the one with the largest share) turns into a fast failer: instant 500s, probes "
        "say RIF 0 and latency 0; prequal policy",
        load=f"{RATE} req/s GET (2 ms service time), {BEFORE_S:g} s healthy then {AFTER_S:g} s failing; "
        f"probe timeout {PROBE_TIMEOUT_S * 1000:.0f} ms",
        happened=(
            f"its share {r.share_before:.0%} before; per {ms(WINDOW_S)} window after: "
            + " ".join(f"{w[1]:.0%}" for w in windows)
            + f"; attempts to it after {WITHIN_S:g} s at t = {', '.join(f'{t:.3f}' for t in after)} s; "
            f"clients saw {by_status(r.results)}"
        ),
        figure=(
            f"share {windows[0][1]:.0%} in the first {ms(WINDOW_S)}, below {SHARE_BOUND:.0%} from {ms(first_low)}; "
            f"after {WITHIN_S:g} s at most "
            f"{aligned_late:.0%} per aligned window and {sliding_late:.0%} in any 250 ms interval "
            f"(bound < {SHARE_BOUND:.0%} from {WITHIN_S:g} s on)"
        ),
    )


def test_fast_failer_loses_its_share_within_a_second(run: Run) -> None:
    assert run.share_before > 0.25 - 1e-9, "the favourite of 4 backends has at least a quarter"
    errors = [r for r in run.results if not r.ok]
    assert all(r.status == 500 for r in errors), by_status(errors)
    windows = shares(run.seen, run.victim, run.flipped_at, run.flipped_at + AFTER_S - WINDOW_S, WINDOW_S)
    first_low = next(w[0] for w in windows if w[1] < SHARE_BOUND)
    assert first_low < WITHIN_S
    late = [(t, b) for t, b in run.seen if t >= run.flipped_at + WITHIN_S]
    overall = sum(b == run.victim for _, b in late) / len(late)
    assert overall < SHARE_BOUND / 2, f"{overall:.1%} of the attempts after {WITHIN_S:g} s"


def test_fast_failer_stays_below_5_percent_in_every_window(run: Run) -> None:
    # Each return from an ejection costs one request (probation: the first failure ejects it again; a
    # trial: no second request while the first is in flight). Before probation, every return cost 2
    # attempts within ~5 ms and a 3rd within ~250 ms, 6%; before trials, a loaded machine (failures slow
    # to come back) saw 3 attempts in 250 ms at a return (5.8% in CI).
    worst = sliding_max_share(run.seen, run.victim, run.flipped_at + WITHIN_S, run.flipped_at + AFTER_S)
    assert worst < SHARE_BOUND, f"{worst:.1%} of the attempts in some 250 ms interval after {WITHIN_S:g} s"


def run_core(stall: bool, seconds: float = 1.0, rate: float = RATE) -> tuple[float, dict[str, int]]:
    """The sans-IO policy, driven for ``seconds``: (the fast failer's share, selections by reason).

    With ``stall``, two healthy backends first miss five probes each, as during a CPU stall."""
    policy = PrequalPolicy(rng=random.Random(1))
    policy.set_members([Member(u) for u in ("failer", "b", "c", "d")], 0.0)
    now = 0.0
    if stall:
        for backend in ("b", "c"):
            for _ in range(5):
                policy.on_probe_failure(backend, now)
    load = {"failer": (0, 0.0), "b": (1, 0.002), "c": (1, 0.002), "d": (1, 0.002)}
    hits = 0
    n = int(seconds * rate)
    for _ in range(n):
        selection = policy.select(now)
        assert selection is not None
        failed = selection.backend == "failer"
        hits += failed
        policy.on_start(selection.backend, now)
        policy.on_finish(selection.backend, now + 0.001, 0.001, Outcome.FAILURE if failed else Outcome.SUCCESS)
        for probe in selection.probes:
            policy.on_probe(probe, now + 0.001, *load[probe])
        now += 1 / rate
    return hits / n, dict(policy.selections)


def test_probe_timeouts_do_not_hand_traffic_to_a_fast_failer(report: Report) -> None:
    calm, _ = run_core(stall=False)
    share, selections = run_core(stall=True)
    report.record(
        6,
        "sans-IO PrequalPolicy, 4 members, one failing fast with zero-load probes; two healthy ones first miss "
        "5 probes each (this once ejected them and filled the 50% cap)",
        load=f"{RATE} simulated requests over 1 s, seeded",
        happened=f"the failer's share {calm:.1%} without the missed probes, {share:.1%} with them; "
        f"selections {selections}",
        figure=f"share {share:.1%} (bound < {SHARE_BOUND:.0%})",
        order=1,
    )
    assert calm < SHARE_BOUND
    assert share < SHARE_BOUND

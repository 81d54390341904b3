"""Suspects on trial: a backend whose last outcome was a failure (or back from an ejection) takes one
request at a time until one succeeds, for at most ``OutlierSettings.trial_timeout_s`` per request."""

from __future__ import annotations

import bisect
import heapq
import random

import pytest

from prequal_middleware.core import Member, Outcome, OutlierSettings, RoundRobinPolicy
from prequal_middleware.core.policy import BasePolicy
from prequal_middleware.core.prequal import PrequalPolicy


def picks(policy: BasePolicy, now: float, n: int = 200) -> set[str]:
    return {s.backend for s in (policy.select(now) for _ in range(n)) if s is not None}


def suspect_pool(*members: str, **settings: float) -> RoundRobinPolicy:
    """A round-robin pool whose member ``a`` just failed once (a suspect, not ejected)."""
    policy = RoundRobinPolicy(rng=random.Random(1), outliers=OutlierSettings(**settings))  # type: ignore[arg-type]
    policy.set_members([Member(m) for m in members], now=0.0)
    policy.on_start("a", 0.0)
    policy.on_finish("a", 0.0, 0.001, Outcome.FAILURE)
    assert policy.outliers.suspects == {"a"}
    return policy


def test_a_suspect_takes_one_request_at_a_time_until_one_succeeds() -> None:
    policy = suspect_pool("a", "b", "c")
    assert "a" in picks(policy, 0.1), "a suspect with nothing in flight takes a request: its trial"
    policy.on_start("a", 0.1)
    assert picks(policy, 0.2) == {"b", "c"}, "while its trial is in flight, nothing more"
    policy.on_finish("a", 0.3, 0.2, Outcome.SUCCESS)
    assert policy.outliers.suspects == set()
    assert "a" in picks(policy, 0.3)
    policy.on_start("a", 0.3)
    policy.on_start("a", 0.3)
    assert "a" in picks(policy, 0.3), "no longer a suspect: as many requests as the policy likes"


def test_a_failed_trial_allows_the_next_one() -> None:
    policy = suspect_pool("a", "b", "c")
    policy.on_start("a", 0.1)
    policy.on_finish("a", 0.2, 0.1, Outcome.FAILURE)
    assert "a" in picks(policy, 0.2), "the next trial (the policy's error handling decides the rest)"
    policy.on_start("a", 0.2)
    assert "a" not in picks(policy, 0.25)


def test_a_cancelled_trial_ends_the_trial() -> None:
    policy = suspect_pool("a", "b")
    policy.on_start("a", 0.1)
    assert picks(policy, 0.1) == {"b"}
    policy.on_finish("a", 0.2, 0.1, Outcome.CANCELLED)
    assert "a" in picks(policy, 0.2)
    assert policy.outliers.suspects == {"a"}, "a cancelled request says nothing: still a suspect"


def test_a_hanging_trial_holds_the_backend_out_for_the_timeout_only() -> None:
    policy = suspect_pool("a", "b", trial_timeout_s=2.0)
    policy.on_start("a", 10.0)  # a stream, or a black hole: it does not end
    assert picks(policy, 11.9) == {"b"}
    assert "a" in picks(policy, 12.0), "no event in between: the candidates expire with the trial"
    policy.on_start("a", 12.0)
    assert picks(policy, 13.9) == {"b"}, "the request after the timeout is the next trial"
    assert "a" in picks(policy, 14.0)


def test_trials_never_empty_the_pool() -> None:
    single = suspect_pool("a")
    single.on_start("a", 0.1)
    assert picks(single, 0.2) == {"a"}, "a pool of one keeps sending to its member (no 503 for a trial)"
    both = suspect_pool("a", "b")
    both.on_start("b", 0.0)
    both.on_finish("b", 0.0, 0.001, Outcome.FAILURE)
    both.on_start("a", 0.1)
    both.on_start("b", 0.1)
    assert picks(both, 0.2) == {"a", "b"}, "every candidate on trial: all of them, rather than none"


def test_no_trials_when_turned_off_or_in_panic() -> None:
    off = suspect_pool("a", "b", trial_timeout_s=0.0)
    off.on_start("a", 0.1)
    assert "a" in picks(off, 0.2)
    # Panic (fewer than half healthy): every member takes requests, trials or not.
    panic = suspect_pool("a", "b", "c", "d", consecutive_failures=1, panic_threshold=0.9)
    panic.on_start("a", 0.1)
    assert panic.outliers.is_ejected("a", 0.1) and panic.snapshot(0.1).panic
    for backend in ("b", "c"):
        panic.on_start(backend, 0.1)
        panic.on_finish(backend, 0.1, 0.001, Outcome.FAILURE)
    panic.on_start("d", 0.1)
    panic.on_finish("d", 0.1, 0.001, Outcome.FAILURE)
    panic.on_start("d", 0.2)  # d: a suspect with a request in flight
    assert "d" in picks(panic, 0.3)


def test_a_member_that_leaves_during_its_trial_leaves_no_trial_behind() -> None:
    policy = suspect_pool("a", "b")
    policy.on_start("a", 0.1)
    policy.remove_member("a", 0.2)
    policy.upsert_member(Member("a"), 0.3)
    assert "a" in picks(policy, 0.3), "back as a new member: no trial, no suspicion"


def fast_failer_attempts(trial_timeout_s: float, delay_s: float, seed: int) -> list[float]:
    """Prequal over four members, one of which fails fast from t = 0 and reports no load in its probes.

    Requests come at 200/s (Poisson, seeded); every outcome and probe answer comes back ``delay_s``
    after the request started (a loaded machine). Returns when requests went to the failer."""
    settings = OutlierSettings(trial_timeout_s=trial_timeout_s)
    policy = PrequalPolicy(rng=random.Random(seed), outliers=settings)
    policy.set_members([Member(u) for u in ("failer", "b", "c", "d")], -2.0)
    arrivals = random.Random(seed + 1000)
    pending: list[tuple[float, int, str, str]] = []  # (when, order, kind, backend)
    hits: list[float] = []
    now, order = -2.0, 0
    while now < 5.0:
        while pending and pending[0][0] <= now:
            at, _, kind, backend = heapq.heappop(pending)
            failing = backend == "failer" and at >= delay_s
            if kind == "finish":
                policy.on_finish(backend, at, delay_s, Outcome.FAILURE if failing else Outcome.SUCCESS)
            else:
                policy.on_probe(backend, at, 0 if failing else 1, 0.0 if failing else 0.002)
        selection = policy.select(now)
        assert selection is not None
        if selection.backend == "failer" and now >= 0.0:
            hits.append(now)
        policy.on_start(selection.backend, now)
        order += 1
        heapq.heappush(pending, (now + delay_s, order, "finish", selection.backend))
        for probe in selection.probes:
            order += 1
            heapq.heappush(pending, (now + delay_s, order, "probe", probe))
        now += arrivals.expovariate(200.0)
    return hits


def most_in_250_ms(times: list[float]) -> int:
    return max((bisect.bisect_left(times, t + 0.25) - bisect.bisect_left(times, t) for t in times), default=0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_return_of_a_fast_failer_costs_one_request_however_slow_its_answer(seed: int) -> None:
    for delay_s in (0.001, 0.02, 0.04):
        hits = fast_failer_attempts(1.0, delay_s, seed)
        late = [t for t in hits if t >= 1.0]
        assert 1 <= len(late) <= 3 and most_in_250_ms(late) == 1, (delay_s, late)
    # Without trials, a failure that takes 40 ms to come back leaves time for more requests to the
    # idle-looking failer at each return from an ejection.
    late = [t for t in fast_failer_attempts(0.0, 0.04, seed) if t >= 1.0]
    assert most_in_250_ms(late) >= 2, late

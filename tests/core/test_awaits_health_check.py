"""Members that await their first passing health check get no traffic, not even in panic mode."""

from __future__ import annotations

import random

import pytest

from prequal_middleware.core import Member, OutlierSettings, create_policy

POLICIES = ["prequal", "round_robin", "random", "least_request", "peak_ewma", "least_latency"]


@pytest.mark.parametrize("name", POLICIES)
def test_an_unproven_member_is_no_candidate_until_a_check_passes(name: str) -> None:
    policy = create_policy(name, rng=random.Random(1))
    policy.set_members([Member("a"), Member("new", awaits_health_check=True)], now=0.0)
    assert list(policy.candidates(0.0)) == ["a"]
    assert {policy.select(0.0).backend for _ in range(50)} == {"a"}  # type: ignore[union-attr]
    assert {b.id: b.state for b in policy.snapshot(0.0).backends} == {"a": "healthy", "new": "unhealthy"}
    policy.set_health("new", True, now=1.0)
    assert sorted(policy.candidates(1.0)) == ["a", "new"]


@pytest.mark.parametrize("name", POLICIES)
def test_panic_never_routes_to_members_that_never_proved_healthy(name: str) -> None:
    policy = create_policy(name, rng=random.Random(2), outliers=OutlierSettings(panic_threshold=0.5))
    holes = [Member(f"hole{i}", awaits_health_check=True) for i in range(200)]
    policy.set_members([Member("good"), *holes], now=0.0)
    assert list(policy.candidates(0.0)) == ["good"]
    selections = [policy.select(0.0) for _ in range(20)]
    assert {s.backend for s in selections if s is not None} == {"good"}
    assert all(s is not None and s.reason != "panic" for s in selections)
    # Every proven member unhealthy: panic chooses among the proven ones only.
    policy.set_health("good", False, now=1.0)
    assert list(policy.candidates(1.0)) == ["good"] and policy.snapshot(1.0).panic


def test_a_proven_member_that_fails_stays_a_panic_choice() -> None:
    policy = create_policy("round_robin", rng=random.Random(3), outliers=OutlierSettings(panic_threshold=0.5))
    policy.set_members([Member("a"), Member("b", awaits_health_check=True), Member("c")], now=0.0)
    policy.set_health("b", True, now=0.5)
    policy.set_health("a", False, now=1.0)
    policy.set_health("b", False, now=1.0)
    assert sorted(policy.candidates(1.0)) == ["a", "b", "c"], "2 of 3 unhealthy: panic over the proven"


def test_a_member_left_awaiting_keeps_its_state_when_listed_again() -> None:
    policy = create_policy("round_robin", rng=random.Random(4))
    policy.set_members([Member("a"), Member("b", awaits_health_check=True)], now=0.0)
    policy.set_members([Member("a"), Member("b", weight=2.0, awaits_health_check=True)], now=1.0)
    assert list(policy.candidates(1.0)) == ["a"]
    policy.set_health("b", True, now=2.0)
    policy.set_members([Member("a"), Member("b", weight=2.0, awaits_health_check=True)], now=3.0)
    assert sorted(policy.candidates(3.0)) == ["a", "b"], "proof is kept while the member stays"

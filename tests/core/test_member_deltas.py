"""``upsert_member`` / ``remove_member``: one member's change in O(1), ending where ``set_members`` would."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from prequal_middleware.core import POLICY_CLASSES, BasePolicy, Member, create_policy
from tests.python_work import python_work

URLS = [f"http://b{i}:80" for i in range(5)]
WEIGHTS = (1.0, 2.0, 0.5)
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None)

# (kind, backend index, weight, draining, awaits_health_check)
Op = tuple[str, int, float, bool, bool]
OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("upsert"),
            st.integers(0, len(URLS) - 1),
            st.sampled_from(WEIGHTS),
            st.booleans(),
            st.booleans(),
        ),
        st.tuples(st.just("remove"), st.integers(0, len(URLS) - 1), st.just(1.0), st.just(False), st.just(False)),
        st.tuples(st.just("healthy"), st.integers(0, len(URLS) - 1), st.just(1.0), st.just(False), st.just(False)),
    ),
    max_size=30,
)


def state(policy: BasePolicy, now: float) -> dict[str, Any]:
    """Everything membership decides, order aside (a delta appends, a full set keeps the set's order)."""
    snapshot = policy.snapshot(now)
    pool = getattr(policy, "pool", None)
    return {
        "backends": {b.id: (b.state, b.weight, b.in_flight) for b in snapshot.backends},
        "uniform": policy._uniform_weights,
        "weights": dict(policy._weights),
        "outliers": sorted(policy.outliers._health),
        "candidates": sorted(policy.candidates(now)),
        "probe_pool": None if pool is None else sorted(e.backend for e in pool),
    }


@pytest.mark.parametrize("name", sorted(POLICY_CLASSES))
@PROPERTY
@given(ops=OPS)
def test_deltas_end_where_set_members_would(name: str, ops: list[Op]) -> None:
    by_delta = create_policy(name, rng=random.Random(1))
    by_set = create_policy(name, rng=random.Random(1))
    members: dict[str, Member] = {}
    now = 0.0
    for kind, index, weight, draining, awaits in ops:
        now += 1.0
        url = URLS[index]
        if kind == "upsert":
            member = Member(url, weight=weight, draining=draining, awaits_health_check=awaits)
            members[url] = member
            by_delta.upsert_member(member, now)
        elif kind == "remove":
            members.pop(url, None)
            by_delta.remove_member(url, now)
        else:
            for policy in (by_delta, by_set):
                policy.set_health(url, True, now)
        if kind != "healthy":
            by_set.set_members(list(members.values()), now)
        for policy in (by_delta, by_set):
            if members and policy.candidates(now):
                selection = policy.select(now)
                assert selection is not None
                policy.on_start(selection.backend, now)  # in-flight counts must follow a member, not a slot
        assert state(by_delta, now) == state(by_set, now)


def test_uniform_weights_follow_each_change_without_a_scan() -> None:
    policy = create_policy("random", rng=random.Random(0))
    policy.upsert_member(Member("a"), 0.0)
    policy.upsert_member(Member("b"), 0.0)
    assert policy._uniform_weights and policy._weights == {1.0: 2}
    policy.upsert_member(Member("b", weight=3.0), 0.0)
    assert not policy._uniform_weights and policy._weights == {1.0: 1, 3.0: 1}
    policy.upsert_member(Member("b", weight=1.0), 0.0)  # back to equal weights
    assert policy._uniform_weights and policy._weights == {1.0: 2}
    policy.upsert_member(Member("c", weight=2.0), 0.0)
    assert not policy._uniform_weights
    policy.remove_member("c", 0.0)
    assert policy._uniform_weights and policy._weights == {1.0: 2}
    policy.remove_member("a", 0.0)
    policy.remove_member("b", 0.0)
    policy.remove_member("b", 0.0)  # absent: nothing
    assert policy._uniform_weights and policy._weights == {} and policy.members == []


def test_upsert_keeps_what_the_policy_learnt_and_remove_forgets_it() -> None:
    forgotten: list[str] = []

    class Recording(BasePolicy):
        def _forget(self, backend: str) -> None:
            forgotten.append(backend)

    policy = Recording(rng=random.Random(0))
    policy.upsert_member(Member("a", awaits_health_check=True), 0.0)
    assert policy.candidates(0.0) == [], "awaits its first health check"
    policy.set_health("a", True, 1.0)
    policy.on_start("a", 1.0)
    policy.upsert_member(Member("a", weight=2.0, awaits_health_check=True), 2.0)  # re-registered: same backend
    (backend,) = policy.snapshot(2.0).backends
    assert (backend.state, backend.weight, backend.in_flight) == ("healthy", 2.0, 1)
    assert policy.candidates(2.0) == ["a"], "the candidates were rebuilt after the change"
    policy.upsert_member(Member("a", weight=2.0, draining=True), 3.0)
    assert policy.candidates(3.0) == [] and policy.snapshot(3.0).backends[0].state == "draining"
    policy.remove_member("a", 4.0)
    assert forgotten == ["a"] and "a" not in policy.outliers._health and policy.snapshot(4.0).backends == ()
    policy.remove_member("a", 5.0)
    assert forgotten == ["a"], "removing an absent member forgets nothing"


def traced(action: Callable[[], object]) -> tuple[int, int]:
    """(function calls, lines) Python ran for ``action``: a loop over the members shows in the lines."""
    work = python_work(action)
    return work["calls"], work["lines"]


@pytest.mark.parametrize("name", sorted(POLICY_CLASSES))
def test_a_delta_costs_the_same_at_10_and_1000_members(name: str) -> None:
    def costs(size: int) -> list[tuple[int, int]]:
        policy = create_policy(name, rng=random.Random(0))
        policy.set_members([Member(f"http://m{i}:80", weight=1.0 + i % 2) for i in range(size)], 0.0)
        policy.candidates(0.0)
        return [
            traced(lambda: policy.upsert_member(Member("http://new:80", weight=3.0), 1.0)),
            traced(lambda: policy.upsert_member(Member("http://new:80", weight=1.0), 1.0)),
            traced(lambda: policy.remove_member("http://new:80", 1.0)),
            traced(lambda: policy.remove_member("http://m0:80", 1.0)),
        ]

    assert costs(10) == costs(1000)

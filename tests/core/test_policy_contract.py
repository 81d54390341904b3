"""One contract every policy meets, built-in or plugged in (finagle's shared-suite style)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Container, Sequence

import pytest

from prequal_middleware.core import (
    POLICY_CLASSES,
    BasePolicy,
    Member,
    Outcome,
    OutlierSettings,
    Policy,
    Selection,
    create_policy,
)


class FirstPolicy(BasePolicy):
    """A user's own policy: only ``_choose`` is written."""

    name = "first"

    def _choose(self, candidates: Sequence[str], now: float, exclude: Container[str]) -> Selection:
        return Selection(candidates[0], "policy")


def _builtin(name: str) -> Callable[[random.Random], BasePolicy]:
    return lambda rng: create_policy(name, rng=rng, outliers=OutlierSettings(consecutive_failures=2))


FACTORIES: dict[str, Callable[[random.Random], BasePolicy]] = {name: _builtin(name) for name in POLICY_CLASSES}
FACTORIES["user_defined"] = lambda rng: FirstPolicy(rng=rng, outliers=OutlierSettings(consecutive_failures=2))


@pytest.fixture(params=sorted(FACTORIES))
def policy(request: pytest.FixtureRequest) -> BasePolicy:
    return FACTORIES[request.param](random.Random(42))


def members(*ids: str) -> list[Member]:
    return [Member(i) for i in ids]


def drive(policy: BasePolicy, now: float, outcome: Outcome = Outcome.SUCCESS) -> Selection | None:
    """One request as the gateway makes it, with probes answered at once."""
    selection = policy.select(now)
    if selection is None:
        return None
    for probe in selection.probes:
        policy.on_probe(probe, now, rif=1, latency_s=0.01)
    policy.on_start(selection.backend, now)
    policy.on_finish(selection.backend, now + 0.001, 0.001, outcome)
    return selection


def test_implements_the_protocol(policy: BasePolicy) -> None:
    assert isinstance(policy, Policy)
    assert policy.name in set(POLICY_CLASSES) | {"first"}


def test_empty_pool_selects_nothing(policy: BasePolicy) -> None:
    assert policy.select(0.0) is None
    policy.set_members([], now=0.0)
    assert policy.select(0.0) is None
    assert policy.snapshot(0.0).backends == ()


def test_one_member_is_always_chosen(policy: BasePolicy) -> None:
    policy.set_members(members("only"), now=0.0)
    for k in range(50):
        selection = drive(policy, k * 0.01)
        assert selection is not None and selection.backend == "only"


def test_never_selects_an_absent_member(policy: BasePolicy) -> None:
    policy.set_members(members("a", "b", "c"), now=0.0)
    for k in range(30):
        drive(policy, k * 0.01)
    policy.set_members(members("a", "c"), now=0.3)
    for k in range(200):
        selection = drive(policy, 0.3 + k * 0.001)
        assert selection is not None and selection.backend in {"a", "c"}


def test_never_selects_an_ejected_member(policy: BasePolicy) -> None:
    policy.set_members(members("a", "b", "c", "d"), now=0.0)
    for _ in range(2):
        policy.on_start("b", 0.0)
        policy.on_finish("b", 0.0, 0.001, Outcome.FAILURE)
    assert {b.id: b.state for b in policy.snapshot(0.0).backends}["b"] == "ejected"
    for k in range(200):
        selection = drive(policy, 0.001 * k)
        assert selection is not None and selection.backend != "b"


def test_never_selects_an_excluded_member(policy: BasePolicy) -> None:
    policy.set_members(members("a", "b"), now=0.0)
    for k in range(50):
        selection = policy.select(k * 0.01, exclude={"a"})
        assert selection is not None and selection.backend == "b"
    assert policy.select(1.0, exclude={"a", "b"}) is None


def test_survives_membership_churn_mid_stream(policy: BasePolicy) -> None:
    rng = random.Random(7)
    universe = [f"m{i}" for i in range(12)]
    current = universe[:6]
    policy.set_members(members(*current), now=0.0)
    in_flight: list[str] = []
    now = 0.0
    for step in range(3000):
        now += 0.001
        if step % 100 == 0:  # churn: a random subset, some old members gone with requests in flight
            current = rng.sample(universe, rng.randint(1, 8))
            policy.set_members(members(*current), now)
        selection = policy.select(now)
        assert selection is not None and selection.backend in current
        for probe in selection.probes:
            assert probe in current
            policy.on_probe(probe, now, rif=rng.randint(0, 5), latency_s=rng.random() / 10)
        policy.on_start(selection.backend, now)
        in_flight.append(selection.backend)
        if len(in_flight) > 20:  # finish requests late, possibly on members that already left
            done = in_flight.pop(rng.randrange(len(in_flight)))
            policy.on_finish(done, now, 0.01, rng.choice(list(Outcome)))
    for done in in_flight:
        policy.on_finish(done, now, 0.01, Outcome.SUCCESS)
    snapshot = policy.snapshot(now)
    assert {b.id for b in snapshot.backends} == set(current)
    assert all(b.in_flight >= 0 for b in snapshot.backends)
    assert sum(snapshot.selections.values()) == 3000


def test_in_flight_counts_return_to_zero(policy: BasePolicy) -> None:
    policy.set_members(members("a", "b", "c"), now=0.0)
    chosen = []
    for _ in range(30):
        selection = policy.select(0.0)
        assert selection is not None
        policy.on_start(selection.backend, 0.0)
        chosen.append(selection.backend)
    assert sum(b.in_flight for b in policy.snapshot(0.0).backends) == 30
    for backend in chosen:
        policy.on_finish(backend, 0.1, 0.1, Outcome.SUCCESS)
    assert all(b.in_flight == 0 for b in policy.snapshot(0.1).backends)


@pytest.mark.parametrize("name", ["least_request", "peak_ewma", "least_latency"])
def test_fast_failures_do_not_attract_load_aware_policies(name: str) -> None:
    policy = create_policy(name, rng=random.Random(3), outliers=OutlierSettings(consecutive_failures=0))
    policy.set_members(members("sink", "a", "b", "c"), now=0.0)
    picks: Counter[str] = Counter()
    now = 0.0
    for _ in range(2000):
        now += 0.002
        selection = policy.select(now)
        assert selection is not None
        picks[selection.backend] += 1
        policy.on_start(selection.backend, now)
        if selection.backend == "sink":
            policy.on_finish("sink", now, 0.0001, Outcome.FAILURE)
        else:
            policy.on_finish(selection.backend, now + 0.02, 0.02, Outcome.SUCCESS)
    assert picks["sink"] / 2000 < 0.25, f"{name} sent {picks['sink']} of 2000 to a backend failing in 0.1 ms"


@pytest.mark.parametrize(("name", "tolerance"), [("round_robin", 0.0), ("random", 0.05)])
def test_weights_are_honoured(name: str, tolerance: float) -> None:
    policy = create_policy(name, rng=random.Random(5))
    policy.set_members([Member("a", weight=1), Member("b", weight=3)], now=0.0)
    picks = Counter(s.backend for s in (policy.select(0.0) for _ in range(4000)) if s is not None)
    assert picks["b"] / 4000 == pytest.approx(0.75, abs=tolerance)


def test_smooth_weighted_round_robin_interleaves() -> None:
    policy = create_policy("round_robin", rng=random.Random(5))
    policy.set_members([Member("a", weight=5), Member("b", weight=1), Member("c", weight=1)], now=0.0)
    sequence = "".join(s.backend for s in (policy.select(0.0) for _ in range(7)) if s is not None)
    assert sequence == "aabacaa", "NGINX's smooth WRR spreads b and c between the a's"


def test_least_request_prefers_fewer_in_flight() -> None:
    policy = create_policy("least_request", rng=random.Random(5))
    policy.set_members(members("busy", "idle"), now=0.0)
    for _ in range(5):
        policy.on_start("busy", 0.0)
    assert {s.backend for s in (policy.select(0.0) for _ in range(50)) if s is not None} == {"idle"}


def test_peak_ewma_jumps_to_slow_samples_and_decays() -> None:
    from prequal_middleware.core import PeakEwmaPolicy

    policy = PeakEwmaPolicy(rng=random.Random(1), decay_s=1.0)
    policy.set_members(members("a"), now=0.0)
    assert policy.estimate("a", 0.0) == 0.030, "the default before any sample"
    policy.on_start("a", 0.0)
    policy.on_finish("a", 0.0, 0.5, Outcome.SUCCESS)
    policy.on_start("a", 0.0)
    policy.on_finish("a", 0.0, 0.9, Outcome.SUCCESS)
    assert policy.estimate("a", 0.0) == 0.9, "peak: a slower sample is taken at once"
    assert policy.estimate("a", 1.0) == pytest.approx(0.9 * 0.36788, rel=1e-3)


def test_unknown_policy_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"policy must be one of .*prequal.*got 'fastest'"):
        create_policy("fastest")

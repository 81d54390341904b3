"""Probe reports are cross-checked against what the client knows itself (issue 12, item 8).

A backend that answers every probe "RIF 0, latency 0" while serving in 300 ms took ~90% of a pool of
three. ``PrequalSettings.cross_check`` (on by default): the RIF used is at least the client's own
requests in flight to the backend; a latency below ``measured / cross_check_ratio`` and more than
``cross_check_slack_s`` below the client's own EWMA is raised to ``measured / cross_check_ratio``.
Reports out of range are ignored wherever they enter the core. The bug planted to check that each
test goes red is listed in docs/security.md ("Lying backends").
"""

from __future__ import annotations

import math
import random

import pytest

from prequal_middleware.core import Member, Outcome, PrequalPolicy, PrequalSettings, ProbePool
from prequal_middleware.core.probe_pool import MAX_REPORTED_RIF, RifHistory


def make_policy(n: int = 3, seed: int = 1, **settings: float | str | bool) -> PrequalPolicy:
    policy = PrequalPolicy(PrequalSettings(**settings), rng=random.Random(seed))  # type: ignore[arg-type]
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


def measure(policy: PrequalPolicy, backend: str, latency_s: float, now: float = 0.0) -> None:
    """One successful request of ``latency_s`` to ``backend``: sets the client's own EWMA (first sample)."""
    policy.on_start(backend, now)
    policy.on_finish(backend, now + latency_s, latency_s, Outcome.SUCCESS)


def pooled(policy: PrequalPolicy, backend: str) -> tuple[int, float]:
    entry = policy.pool.get(backend)
    assert entry is not None, f"{backend} is not pooled"
    return entry.rif, entry.latency_s


def history_rifs(policy: PrequalPolicy) -> list[int]:
    return [rif for _, rif in policy.pool.history._samples]


# --- rule 1: the RIF used is at least the client's own requests in flight -----------------------


def test_a_reported_rif_below_our_own_requests_in_flight_is_raised_to_them() -> None:
    policy = make_policy()
    for _ in range(3):
        policy.on_start("b0", 1.0)
    policy.on_probe("b0", 1.0, 0, 0.010)
    assert pooled(policy, "b0") == (3, 0.010)
    assert history_rifs(policy) == [3], "the corrected RIF feeds the hot/cold threshold too"
    assert policy.rif_corrections == 1
    assert policy.snapshot(1.0).backends[0].rif == 3, "the status page shows the RIF used"


def test_a_reported_rif_at_or_above_our_own_requests_in_flight_is_kept() -> None:
    policy = make_policy()
    for _ in range(3):
        policy.on_start("b0", 1.0)
    policy.on_probe("b0", 1.0, 3, 0.010)
    policy.on_probe("b1", 1.0, 0, 0.010)  # nothing of ours in flight there: 0 is possible
    policy.on_probe("b2", 1.0, 7, 0.010)
    assert [pooled(policy, b)[0] for b in ("b0", "b1", "b2")] == [3, 0, 7]
    assert policy.rif_corrections == 0


def test_the_rif_floor_makes_a_backend_holding_our_requests_hot() -> None:
    # b0 says RIF 0 but holds 5 of ours; b1 and b2 honestly say 1. RIF-only (q_rif=0): without the
    # floor b0 would be the coldest and win on its 1 ms.
    policy = make_policy(q_rif=0.0)
    for _ in range(5):
        policy.on_start("b0", 1.0)
    policy.on_probe("b0", 1.0, 0, 0.001)
    policy.on_probe("b1", 1.0, 1, 0.020)
    policy.on_probe("b2", 1.0, 1, 0.030)
    selection = policy.select(1.0)
    assert selection is not None and selection.backend == "b1"


# --- rule 2: a latency far below our own measurement is raised to measured / ratio --------------


def test_a_latency_far_below_our_measurement_is_raised_to_measured_over_the_ratio() -> None:
    policy = make_policy()
    measure(policy, "b0", 0.300)
    policy.on_probe("b0", 1.0, 0, 0.0)
    rif, latency_s = pooled(policy, "b0")
    assert rif == 0 and latency_s == pytest.approx(0.150)
    assert policy.latency_corrections == 1


def test_the_ratio_is_a_setting() -> None:
    policy = make_policy(cross_check_ratio=4.0)
    measure(policy, "b0", 0.300)
    policy.on_probe("b0", 1.0, 0, 0.050)  # below 0.3 / 4
    assert pooled(policy, "b0")[1] == pytest.approx(0.075)
    policy.on_probe("b0", 1.1, 0, 0.100)  # below 0.3 / 2 but not 0.3 / 4: kept
    assert pooled(policy, "b0")[1] == 0.100


def test_a_liar_loses_to_an_honest_backend_it_would_otherwise_beat() -> None:
    # Both cold (RIF 0). The liar says 0 ms and serves in 300 ms; the honest one says 25 ms (we measure 30).
    policy = make_policy(n=2)
    measure(policy, "b0", 0.300)
    measure(policy, "b1", 0.030)
    policy.on_probe("b0", 1.0, 0, 0.0)
    policy.on_probe("b1", 1.0, 0, 0.025)
    selection = policy.select(1.0)
    assert selection is not None and selection.backend == "b1"


# --- rule 3: honest reports within the ratio or the slack are left alone -------------------------


@pytest.mark.parametrize(
    ("measured", "reported"),
    [
        (0.030, 0.016),  # above measured / 2: the gateway's overhead and queueing on top of an honest report
        (0.030, 0.030),
        (0.030, 0.050),  # slower than we measured: never raised or lowered
        (0.004, 0.0),  # below measured / 2, but by less than the 5 ms slack: a fast backend
        (0.0049, 0.0),
    ],
)
def test_reports_within_the_ratio_or_the_slack_are_kept(measured: float, reported: float) -> None:
    policy = make_policy()
    measure(policy, "b0", measured)
    policy.on_probe("b0", 1.0, 0, reported)
    assert pooled(policy, "b0") == (0, reported)
    assert policy.latency_corrections == 0


def test_the_slack_is_a_setting_and_only_the_slack_spares_a_small_difference() -> None:
    policy = make_policy()
    measure(policy, "b0", 0.008)  # 8 ms measured, 0 reported: past the 5 ms slack
    policy.on_probe("b0", 1.0, 0, 0.0)
    assert pooled(policy, "b0")[1] == pytest.approx(0.004)

    wide = make_policy(cross_check_slack_s=0.010)
    measure(wide, "b0", 0.008)
    wide.on_probe("b0", 1.0, 0, 0.0)
    assert pooled(wide, "b0")[1] == 0.0


def test_nothing_measured_yet_nothing_to_check() -> None:
    policy = make_policy()
    policy.on_probe("b0", 1.0, 0, 0.0)
    policy.on_start("b1", 1.0)
    policy.on_finish("b1", 1.3, 0.3, Outcome.FAILURE)  # failures never feed the EWMA
    policy.on_probe("b1", 1.3, 0, 0.0)
    assert pooled(policy, "b0") == (0, 0.0)
    assert policy.latency_corrections == 0


# --- rule 4: the setting off restores the old behaviour --------------------------------------------


def test_cross_check_off_pools_reports_as_they_come() -> None:
    policy = make_policy(n=2, cross_check=False)
    measure(policy, "b0", 0.300)
    measure(policy, "b1", 0.030)
    for _ in range(4):
        policy.on_start("b0", 1.0)
    policy.on_probe("b0", 1.0, 0, 0.0)
    policy.on_probe("b1", 1.0, 0, 0.025)
    assert pooled(policy, "b0") == (0, 0.0)
    assert policy.rif_corrections == policy.latency_corrections == 0
    selection = policy.select(1.0)
    assert selection is not None and selection.backend == "b0", "the liar wins, as it did before"


def test_cross_check_is_on_by_default() -> None:
    s = PrequalSettings()
    assert (s.cross_check, s.cross_check_ratio, s.cross_check_slack_s) == (True, 2.0, 0.005)
    assert PrequalSettings.paper().cross_check is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cross_check", 1),
        ("cross_check", "yes"),
        ("cross_check_ratio", 1.0),
        ("cross_check_ratio", 0.5),
        ("cross_check_ratio", math.inf),
        ("cross_check_ratio", math.nan),
        ("cross_check_slack_s", -0.001),
        ("cross_check_slack_s", math.inf),
        ("cross_check_slack_s", math.nan),
    ],
)
def test_cross_check_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        PrequalSettings(**{field: value})  # type: ignore[arg-type]


# --- rule 5: reports out of range are ignored wherever they enter the core --------------------------

BAD_REPORTS: list[tuple[object, object]] = [
    (-1, 0.01),
    (MAX_REPORTED_RIF + 1, 0.01),
    (10**400, 0.01),  # float() of it overflows: the hot/cold threshold raised on every selection
    (True, 0.01),
    (1.5, 0.01),
    ("3", 0.01),
    (None, 0.01),
    (1, math.nan),
    (1, math.inf),
    (1, -0.001),
    (1, "0.01"),
    (1, None),
    (1, 10**400),
]


@pytest.mark.parametrize(("rif", "latency_s"), BAD_REPORTS)
@pytest.mark.parametrize("cross_check", [True, False])
def test_a_bad_report_is_ignored_by_the_policy(rif: object, latency_s: object, cross_check: bool) -> None:
    policy = make_policy(cross_check=cross_check)
    policy.on_probe_failure("b0", 0.5)
    policy.on_probe("b0", 1.0, rif, latency_s)  # type: ignore[arg-type]
    assert "b0" not in policy.pool
    assert history_rifs(policy) == []
    assert policy.reports_ignored == 1
    assert policy._backends["b0"].probe_failures == 1, "not counted as an answer"
    policy.on_probe("b1", 1.0, 0, 0.01)
    policy.on_probe("b2", 1.0, 1, 0.02)
    for _ in range(3):
        assert policy.select(1.0) is not None
    policy.snapshot(1.0)


def test_reports_at_the_edges_of_the_range_are_used() -> None:
    policy = make_policy()
    policy.on_probe("b0", 1.0, MAX_REPORTED_RIF, 0.0)
    policy.on_probe("b1", 1.0, 0, 600.0)
    assert pooled(policy, "b0") == (MAX_REPORTED_RIF, 0.0)
    assert pooled(policy, "b1") == (0, 600.0)
    assert policy.reports_ignored == 0
    assert policy.select(1.0) is not None


@pytest.mark.parametrize(("rif", "latency_s"), BAD_REPORTS)
def test_a_bad_report_is_ignored_by_the_pool(rif: object, latency_s: object) -> None:
    pool = ProbePool(PrequalSettings(), random.Random(1))
    assert pool.add("a", rif, latency_s, now=0.0, n_available=4) is None  # type: ignore[arg-type]
    assert len(pool) == 0 and len(pool.history) == 0
    pool.add("b", 0, 0.01, now=0.0, n_available=4)
    pool.add("c", 2, 0.01, now=0.0, n_available=4)
    assert pool.choose(0.0) is not None


@pytest.mark.parametrize("rif", [-1, MAX_REPORTED_RIF + 1, 10**400, True, 2.0])
def test_a_bad_rif_is_ignored_by_the_history(rif: object) -> None:
    history = RifHistory(size=8, window_s=2.0)
    history.add(rif, now=0.0)  # type: ignore[arg-type]
    assert len(history) == 0
    history.add(3, now=0.0)
    assert history.threshold(0.5, now=0.0) == 3.0


@pytest.mark.parametrize(("rif", "latency_s"), BAD_REPORTS)
@pytest.mark.parametrize("cross_check", [True, False])
def test_a_bad_piggybacked_report_is_ignored_by_the_policy(rif: object, latency_s: object, cross_check: bool) -> None:
    """``on_report`` checks what it gets as ``on_probe`` does (its fast path included): a bad one is no report."""
    policy = make_policy(cross_check=cross_check, report_max_age_s=0.05)
    policy.on_report("b0", 1.0, rif, latency_s)  # type: ignore[arg-type]
    assert policy.reports_ignored == 1
    assert "b0" not in policy._reports
    policy.on_report("b0", 1.0, MAX_REPORTED_RIF, 0.0)  # the edges of the range are used
    policy.on_report("b1", 1.0, 0, 600.0)
    assert policy.reports_ignored == 1
    assert (policy._reports["b0"].rif, policy._reports["b1"].latency_s) == (MAX_REPORTED_RIF, 600.0)

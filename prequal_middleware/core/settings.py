"""The policies' settings (``PrequalSettings``, ``OutlierSettings``) and the checks every settings
dataclass of the core runs on construction (``check_types``, then ``check_values``).

Apart from the modules that use them because those are compiled with mypyc in release wheels: here the
dataclasses stay plain Python, so pydantic reads their annotations as written (``Literal`` included)
when it builds the configuration schema, and a wrongly typed field gets a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

# The low end of the paper's good range [0.6, 0.9]. The paper's default, 2 ** -0.25 ~= 0.84 (section 4),
# lost to 0.6 in our simulator and testbed at high load (CHANGELOG, "Decided"; docs/benchmarks.md).
DEFAULT_Q_RIF = 0.6


@dataclass(frozen=True, kw_only=True, slots=True)
class PrequalSettings:
    """Prequal's parameters, with the paper's testbed defaults (section 5) except ``q_rif`` and ``fallback``.

    Parameters:
        pool_size: ``m``, the most probes kept; a newer probe of a backend replaces the older one.
            Fixed, whatever the fleet size: with the default rates Eq. 1's reuse budget is 1 for fleets
            of 24 backends or fewer (``reuse_budget``), so each probe is used once and the pool holds
            every fresh probe of the fleet. A pool derived from the fleet size (``min(16, n // 3)``,
            which gives Eq. 1 a budget of 2 there) measured worse at 6 backends and no better at 12 and
            20 (docs/simulator.md, "Small fleets and the pool size"); set it explicitly to change it.
        max_age_s: probes older than this (by local receipt time) are dropped.
        probes_per_query: ``r_probe``; fractional values are rounded deterministically per query so
            the long-run rate is exact (paper footnote 7).
        removals_per_query: ``r_remove``, alternating the oldest and the worst probe.
        drift: ``delta`` in Eq. 1, the net pool drift rate (> 0).
        q_rif: quantile of recent probe RIFs above which a probe is hot. 1 is latency-only (nothing is
            hot), 0 is RIF-only. Default 0.6; the paper's is 0.84 (see ``DEFAULT_Q_RIF``).
        max_reuse: cap on the reuse budget (default 2). The paper's testbed budget is 1.316; much
            larger ones arise only when the pool is nearly as large as the fleet (``m`` close to
            ``n``) or probes are scarce, and then the best probe herds traffic onto one backend
            (docs/simulator.md measures it). Raise it for very low probe rates.
        rif_history_size: how many recent probe RIFs the quantile is taken over.
        rif_history_window_s: only probe RIFs received within this window count.
        max_idle_s: with no query for this long, the client probes anyway to keep the pool warm.
        fallback_below: below this many usable probes, the fallback chooses.
        fallback: how the fallback chooses. ``"least_in_flight"`` (default): the backend with the
            fewest of this client's own requests in flight, ties broken at random; ``"random"``: a
            uniformly random backend, the paper's rule. The paper's many clients each see a sliver of
            the traffic and hold ~0 requests per backend, so their tie-break is the paper's random
            choice; a gateway that sees most of the traffic knows the backends' load exactly and
            should use it (measured in docs/benchmarks.md).
        cross_check: check each probe report against what this client knows itself (issue 12, item 8;
            ``PrequalPolicy.on_probe``). A reported RIF below this client's own requests in flight to
            the backend is impossible: the RIF used is the larger of the two. A reported latency below
            ``1 / cross_check_ratio`` of the latency this client measures for the backend (its EWMA of
            successful requests) and more than ``cross_check_slack_s`` below it is a lie or a stale
            estimate: the latency used is raised to ``measured / cross_check_ratio``. A backend that
            reports "idle and instant" while serving slowly then cannot capture the pool. ``False``
            pools reports as they come (the old behaviour).
        cross_check_ratio: K above; > 1. The gateway's measurement adds the network and its own
            queueing to the backend's time, so honest reports sit somewhat below it; 2 leaves them alone
            (docs/simulator.md measures how often it fires on honest fleets).
        cross_check_slack_s: the absolute part of the latency rule: differences up to this are never
            suspect (the gateway's own overhead, and backends too fast for the ratio to mean anything).
        report_max_age_s: how fresh a backend's latest report (piggybacked on a response, or a probe
            answer) must be to answer a probe the sampler draws instead of a probe on the network
            (``core.prequal``: every draw still pools one entry). 0 sends every probe, the paper's rule.
        report_max_queries: a report older than ``report_max_age_s`` still answers draws while this
            pool has routed at most this many queries since it came, it is at most ``max_idle_s`` old,
            and this client is the backends' sole client: no report in the last ``max_age_s`` showed
            load this client did not send (idle rounds use the time bound alone). A sole client sees
            every change of a backend's load: its own requests (counted since the report) and their
            ends (each brings a fresh report), so an old report is still exact, and probing for it on
            a quiet pool buys nothing (at 100 req/s over 4 backends each report is ~40 ms old when a
            draw reads it, and nearly every draw was probed). Other clients (gateway processes or
            workers, ``clients_per_pool``) move the load unseen, and there the time bound alone holds.
            (Known limit: our open WebSockets to a backend count in our requests in flight but not in
            its reported RIF, so that many of another client's requests there go unseen.)
            8 changes nothing above 400 queries per second (8 queries take less than 20 ms there).
            0: the time bound only.
        mode: ``"async"`` (default): each query is routed on the pool and its probes are sent without
            waiting. ``"sync"``: the paper's sync mode (section 4): at each query, ``sync_probes``
            probes go to distinct, uniformly random candidates and the query waits for all but one
            answer (at most ``sync_wait_s``), then HCL chooses among the answers; with fewer than two
            answers in time, the asynchronous choice (the pool, or the fallback) decides. It adds a
            probe round trip to every request (measured in docs/benchmarks.md, "Sync mode").
        sync_probes: ``d``, the probes per query in sync mode (>= 2). 3 (the paper: typically 3 to 5;
            YouTube used 5): the fewest that still leaves a choice between two answers after dropping
            the slowest, the same probe load per query as the asynchronous ``r_probe``; every extra
            probe adds to the wait (the (d-1)-th answer of d comes later) and to a small fleet's share
            of probes (5 of 12 backends per request).
        sync_wait_s: the longest a query waits for its sync answers; it bounds the latency sync mode
            may add. 10 ms: the paper's deployment had a 3 ms probe timeout inside a datacenter; a
            Python gateway on a busy host answers loopback probes in well under 1 ms at its median
            but not at its tail. Answers that come later still feed the pool and the RIF history.
    """

    pool_size: int = 16
    max_age_s: float = 1.0
    probes_per_query: float = 3.0
    removals_per_query: float = 1.0
    drift: float = 1.0
    q_rif: float = DEFAULT_Q_RIF
    max_reuse: int = 2
    rif_history_size: int = 128
    rif_history_window_s: float = 2.0
    max_idle_s: float = 0.5
    fallback_below: int = 2
    fallback: Literal["least_in_flight", "random"] = "least_in_flight"
    cross_check: bool = True
    cross_check_ratio: float = 2.0
    cross_check_slack_s: float = 0.005
    report_max_age_s: float = 0.02
    report_max_queries: int = 8
    mode: Literal["async", "sync"] = "async"
    sync_probes: int = 3
    sync_wait_s: float = 0.01

    @classmethod
    def paper(cls) -> PrequalSettings:
        """The paper's own testbed settings (NSDI '24 sections 4-5; prequal-spec.md section 2).

        m = 16 probes, 1 s max age, r_probe = 3, r_remove = 1, drift 1, Q_RIF = 2**-0.25 (~0.84), and
        below 2 usable probes a uniformly random backend (``fallback="random"``). The other fields (RIF
        history, idle probing) have no value in the paper and keep this library's defaults.

        Reuse cap: the paper has none. The preset keeps the default ``max_reuse=2``: with the paper's
        numbers Eq. 1 gives 2 / ((1 - 16/n) * 3 - 1), 1.316 at the testbed's n = 100, under the cap, so
        the cap changes nothing there. Every probe goes on the network (``report_max_age_s=0``): the paper
        has no piggybacked reports. It binds only for 25 <= n <= 47 (25 uses at n = 25), where an
        unbounded budget herds traffic onto the best probe (docs/simulator.md). For n <= 24 the
        denominator is <= 0 and Eq. 1 has no value; each probe is then used once (``reuse_budget``).
        Pass ``dataclasses.replace(PrequalSettings.paper(), max_reuse=...)`` to lift the cap.
        """
        return cls(
            pool_size=16,
            max_age_s=1.0,
            probes_per_query=3.0,
            removals_per_query=1.0,
            drift=1.0,
            q_rif=2**-0.25,
            max_reuse=2,
            fallback_below=2,
            fallback="random",
            report_max_age_s=0.0,
        )

    def __post_init__(self) -> None:
        check_types(self)  # first: the range checks below compare the values
        checks = (
            ("pool_size", self.pool_size >= 1, "an integer >= 1"),
            ("max_age_s", 0 < self.max_age_s < math.inf, "a finite number > 0"),
            ("probes_per_query", 0 <= self.probes_per_query < math.inf, "a finite number >= 0"),
            ("removals_per_query", 0 <= self.removals_per_query < math.inf, "a finite number >= 0"),
            ("drift", 0 < self.drift < math.inf, "a finite number > 0"),
            ("q_rif", 0.0 <= self.q_rif <= 1.0, "a number in [0, 1]"),
            ("max_reuse", self.max_reuse >= 1, "an integer >= 1"),
            ("rif_history_size", self.rif_history_size >= 1, "an integer >= 1"),
            ("rif_history_window_s", 0 < self.rif_history_window_s < math.inf, "a finite number > 0"),
            ("max_idle_s", 0 < self.max_idle_s < math.inf, "a finite number > 0"),
            ("fallback_below", self.fallback_below >= 1, "an integer >= 1"),
            ("fallback", self.fallback in ("least_in_flight", "random"), "'least_in_flight' or 'random'"),
            ("cross_check_ratio", 1.0 < self.cross_check_ratio < math.inf, "a finite number > 1"),
            ("cross_check_slack_s", 0 <= self.cross_check_slack_s < math.inf, "a finite number >= 0"),
            ("report_max_age_s", 0 <= self.report_max_age_s < math.inf, "a finite number >= 0"),
            ("report_max_queries", self.report_max_queries >= 0, "an integer >= 0"),
            ("mode", self.mode in ("async", "sync"), "'async' or 'sync'"),
            ("sync_probes", self.sync_probes >= 2, "an integer >= 2"),
            ("sync_wait_s", 0 < self.sync_wait_s < math.inf, "a finite number > 0"),
        )
        check_values(self, checks)


@dataclass(frozen=True, kw_only=True, slots=True)
class OutlierSettings:
    """Parameters of passive health checking.

    Parameters:
        consecutive_failures: failures in a row that eject a backend (0 disables ejection).
        base_ejection_s: the first ejection's length; each repeat doubles it.
        max_ejection_s: the longest ejection.
        max_ejected_share: the largest share of members ejected at the same time.
        panic_threshold: below this share of healthy members, route over every member.
        failure_weight: how much one outcome moves the failure rate (an EWMA per event).
        failure_decay_s: time constant with which the failure rate fades without new outcomes.
        averse_above: a backend whose failure rate exceeds this is avoided by Prequal's pool.
        trial_timeout_s: a *suspect* backend (its last outcome a failure, or back from an ejection with
            no success since) takes one request at a time until one succeeds: its trial. Another
            request may go to it only when the trial ends, or after this long (a trial that hangs, such
            as a long stream or a black hole, holds it back no longer). 0 turns trials off.
    """

    consecutive_failures: int = 5
    base_ejection_s: float = 1.0
    max_ejection_s: float = 30.0
    max_ejected_share: float = 0.5
    panic_threshold: float = 0.5
    failure_weight: float = 0.3
    failure_decay_s: float = 1.0
    averse_above: float = 0.5
    trial_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)  # first: the range checks below compare the values
        checks = (
            ("consecutive_failures", self.consecutive_failures >= 0, "an integer >= 0"),
            ("base_ejection_s", 0 < self.base_ejection_s < math.inf, "a finite number > 0"),
            ("max_ejection_s", self.base_ejection_s <= self.max_ejection_s < math.inf, "finite and >= base_ejection_s"),
            ("max_ejected_share", 0.0 <= self.max_ejected_share <= 1.0, "a number in [0, 1]"),
            ("panic_threshold", 0.0 <= self.panic_threshold <= 1.0, "a number in [0, 1]"),
            ("failure_weight", 0.0 < self.failure_weight <= 1.0, "a number in (0, 1]"),
            ("failure_decay_s", 0 < self.failure_decay_s < math.inf, "a finite number > 0"),
            ("averse_above", 0.0 <= self.averse_above <= 1.0, "a number in [0, 1]"),
            ("trial_timeout_s", 0 <= self.trial_timeout_s < math.inf, "a finite number >= 0"),
        )
        check_values(self, checks)


# What a settings field declared with each type accepts.
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "True or False"),
}


def check_types(settings: object) -> None:
    """Raise ``ValueError`` naming the first int, float or bool field of a settings dataclass whose value
    has another type (``True`` is not an integer here, nor a number).

    Run before the range checks: those compare the values, so a string would raise ``TypeError`` naming
    no field, and a float in an int field would pass them. The annotations are read as written (postponed
    annotations: strings); this module and the settings' modules are never compiled.
    """
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        accepted = _FIELD_TYPES.get(str(field.type))
        if accepted is None:
            continue  # Literal and str fields: their own check names the values allowed
        value = getattr(settings, field.name)
        kinds, expected = accepted
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"{field.name} must be {expected}, got {value!r}")


def check_values(settings: object, checks: tuple[tuple[str, bool, str], ...]) -> None:
    """Raise ``ValueError`` naming the first field whose check failed."""
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {getattr(settings, name)!r}")

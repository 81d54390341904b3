"""Piggybacked load reports in Prequal (``PrequalPolicy.on_report``, ``PrequalSettings.report_max_age_s``).

The rules: a report never enters the pool or the RIF history by itself; the sampler still draws
``r_probe`` uniformly random distinct candidates per query and every draw pools one entry; a drawn
backend with a fresh report is pooled from it (its RIF plus our sends since) instead of probed; one
with a probe still in flight is not probed again; ``report_max_age_s=0`` probes every draw (the
paper's rule).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from prequal_middleware.core import Member, Outcome, PrequalPolicy, PrequalSettings
from prequal_middleware.core.prequal import PROBE_PENDING_S


def make(n: int = 4, seed: int = 3, rng: random.Random | None = None, **settings: Any) -> PrequalPolicy:
    policy = PrequalPolicy(PrequalSettings(**settings), rng=rng or random.Random(seed))
    policy.set_members([Member(f"b{i}") for i in range(n)], now=0.0)
    return policy


class DrawLog(random.Random):
    """A generator that records every draw the sampler makes: the population and the targets drawn.

    Its ``_randbelow`` (the same draws) is its own, so ``core.probe_pool.sample`` hands each draw to
    ``self.sample`` rather than drawing inline: the log sees every draw whether the core is compiled
    or not (a compiled caller would not see a patched module function).
    """

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[tuple[list[str], list[str]]] = []

    def _randbelow(self, n: int) -> int:
        return super()._randbelow(n)  # type: ignore[misc,no-any-return]

    def sample(self, population: Sequence[Any], k: int, *, counts: Any = None) -> list[Any]:
        drawn = super().sample(population, k, counts=counts)
        self.draws.append((list(population), list(drawn)))
        return drawn


def test_a_report_alone_enters_neither_the_pool_nor_the_rif_history() -> None:
    policy = make(probes_per_query=0)
    for t in range(20):
        policy.on_report("b1", 0.1 + t * 0.001, 0, 0.001)
    assert len(policy.pool) == 0
    assert policy.pool.history.threshold(0.5, 0.2) == float("inf"), "no RIF sample"


def test_a_drawn_backend_with_a_fresh_report_is_pooled_from_it_once_not_probed() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.05, report_max_queries=0)
    policy.on_report("b0", 1.0, 3, 0.007)
    policy.on_report("b1", 1.0, 5, 0.009)
    selection = policy.select(1.01)
    assert selection is not None
    assert selection.probes == (), "both draws were answered by their reports"
    assert policy.probes_from_reports == 2
    pooled = {e.backend: (e.rif, e.latency_s, e.received_at) for e in policy.pool}
    assert pooled["b0"][1:] == (0.007, 1.01) and pooled["b1"][1:] == (0.009, 1.01)
    # Still fresh, already pooled: they answer the next draws again, with our sends since added.
    sent_to = selection.backend
    policy.on_start(sent_to, 1.01)
    selection = policy.select(1.02)
    assert selection is not None and selection.probes == ()
    assert policy.probes_from_reports == 2 and policy.probes_reused == 2
    entry = policy.pool.get(sent_to)
    assert entry is not None and entry.rif == {"b0": 3, "b1": 5}[sent_to] + 1, "the request sent since counts"
    # Past the bound, the draws go on the network.
    selection = policy.select(1.0 + 0.051)
    assert selection is not None and sorted(selection.probes) == ["b0", "b1"]


def test_a_stale_report_leaves_the_draw_to_a_real_probe() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.05, report_max_queries=0)
    policy.on_report("b0", 1.0, 0, 0.001)
    selection = policy.select(1.051)
    assert selection is not None
    assert sorted(selection.probes) == ["b0", "b1"]
    assert policy.probes_from_reports == 0


def test_a_report_past_its_age_answers_while_few_queries_came_since() -> None:
    """``report_max_queries``: a quiet pool keeps using a report no query since could have outdated."""
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.02, report_max_queries=3, max_idle_s=0.5)
    policy.on_start("b0", 0.99)
    policy.on_start("b0", 0.99)
    policy.on_report("b0", 1.0, 1, 0.004)  # one of ours besides the one answered: nobody else's load
    policy.on_report("b1", 1.0, 0, 0.003)
    for k in range(3):  # queries 1, 2 and 3 since the reports, each 100 ms apart: far past 20 ms
        selection = policy.select(1.1 + 0.1 * k)
        assert selection is not None and selection.probes == (), f"query {k + 1} since the reports probed"
    assert policy.probes_from_reports == 2 and policy.probes_reused == 4
    fourth = policy.select(1.4)
    assert fourth is not None and sorted(fourth.probes) == ["b0", "b1"], "the 4th query since is past the bound"


def test_a_report_is_counted_in_queries_from_when_it_came() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.02, report_max_queries=2, max_idle_s=0.5)
    policy.on_report("b0", 0.4, 0, 0.001)  # earlier reports, replaced in place below
    policy.on_report("b1", 0.4, 0, 0.001)
    for k in range(5):  # queries before the reports do not age them
        policy.select(0.5 + 0.01 * k)
    for b in ("b0", "b1"):
        policy.on_probe(b, 0.6, 0, 0.001)  # the draws above left probes in flight: answered
    policy.on_report("b0", 1.0, 0, 0.001)
    policy.on_report("b1", 1.0, 0, 0.001)
    assert [policy.select(t).probes for t in (1.1, 1.2)] == [(), ()]  # type: ignore[union-attr]
    third = policy.select(1.3)
    assert third is not None and sorted(third.probes) == ["b0", "b1"]


def test_the_query_bound_holds_only_while_no_report_shows_another_clients_load() -> None:
    """Another client moves the backends' load without telling us: then reports last ``report_max_age_s``."""
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.02, report_max_queries=8, max_age_s=1.0)
    policy.on_report("b0", 1.0, 0, 0.001)
    policy.on_report("b1", 1.0, 0, 0.001)
    assert policy.select(1.1).probes == ()  # type: ignore[union-attr]
    policy.on_start("b1", 1.1)
    policy.on_report("b1", 1.19, 1, 0.001)  # 1 besides the one answered, and we have no other there
    shared = policy.select(1.2)
    assert shared is not None and shared.probes == ("b0",), "b0's report is 200 ms old: probed"
    policy.on_probe("b0", 1.201, 0, 0.001)
    policy.on_report("b1", 1.201, 0, 0.001)
    assert sorted(policy.select(1.3).probes) == ["b0", "b1"]  # type: ignore[union-attr]
    for b in ("b0", "b1"):
        policy.on_probe(b, 1.8, 0, 0.001)
    assert sorted(policy.select(1.85).probes) == ["b0", "b1"], "still within max_age_s of it"  # type: ignore[union-attr]
    for b in ("b0", "b1"):
        policy.on_probe(b, 1.86, 0, 0.001)
    later = policy.select(2.2)  # 1.01 s after the foreign load; the answers are 340 ms old, 1 query ago
    assert later is not None and later.probes == (), "the query bound is back"


def test_a_probe_answer_beyond_our_requests_in_flight_is_another_clients_load() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.02, report_max_queries=8, max_age_s=1.0)
    policy.on_start("b0", 0.9)
    policy.on_probe("b0", 1.0, 1, 0.001)  # ours alone
    policy.on_probe("b1", 1.0, 0, 0.001)
    assert policy.select(1.1).probes == ()  # type: ignore[union-attr]
    policy.on_probe("b1", 1.1, 1, 0.001)  # nothing of ours there
    assert sorted(policy.select(1.2).probes) == ["b0", "b1"]  # type: ignore[union-attr]


def test_the_query_bound_never_outlasts_max_idle() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.02, report_max_queries=100, max_idle_s=0.3)
    policy.on_report("b0", 1.0, 0, 0.001)
    policy.on_report("b1", 1.0, 0, 0.001)
    within = policy.select(1.29)
    assert within is not None and within.probes == ()
    past = policy.select(1.301)
    assert past is not None and sorted(past.probes) == ["b0", "b1"], "older than max_idle_s: probed"


def test_an_idle_round_reads_reports_by_age_only() -> None:
    """No query for ``max_idle_s``: a report is that old whatever the query count says, so it is probed."""
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.02, report_max_queries=8, max_idle_s=0.2)
    first = policy.select(1.0)
    assert first is not None
    for b in first.probes:
        policy.on_probe(b, 1.05, 0, 0.001)  # answers: the latest report of each, no query since
    assert policy.idle_probes(1.1) == (), "not idle yet"
    assert sorted(policy.idle_probes(1.21)) == ["b0", "b1"], "160 ms old, past report_max_age_s: probed"


def test_report_max_queries_default_and_bounds() -> None:
    assert PrequalSettings().report_max_queries == 8
    with pytest.raises(ValueError, match="report_max_queries"):
        PrequalSettings(report_max_queries=-1)
    with pytest.raises(ValueError, match="report_max_queries must be an integer"):
        PrequalSettings(report_max_queries=1.5)  # type: ignore[arg-type]


def test_a_backend_with_a_probe_in_flight_is_not_probed_again_until_it_answers_or_is_lost() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.0)
    first = policy.select(1.0)
    assert first is not None and sorted(first.probes) == ["b0", "b1"]
    again = policy.select(1.01)
    assert again is not None and again.probes == ()
    assert policy.probes_pending == 2
    policy.on_probe("b0", 1.02, 1, 0.002)
    policy.on_probe_failure("b1", 1.02)
    after = policy.select(1.03)
    assert after is not None and sorted(after.probes) == ["b0", "b1"], "answered and failed probes clear the mark"
    lost = policy.select(1.03 + PROBE_PENDING_S)
    assert lost is not None and sorted(lost.probes) == ["b0", "b1"], "a probe never heard of again is given up on"


def test_report_max_age_zero_probes_every_draw_the_papers_rule() -> None:
    policy = make(n=3, probes_per_query=3, report_max_age_s=0.0)
    for b in ("b0", "b1", "b2"):
        policy.on_report(b, 1.0, 0, 0.001)
    selection = policy.select(1.0)
    assert selection is not None and sorted(selection.probes) == ["b0", "b1", "b2"]
    assert policy.probes_from_reports == 0
    assert PrequalSettings.paper().report_max_age_s == 0.0


def test_the_sample_stays_uniform_and_every_draw_is_accounted_for() -> None:
    """Reports change where a drawn value comes from, never which backends are drawn."""
    log = DrawLog(11)
    policy = make(n=5, rng=log, probes_per_query=2, report_max_age_s=0.05)
    sent = 0
    now = 1.0
    for _ in range(4000):
        now += 0.001
        selection = policy.select(now)
        assert selection is not None
        sent += len(selection.probes)
        policy.on_start(selection.backend, now)
        for target in selection.probes:  # every probe answers at once
            policy.on_probe(target, now, 1, 0.002)
        policy.on_report(selection.backend, now, 1, 0.002)  # the chosen backend piggybacks on its answer
        policy.on_finish(selection.backend, now, 0.002, Outcome.SUCCESS)
    assert all(sorted(pop) == [f"b{i}" for i in range(5)] and len(drawn) == 2 for pop, drawn in log.draws)
    counts = Counter(b for _, drawn in log.draws for b in drawn)
    expected = len(log.draws) * 2 / 5
    assert all(abs(c - expected) < 0.08 * expected for c in counts.values()), counts
    assert sent + policy.probes_from_reports + policy.probes_reused + policy.probes_pending == 2 * len(log.draws)
    assert policy.probes_from_reports > 0 and sent < 2 * len(log.draws), "reports saved probes"


def test_the_cross_check_floor_leaves_out_the_request_the_report_answers() -> None:
    policy = make(n=2, probes_per_query=1, report_max_age_s=1.0)
    for _ in range(3):
        policy.on_start("b0", 1.0)
    policy.on_report("b0", 1.0, 2, 0.001)  # honest: 3 in flight of ours, the one answered left out
    assert policy.rif_corrections == 0
    policy.on_report("b0", 1.0, 1, 0.001)  # impossible: at least 2 others of ours are there
    assert policy.rif_corrections == 1
    assert policy._reports["b0"].rif == 2


def test_a_failure_forgets_the_backends_report() -> None:
    policy = make(n=2, probes_per_query=2, report_max_age_s=1.0)
    policy.on_report("b0", 1.0, 0, 0.0)
    policy.on_start("b0", 1.0)
    policy.on_finish("b0", 1.0, 0.001, Outcome.FAILURE)
    selection = policy.select(1.01)
    assert selection is not None and "b0" in selection.probes, "a fast failer's report answers nothing"

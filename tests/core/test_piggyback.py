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
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.05)
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
    policy = make(n=2, probes_per_query=2, report_max_age_s=0.05)
    policy.on_report("b0", 1.0, 0, 0.001)
    selection = policy.select(1.051)
    assert selection is not None
    assert sorted(selection.probes) == ["b0", "b1"]
    assert policy.probes_from_reports == 0


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

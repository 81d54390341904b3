"""The probe pool, rule by rule (prequal-spec.md sections 2-3), with a seeded RNG and explicit times."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from prequal_middleware.core import FractionalRate, PrequalSettings, ProbePool, RifHistory, reuse_budget
from prequal_middleware.core.probe_pool import randomized_round, sample


def make_pool(seed: int = 1, **settings: float) -> ProbePool:
    return ProbePool(PrequalSettings(**settings), random.Random(seed))  # type: ignore[arg-type]


# --- inflow: replacement, eviction, expiry ---------------------------------------------------


def test_newer_probe_replaces_the_backends_older_entry() -> None:
    pool = make_pool()
    pool.add("a", rif=5, latency_s=0.5, now=1.0, n_available=10)
    pool.add("b", rif=1, latency_s=0.1, now=1.1, n_available=10)
    pool.add("a", rif=2, latency_s=0.2, now=1.2, n_available=10)
    assert len(pool) == 2, "one entry per backend"
    entry = pool.get("a")
    assert entry is not None and (entry.rif, entry.latency_s, entry.received_at) == (2, 0.2, 1.2)
    assert [e.backend for e in pool] == ["b", "a"], "the replacement is the newest entry"


def test_oldest_is_evicted_beyond_pool_size() -> None:
    pool = make_pool(pool_size=3)
    for i, backend in enumerate("abcd"):
        pool.add(backend, rif=0, latency_s=0.01, now=float(i), n_available=10)
    assert [e.backend for e in pool] == ["b", "c", "d"]


def test_entries_expire_by_local_receipt_time() -> None:
    pool = make_pool(max_age_s=1.0)
    pool.add("a", rif=0, latency_s=0.01, now=10.0, n_available=10)
    pool.add("b", rif=0, latency_s=0.01, now=10.5, n_available=10)
    pool.expire(11.0)
    assert [e.backend for e in pool] == ["a", "b"], "exactly max_age old is still usable"
    pool.expire(11.2)
    assert [e.backend for e in pool] == ["b"]
    pool.expire(11.6)
    assert len(pool) == 0


def test_retain_drops_members_that_left() -> None:
    pool = make_pool()
    for backend in "abc":
        pool.add(backend, rif=0, latency_s=0.01, now=1.0, n_available=3)
    pool.retain({"a", "c"})
    assert sorted(e.backend for e in pool) == ["a", "c"]


# --- reuse budget (Eq. 1) --------------------------------------------------------------------


def test_reuse_budget_matches_the_papers_worked_example() -> None:
    assert reuse_budget(16, 100, 3.0, 1.0, 1.0, max_reuse=16) == pytest.approx(2 / 1.52)
    assert reuse_budget(16, 100, 3.0, 1.0, 1.0, max_reuse=16) == pytest.approx(1.316, abs=1e-3)


def test_reuse_budget_probe_rate_sweep_values() -> None:
    # Section 5.3's sweep uses r_remove = 0.25: b is 1 at r_probe 4, ~3.4 at 1 and ~11.8 at 1/2.
    assert reuse_budget(16, 100, 4.0, 0.25, 1.0, max_reuse=100) == 1.0
    assert reuse_budget(16, 100, 1.0, 0.25, 1.0, max_reuse=100) == pytest.approx(2 / 0.59)
    assert reuse_budget(16, 100, 0.5, 0.25, 1.0, max_reuse=100) == pytest.approx(2 / 0.17)


@pytest.mark.parametrize(
    ("m", "n", "r_probe"), [(16, 16, 3.0), (16, 4, 3.0), (16, 1, 3.0), (16, 0, 3.0), (4, 100, 0.5)]
)
def test_reuse_budget_is_one_when_eq1_is_undefined(m: int, n: int, r_probe: float) -> None:
    # (1 - m/n) * r_probe - r_remove <= 0: no finite budget keeps the pool full; use each probe once.
    assert reuse_budget(m, n, r_probe, 1.0, 1.0, max_reuse=7) == 1.0


def test_default_reuse_budget_by_fleet_size() -> None:
    # What reuse_budget's docstring and docs/simulator.md state (issue 15, section 3): with the default
    # settings Eq. 1 has no value up to 24 backends (budget 1), hits the cap from 25 to 48, and is its own
    # value in (1, 2) from 49.
    s = PrequalSettings()

    def budget(n: int) -> float:
        return reuse_budget(s.pool_size, n, s.probes_per_query, s.removals_per_query, s.drift, s.max_reuse)

    assert [n for n in range(1, 200) if budget(n) == 1.0] == list(range(1, 25))
    assert [n for n in range(1, 200) if budget(n) == 2.0] == list(range(25, 49))
    assert all(1.0 < budget(n) < 2.0 for n in range(49, 200))
    assert budget(100) == pytest.approx(2 / 1.52)


def test_reuse_budget_is_capped_when_the_denominator_is_tiny() -> None:
    # (1 - 16/25) * 3 - 1 = 0.08: Eq. 1 gives 25 uses, the cap holds it at max_reuse.
    assert reuse_budget(16, 25, 3.0, 1.0, 1.0, max_reuse=2) == 2.0
    assert reuse_budget(16, 25, 3.0, 1.0, 1.0, max_reuse=100) == pytest.approx(25.0)


def test_randomized_rounding_preserves_the_expectation() -> None:
    rng = random.Random(3)
    draws = [randomized_round(1.316, rng) for _ in range(20_000)]
    assert set(draws) == {1, 2}
    assert sum(draws) / len(draws) == pytest.approx(1.316, abs=0.01)


def test_pooled_entries_get_the_rounded_budget() -> None:
    pool = make_pool(seed=5, max_reuse=16)
    uses = Counter(pool.add(f"b{i}", 0, 0.01, now=0.0, n_available=100).uses_left for i in range(4000))
    assert set(uses) == {1, 2}
    assert uses[2] / 4000 == pytest.approx(0.316, abs=0.02)


def test_small_fleet_entries_are_used_once() -> None:
    pool = make_pool(max_reuse=5)
    entry = pool.add("a", 0, 0.01, now=0.0, n_available=4)
    assert entry.uses_left == 1


# --- HCL selection ---------------------------------------------------------------------------


def fill(pool: ProbePool, probes: dict[str, tuple[int, float]], now: float = 0.0, n: int = 100) -> None:
    for backend, (rif, latency) in probes.items():
        pool.add(backend, rif, latency, now=now, n_available=n)


def test_cold_branch_picks_the_lowest_latency_cold_probe() -> None:
    pool = make_pool(q_rif=0.5, max_reuse=16)
    # History of RIFs [1, 2, 8, 9]: theta = sorted[floor(0.5 * 3)] = 2. a and b are cold.
    fill(pool, {"a": (1, 0.050), "b": (2, 0.020), "c": (8, 0.001), "d": (9, 0.002)})
    assert pool.threshold(0.0) == 2.0
    assert pool.choose(0.0) == ("b", "cold"), "c and d are faster but hot"


def test_hot_branch_picks_the_lowest_rif_when_every_probe_is_hot() -> None:
    pool = make_pool(q_rif=0.5)
    # History is fed separately from the pool: many low RIFs make theta low, the pool holds high ones.
    for _ in range(10):
        pool.history.add(0, now=0.0)
    fill(pool, {"a": (7, 0.001), "b": (4, 0.090), "c": (5, 0.010)})
    assert pool.threshold(0.0) == 0.0
    assert pool.choose(0.0) == ("b", "hot")


def test_hot_means_strictly_above_the_threshold() -> None:
    pool = make_pool(q_rif=0.5)
    fill(pool, {"a": (3, 0.050), "b": (3, 0.040), "c": (3, 0.030)})
    assert pool.threshold(0.0) == 3.0
    backend, reason = pool.choose(0.0) or ("", "")
    assert (backend, reason) == ("c", "cold"), "RIF equal to theta is cold"


def test_q_one_is_latency_only() -> None:
    pool = make_pool(q_rif=1.0)
    fill(pool, {"a": (50, 0.001), "b": (0, 0.100), "c": (1, 0.050)})
    assert pool.threshold(0.0) == math.inf
    assert pool.choose(0.0) == ("a", "cold")


def test_q_zero_is_rif_only() -> None:
    pool = make_pool(q_rif=0.0)
    fill(pool, {"a": (6, 0.001), "b": (2, 0.100), "c": (3, 0.002)})
    # theta = the lowest recent RIF (2): only b is cold; the hot ones lose whatever their latency.
    assert pool.threshold(0.0) == 2.0
    assert pool.choose(0.0) == ("b", "cold")


def test_quantile_index_edges() -> None:
    history = RifHistory(size=128, window_s=10.0)
    for rif in [4, 1, 3, 2, 5]:  # sorted: 1 2 3 4 5
        history.add(rif, now=0.0)
    assert history.threshold(0.0, 0.0) == 1.0
    assert history.threshold(0.84, 0.0) == 4.0  # floor(0.84 * 4) = 3
    assert history.threshold(0.99, 0.0) == 4.0  # floor(3.96) = 3: the max is hot at 0.99 (paper 5.3)
    assert history.threshold(1.0, 0.0) == math.inf


def test_history_is_bounded_in_count_and_time() -> None:
    history = RifHistory(size=3, window_s=1.0)
    for i, rif in enumerate([100, 1, 2, 3]):
        history.add(rif, now=i * 0.1)
    assert len(history) == 3 and history.threshold(1.0 - 1e-9, 0.3) == 2.0, "100 fell out of the ring"
    history.add(50, now=2.0)
    assert history.threshold(0.0, 2.0) == 50.0, "only fresh samples count"
    assert len(history) == 1


def test_empty_history_makes_everything_cold() -> None:
    history = RifHistory(size=8, window_s=1.0)
    assert history.threshold(0.5, 0.0) == math.inf


def test_cold_ties_break_by_rif_then_at_random() -> None:
    picks: Counter[str] = Counter()
    for seed in range(400):
        p = make_pool(seed=seed, q_rif=1.0)
        fill(p, {"a": (3, 0.010), "b": (1, 0.010), "c": (1, 0.010), "d": (0, 0.020)})
        choice = p.choose(0.0)
        assert choice is not None
        picks[choice[0]] += 1
    assert set(picks) == {"b", "c"}, "a has a higher RIF, d a higher latency"
    assert 0.4 < picks["b"] / 400 < 0.6, f"ties must be broken evenly, got {picks}"


def test_hot_ties_break_by_latency() -> None:
    pool = make_pool(q_rif=0.0)
    for _ in range(5):
        pool.history.add(0, now=0.0)
    fill(pool, {"a": (4, 0.030), "b": (4, 0.010), "c": (6, 0.001)})
    assert pool.choose(0.0) == ("b", "hot")


def test_fallback_below_two_entries() -> None:
    pool = make_pool()
    assert pool.choose(0.0) is None
    fill(pool, {"a": (0, 0.01)})
    assert pool.choose(0.0) is None, "one entry is not enough for HCL"
    fill(pool, {"b": (0, 0.01)})
    assert pool.choose(0.0) is not None


def test_excluded_backends_are_not_usable() -> None:
    pool = make_pool(q_rif=1.0)
    fill(pool, {"a": (0, 0.001), "b": (0, 0.010), "c": (0, 0.020)})
    assert pool.choose(0.0, exclude={"a"}) == ("b", "cold")
    assert pool.choose(0.0, exclude={"a", "b"}) is None, "one usable entry left: fallback"


# --- use: compensation and reuse --------------------------------------------------------------


def test_use_compensates_rif_and_spends_the_reuse_budget() -> None:
    pool = make_pool(q_rif=1.0, pool_size=2, max_reuse=2)
    fill(pool, {"a": (0, 0.001), "b": (0, 0.010)}, n=100)  # Eq. 1: 2 / (0.98 * 3 - 1) = 1.03, so 1 or 2
    for entry in pool:
        entry.uses_left = 2  # pin the randomly rounded budget
    assert pool.choose(0.0) == ("a", "cold")
    entry = pool.get("a")
    assert entry is not None and entry.rif == 1 and entry.uses_left == 1
    assert pool.choose(0.0) == ("a", "cold")
    assert "a" not in pool, "budget spent: the probe leaves the pool"


def test_compensation_moves_a_backend_to_hot() -> None:
    pool = make_pool(q_rif=0.5, max_reuse=16)
    fill(pool, {"a": (1, 0.001), "b": (1, 0.010), "c": (2, 0.020)})  # theta = sorted[1] = 1
    assert pool.choose(0.0) == ("a", "cold")  # a's RIF becomes 2 > theta: hot
    assert pool.choose(0.0) == ("b", "cold")


# --- removal per query -------------------------------------------------------------------------


def test_removals_alternate_oldest_and_worst() -> None:
    pool = make_pool(q_rif=1.0, removals_per_query=1.0)
    pool.add("old", 0, 0.010, now=0.0, n_available=100)
    pool.add("slow", 0, 0.900, now=0.1, n_available=100)
    pool.add("mid", 0, 0.050, now=0.2, n_available=100)
    pool.add("new", 0, 0.020, now=0.3, n_available=100)
    assert pool.remove_per_query(0.3) == ["old"], "first the oldest"
    assert pool.remove_per_query(0.3) == ["slow"], "then the worst: no probe is hot, highest latency"
    assert pool.remove_per_query(0.3) == ["mid"], "then the oldest again"


def test_worst_is_the_highest_rif_hot_probe_when_any_is_hot() -> None:
    pool = make_pool(q_rif=0.5, removals_per_query=1.0)
    pool.remove_per_query(0.0)  # empty pool: nothing removed, and the rule does not advance
    fill(pool, {"a": (1, 0.9), "b": (9, 0.001), "c": (5, 0.002), "d": (0, 0.5)})
    assert pool.remove_per_query(0.0) == ["a"]  # oldest
    assert pool.threshold(0.0) == 1.0
    assert pool.remove_per_query(0.0) == ["b"], "hot with the highest RIF, not the slowest"


def test_fractional_removals_are_deterministic() -> None:
    pool = make_pool(removals_per_query=0.25, pool_size=64)
    fill(pool, {f"b{i}": (0, 0.01) for i in range(40)})
    removed = [len(pool.remove_per_query(0.0)) for _ in range(40)]
    assert removed == [0, 0, 0, 1] * 10


# --- probe rate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [3.0, 1.0, 0.5, 1 / math.sqrt(2), 2 * math.sqrt(2), 0.1])
def test_fractional_probe_rates_are_exact_over_many_queries(rate: float) -> None:
    fr = FractionalRate()
    counts = [fr.take(rate) for _ in range(10_000)]
    assert abs(sum(counts) - rate * 10_000) <= 1, "deterministic rounding loses at most one probe"
    assert set(counts) <= {math.floor(rate), math.ceil(rate)}, "each query rounds down or up"


def test_probe_rate_of_a_half_alternates() -> None:
    pool = make_pool(probes_per_query=0.5)
    assert [pool.probes_for_query() for _ in range(6)] == [0, 1, 0, 1, 0, 1]


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pool_size", 0),
        ("max_age_s", 0.0),
        ("probes_per_query", -1.0),
        ("q_rif", 1.5),
        ("drift", 0.0),
        ("max_reuse", 0),
        ("max_idle_s", math.inf),
        ("fallback_below", 0),
        ("fallback", "least_latency"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: float | str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        PrequalSettings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 20, 21, 22, 100])
def test_sample_draws_exactly_what_random_sample_draws(n: int) -> None:
    """The sampler's own ``sample`` is ``Random.sample``, draw for draw: seeded runs reproduce."""
    population = [f"b{i}" for i in range(n)]
    for seed in range(30):
        for k in range(min(n, 7) + 1):
            for kind in (random.Random, _OwnRandom):
                ours, theirs = kind(seed), kind(seed)
                assert sample(ours, population, k) == theirs.sample(population, k)
                assert ours.getstate() == theirs.getstate(), "the same number of draws"


class _OwnRandom(random.Random):
    """A generator with its own ``random()`` and no ``getrandbits``: Random draws indices another way."""

    def random(self) -> float:
        return super().random()


def test_the_threshold_follows_every_sample_even_at_the_same_instant() -> None:
    """A query asks for the threshold twice at one time; a sample in between must still count."""
    pool = ProbePool(PrequalSettings(q_rif=0.5), random.Random(1))
    pool.add("a", rif=1, latency_s=0.01, now=5.0, n_available=4)
    assert pool.threshold(5.0) == 1.0
    pool.add("b", rif=9, latency_s=0.01, now=5.0, n_available=4)
    pool.add("c", rif=9, latency_s=0.01, now=5.0, n_available=4)
    assert pool.threshold(5.0) == 9.0, "the pool's samples, not the value before them"
    history = RifHistory(size=2, window_s=10.0)
    history.add(3, 5.0)
    assert history.threshold(0.0, 5.0) == 3.0
    history.add(7, 5.0)
    history.add(8, 5.0)  # the 3 leaves: the history holds 2
    assert history.threshold(0.0, 5.0) == 7.0


@pytest.mark.parametrize("seed", range(4))
def test_the_threshold_equals_a_sort_of_the_fresh_samples(seed: int) -> None:
    """The history keeps its samples sorted as they come and go (``bisect`` in plain Python, a loop of
    its own where compiled): every threshold must be what sorting the fresh samples gives, through
    duplicates, evictions by count and by age, and values up to the reported maximum."""
    rng = random.Random(seed)
    size, window = rng.choice([(1, 0.5), (7, 0.3), (128, 2.0)])
    history = RifHistory(size=size, window_s=window)
    kept: list[tuple[float, int]] = []
    now = 0.0
    for _ in range(3000):
        now += rng.expovariate(100.0)
        rif = rng.choice([rng.randrange(4), rng.randrange(40), rng.randrange(1_000_001)])
        history.add(rif, now)
        kept = [*kept[-(size - 1) :], (now, rif)] if size > 1 else [(now, rif)]
        if rng.random() < 0.3:
            asked = now + rng.choice([0.0, window / 2, window * 1.5])
            q = rng.choice([0.0, 0.25, 0.6, 0.999])
            fresh = sorted(r for t, r in kept if t >= asked - window)
            expected = float(fresh[int(q * (len(fresh) - 1))]) if fresh else math.inf
            assert history.threshold(q, asked) == expected
            kept = [(t, r) for t, r in kept if t >= asked - window]
            now = max(now, asked)


@pytest.mark.parametrize("order", ["low first", "low last"])
def test_the_second_key_decides_between_equal_first_keys(order: str) -> None:
    """Cold: (latency, RIF); hot: (RIF, latency). An entry equal on the first key and worse on the
    second is neither chosen nor a tie, whichever came first, for any seed."""
    cold = {"low": (1, 0.010), "high": (3, 0.010)}  # equal latency: the lower RIF wins
    hot = {"low": (4, 0.010), "high": (4, 0.030)}  # equal RIF: the lower latency wins
    for seed in range(40):
        for entries, q_rif, reason in ((cold, 1.0, "cold"), (hot, 0.0, "hot")):
            pool = make_pool(seed=seed, q_rif=q_rif)
            pool.history.add(0, now=0.0)
            fill(pool, entries if order == "low first" else dict(reversed(list(entries.items()))))
            assert pool.choose(0.0) == ("low", reason)


@pytest.mark.parametrize("order", ["high first", "high last"])
def test_the_worst_is_decided_by_the_second_key_between_equal_first_keys(order: str) -> None:
    """The removal's worst mirrors the choice: among cold entries of equal latency the higher RIF, among
    hot entries of equal RIF the higher latency."""
    cold = {"first": (0, 0.5), "low": (1, 0.010), "high": (3, 0.010)}
    hot = {"first": (0, 0.5), "low": (9, 0.010), "high": (9, 0.030)}
    for entries, q_rif in ((cold, 1.0), (hot, 0.0)):
        pool = make_pool(q_rif=q_rif, removals_per_query=1.0)
        later = {k: v for k, v in entries.items() if k != "first"}
        if order == "high first":
            later = dict(reversed(list(later.items())))
        fill(pool, {"first": entries["first"], **later})
        if q_rif == 0.0:
            pool.history.add(0, now=0.0)  # theta 0: "low" and "high" are hot, "first" (RIF 0) is not
        assert pool.remove_per_query(0.0) == ["first"], "the oldest first"
        assert pool.remove_per_query(0.0) == ["high"]

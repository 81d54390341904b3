"""``benchmarks.scale`` through its real entry point, and the fallback's filter it led to.

The benchmark's figures are not asserted (performance is measured, not tested): only that a quick run
has every configuration and sane values. The fallback's ``_trusted`` skips its scans of the members
while none has failed or missed a probe; its choices must stay exactly those of the full filter.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from prequal_middleware.core import Member, Outcome, OutlierDetector, PrequalPolicy
from prequal_middleware.core.policy import BasePolicy
from tools import build_core

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_has_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--quick", "--json", str(out)],
        cwd=REPO,
        check=True,
        timeout=300,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    assert result["meta"]["core_compiled"] == sorted(build_core.compiled_in_tree())
    s = result["settings"]
    policies, sizes, prefixes = s["policies"], s["sizes"], s["prefixes"]
    assert set(policies) == {"prequal", "round_robin"} and sizes == [2, 10, 100, 1000] and prefixes == [1, 10, 100]
    seen = {(g["policy"], g["series"], g["pools"], g["members_per_pool"]) for g in result["gateway"]}
    want = {(p, "members", 1, n) for p in policies for n in sizes}
    want |= {(p, "prefixes", k, s["members_per_prefix"]) for p in policies for k in prefixes}
    assert seen == want
    for g in result["gateway"]:
        assert g["errors"] == 0
        cpu = g["cpu_us_per_request"]
        assert 0 < cpu["min"] <= cpu["median"] <= cpu["max"] and len(cpu["rounds"]) == s["rounds"]
        # At most ceil(r_probe) = 3 probes per request; round robin sends none.
        assert 0 <= g["probes_per_request"] <= 3.0
        if g["policy"] == "round_robin":
            assert g["probes_per_request"] == 0
        assert all(v > 0 for v in g["loops_us_per_call"].values())
    ops = {(x["policy"], x["members"], x["op"]) for x in result["sansio"]}
    names = ("cycle", "fallback", "on_probe", "join_leave", "health_flip", "set_members")
    assert ops == {(p, n, op) for p in policies for n in sizes for op in names}
    assert all(x["us"]["median"] > 0 for x in result["sansio"])
    assert {(m["policy"], m["members"]) for m in result["memory"]} == {(p, n) for p in policies for n in sizes}
    assert all(0 < m["build_bytes"] <= m["after_traffic_bytes"] for m in result["memory"])
    for policy in policies:
        assert result["memory_per_member"][policy]["build_bytes"] > 0
        assert result["goal"][policy]["ratio_1000_vs_2"] > 0


def _reference_trusted(policy: BasePolicy, candidates: list[str], now: float) -> list[str]:
    """The fallback's filter as it was: every candidate asked both questions."""
    good = [c for c in candidates if not policy.outliers.is_averse(c, now)]
    answering = [c for c in good if policy._backends[c].probe_failures == 0]
    return answering or good or candidates


def test_trusted_matches_the_full_filter_under_random_events() -> None:
    rng = random.Random(5)
    for trial in range(40):
        urls = [f"http://b{i}:80" for i in range(rng.randint(1, 12))]
        policy = PrequalPolicy(rng=random.Random(trial))
        now = 100.0
        policy.set_members([Member(u) for u in urls], now)
        for _ in range(200):
            now += rng.choice((0.001, 0.05, 0.5, 3.0))
            url = rng.choice(urls)
            event = rng.randrange(6)
            if event == 0:
                policy.on_probe_failure(url, now)
            elif event == 1:
                policy.on_probe(url, now, rng.randint(0, 5), 0.01)
            elif event == 2:
                policy.on_start(url, now)
                policy.on_finish(url, now, 0.01, Outcome.FAILURE)
            elif event == 3:
                policy.on_start(url, now)
                policy.on_finish(url, now, 0.01, Outcome.SUCCESS)
            elif event == 4:
                policy.remove_member(url, now)
                policy.upsert_member(Member(url), now)
            candidates = list(policy.candidates(now))
            if candidates:
                assert list(policy._trusted(candidates, now)) == _reference_trusted(policy, candidates, now)


def test_trusted_asks_no_member_while_none_failed_or_missed_a_probe() -> None:
    urls = [f"http://b{i}:80" for i in range(1000)]
    asked: list[str] = []

    class Counting(OutlierDetector):  # a subclass, not a patched method: the core may be compiled
        def is_averse(self, backend: str, now: float) -> bool:
            asked.append(backend)
            return super().is_averse(backend, now)

    policy = PrequalPolicy(rng=random.Random(1))
    policy.outliers = Counting(policy.outliers.settings)
    policy.set_members([Member(u) for u in urls], 0.0)
    candidates = list(policy.candidates(1.0))
    assert list(policy._trusted(candidates, 1.0)) == candidates and asked == []
    # One missed probe: that member is left out, and the others are still not asked about failures.
    policy.on_probe_failure(urls[3], 1.0)
    asked.clear()
    assert list(policy._trusted(candidates, 1.0)) == urls[:3] + urls[4:] and asked == []
    # It answers again: trusted again, and forgotten by the filter.
    policy.on_probe(urls[3], 1.1, 0, 0.01)
    asked.clear()
    assert list(policy._trusted(candidates, 1.1)) == candidates and not policy._missed_probes and asked == []
    # A failure: now every candidate is asked whether it is averse.
    policy.on_start(urls[7], 1.2)
    policy.on_finish(urls[7], 1.2, 0.01, Outcome.FAILURE)
    expected = _reference_trusted(policy, candidates, 1.2)
    asked.clear()
    assert list(policy._trusted(candidates, 1.2)) == expected and len(asked) == len(candidates)

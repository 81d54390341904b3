"""The testbed's summary tables (markdown, so they can go straight into docs/benchmarks.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..harness.stats import median


def fmt(value: float | None, digits: int = 0, deadline_ms: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if deadline_ms is not None and value >= deadline_ms:
        return "TO"
    return f"{value:.{digits}f}"


def share_range(shares: Sequence[float]) -> str:
    """min-max of each replica's share times n (1.00-1.00 is a perfectly even split)."""
    if not shares:
        return "-"
    n = len(shares)
    return f"{min(shares) * n:.2f}-{max(shares) * n:.2f}"


def detail_table(results: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    """One row per (setting, load, policy): medians over rounds."""
    header = (
        "| setting | load | policy | req/s | requests | errors | p50 ms | p90 ms | p99 ms | p99.9 ms | "
        "balancer CPU % (max process) | probes/req | fallback % | RIF p99 | share x n | corr | valid |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['load']:g} | {r['policy']} | {r['rate_rps']:.0f} | {r['requests']} | "
            f"{r['errors']} | {fmt(r['p50_ms'], 0, deadline_ms)} | {fmt(r['p90_ms'], 0, deadline_ms)} | "
            f"{fmt(r['p99_ms'], 0, deadline_ms)} | {fmt(r['p999_ms'], 0, deadline_ms)} | "
            f"{fmt(r['cpu_pct'])} ({fmt(r['max_process_cpu_pct'])}) | {fmt(r.get('probes_per_req'), 2)} | "
            f"{fmt(r.get('fallback_pct'), 1)} | "
            f"{fmt(r.get('rif_p99'))} | {share_range(r['shares'])} | {fmt(r.get('share_speed_corr'), 2)} | "
            f"{'yes' if r['valid'] else 'NO'} |"
        )
    return "\n".join(lines)


def pivot_table(results: Sequence[dict[str, Any]], setting: str, key: str, deadline_ms: float) -> str:
    """``key`` (e.g. p99_ms) per load (rows) and policy (columns) for one setting; errors after a slash."""
    rows = [r for r in results if r["setting"] == setting]
    if not rows:
        return ""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    loads = sorted({r["load"] for r in rows})
    by = {(r["load"], r["policy"]): r for r in rows}
    lines = [
        "| load | " + " | ".join(policies) + " |",
        "|---|" + "---|" * len(policies),
    ]
    best: dict[float, float] = {}
    for load in loads:
        values = [by[(load, p)][key] for p in policies if (load, p) in by and by[(load, p)]["valid"]]
        best[load] = min((v for v in values if not math.isnan(v)), default=math.nan)
    for load in loads:
        cells = []
        for p in policies:
            r = by.get((load, p))
            if r is None:
                cells.append("")
                continue
            text = fmt(r[key], 0, deadline_ms)
            if r[key] == best[load]:
                text = f"**{text}**"
            if r["errors"]:
                text += f" / {r['errors']} err"
            if not r["valid"]:
                text += " (invalid)"
            cells.append(text)
        lines.append(f"| {load:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOREPORTS = "_noreports"


def _round_ratio(on: dict[str, Any], off: dict[str, Any], key: str) -> float | None:
    """Median over the rounds both ran of off[key] / on[key] (same round: same arrivals, work, antagonists)."""
    ons = {r["round"]: r.get(key) for r in on.get("runs", [])}
    ratios = []
    for r in off.get("runs", []):
        a, b = r.get(key), ons.get(r["round"])
        if isinstance(a, int | float) and isinstance(b, int | float) and b > 0 and not math.isnan(a):
            ratios.append(a / b)
    ratios.sort()
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def reports_pair_table(results: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    """Each ``X`` beside ``X_noreports`` (piggybacked reports on / off) per setting and load.

    p99, p99.9 and the explicit probes per request (counted at the replicas) of both, and the median
    per-round ratios off / on of p99 and p99.9. Empty when no such pair ran.
    """
    by = {(r["setting"], r["load"], r["policy"]): r for r in results}
    pairs = []
    for r in results:
        name = r["policy"]
        if name.endswith(NOREPORTS) and (r["setting"], r["load"], name[: -len(NOREPORTS)]) in by:
            pairs.append((by[(r["setting"], r["load"], name[: -len(NOREPORTS)])], r))
    if not pairs:
        return ""
    header = (
        "| setting | load | contender | p99 ms on / off | p99.9 ms on / off | probes/req on / off "
        "| p99 off / on | p99.9 off / on | errors on / off | valid |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for on, off in pairs:
        p99 = f"{fmt(on['p99_ms'], 0, deadline_ms)} / {fmt(off['p99_ms'], 0, deadline_ms)}"
        p999 = f"{fmt(on['p999_ms'], 0, deadline_ms)} / {fmt(off['p999_ms'], 0, deadline_ms)}"
        probes = f"{fmt(on.get('probes_per_req'), 2)} / {fmt(off.get('probes_per_req'), 2)}"
        lines.append(
            f"| {on['setting']} | {on['load']:g} | {on['policy']} | {p99} | {p999} "
            f"| {probes} | {fmt(_round_ratio(on, off, 'p99_ms'), 2)} "
            f"| {fmt(_round_ratio(on, off, 'p999_ms'), 2)} | {on['errors']} / {off['errors']} "
            f"| {'yes' if on['valid'] and off['valid'] else 'NO'} |"
        )
    return "\n".join(lines)


def sinkhole_table(results: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] = ()) -> str:
    """The sinkhole case per (setting, load, policy): attempts that reached a sinkhole, the share of
    round robin's even share avoided (per round), client-visible failures, and the successes' p99 / p99.9
    beside a ``baseline`` run of the honest replicas alone (same seed, same arrivals), when given."""
    rows = [r for r in results if "sinkhole_attempts" in r]
    if not rows:
        return ""
    base = {(r["setting"], r["load"], r["policy"]): r for r in baseline}
    lines = [
        "| setting | load | policy | sinkhole attempts | avoided (per round) | failures | p99 ok ms | p99.9 ok ms "
        "| baseline p99 / p99.9 ms | valid |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get((r["setting"], r["load"], r["policy"]))
        failures = 100.0 * r["errors"] / r["requests"] if r["requests"] else math.nan
        avoided = " / ".join(f"{100.0 * a:.1f}%" for a in r["sinkhole_avoided"] if a is not None)
        lines.append(
            f"| {r['setting']} | {r['load']:g} | {r['policy']} | {r['sinkhole_attempts']} | {avoided} | "
            f"{r['errors']} ({failures:.2f}%) | {fmt(r.get('p99_ok_ms'))} | {fmt(r.get('p999_ok_ms'))} | "
            + (f"{fmt(b.get('p99_ok_ms'))} / {fmt(b.get('p999_ok_ms'))}" if b else "-")
            + f" | {'yes' if r['valid'] else 'NO'} |"
        )
    return "\n".join(lines)


def oracle_table(results: Sequence[dict[str, Any]], replays: Sequence[dict[str, Any]], deadline_ms: float) -> str:
    """Each contender's p99 and p99.9 beside the oracle replayed over the same queries (medians over rounds),
    and, on Prequal's rows, the share of the best other contender's excess over the oracle it removes:
    ``(peer - prequal) / (peer - oracle)``, the best peer being the lowest valid p99 (p99.9) of the others."""
    if not replays:
        return ""
    bound = {
        (r["load"], key): median(x[key] for x in replays if x["policy"] == "oracle" and x["load"] == r["load"])
        for r in replays
        for key in ("p99_ms", "p999_ms")
    }
    lines = [
        "| setting | load | policy | p99 ms | p99 - oracle | p99.9 ms | p99.9 - oracle | "
        "share of the best peer's excess removed (p99, p99.9) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["load"]), []).append(r)
    for (setting, load), rows in groups.items():
        o99, o999 = (math.nan if bound.get((load, k)) is None else bound[(load, k)] for k in ("p99_ms", "p999_ms"))
        lines.append(f"| {setting} | {load:g} | **oracle** (replay) | {fmt(o99)} | 0 | {fmt(o999)} | 0 | |")
        for r in rows:
            share = ""
            if r["policy"] == "prequal":
                peers = [p for p in rows if p["policy"] != "prequal" and p["valid"]]
                parts = []
                for key, floor in (("p99_ms", o99), ("p999_ms", o999)):
                    best = min((p[key] for p in peers), default=math.nan)
                    excess = best - floor
                    parts.append(f"{100.0 * (best - r[key]) / excess:.0f}%" if excess > 0 else "-")
                share = ", ".join(parts)
            lines.append(
                f"| {setting} | {load:g} | {r['policy']}{'' if r['valid'] else ' (invalid)'} | "
                f"{fmt(r['p99_ms'], 0, deadline_ms)} | {fmt(r['p99_ms'] - o99)} | "
                f"{fmt(r['p999_ms'], 0, deadline_ms)} | {fmt(r['p999_ms'] - o999)} | {share} |"
            )
    return "\n".join(lines)

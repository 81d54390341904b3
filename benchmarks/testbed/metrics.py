"""Summaries of one run and of several rounds: percentiles, errors, shares, probes per request, CPU.

Percentiles are ``benchmarks.harness.stats.percentile`` (nearest rank) over every measured request (those
*scheduled* in the measured window), an error counting as the deadline, as in the simulator (the paper's
"TO"). Standard library only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ..harness.stats import median, percentile
from .loadgen import STATUS_CONNECT_ERROR, STATUS_TIMEOUT

# Quantiles kept for CDF plots: dense in the body, then log-spaced into the tail.
CDF_QUANTILES = tuple(
    sorted({round(q / 100, 4) for q in range(0, 100, 2)} | {round(1 - 10 ** (-k / 8), 5) for k in range(8, 33)})
)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 2 or len(xs) != len(ys):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def summarize_records(
    records: Sequence[Sequence[Any]], window: tuple[float, float], deadline_s: float, replicas: int
) -> tuple[dict[str, Any], list[float]]:
    """The latency side of a run, and the measured latencies (ms, errors at the deadline) for CDFs."""
    start, end = window
    measured = [r for r in records if r and start <= r[0] < end]
    deadline_ms = 1000.0 * deadline_s
    latencies: list[float] = []
    timeouts = connect_errors = http_errors = failed_at_deadline = 0
    served = [0] * replicas
    lags: list[float] = []
    for _t, latency, status, replica, _instance, lag in measured:
        lags.append(lag)
        if status == 200:
            latencies.append(1000.0 * latency)
            if 0 <= replica < replicas:
                served[replica] += 1
            continue
        failed_at_deadline += 1
        if status == STATUS_TIMEOUT:
            timeouts += 1
        elif status == STATUS_CONNECT_ERROR:
            connect_errors += 1
        else:
            http_errors += 1
    # The successes alone (the sinkhole case's "no loss of p99 for the rest"); the CDFs and the headline
    # percentiles count every error as a latency at the deadline.
    ok = sorted(latencies)
    latencies = ok + [deadline_ms] * failed_at_deadline
    lags.sort()
    total_served = sum(served)
    summary: dict[str, Any] = {
        "requests": len(measured),
        "errors": timeouts + connect_errors + http_errors,
        "timeouts": timeouts,
        "connect_errors": connect_errors,
        "http_errors": http_errors,
        "p50_ms": percentile(latencies, 0.50),
        "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99),
        "p999_ms": percentile(latencies, 0.999),
        "p99_ok_ms": percentile(ok, 0.99) if ok else math.nan,
        "p999_ok_ms": percentile(ok, 0.999) if ok else math.nan,
        "mean_ms": statistics.fmean(latencies) if latencies else math.nan,
        "shares": [n / total_served if total_served else 0.0 for n in served],
        "achieved_rps": len(measured) / (end - start) if end > start else math.nan,
        "loadgen_lag_p99_ms": 1000.0 * percentile(lags, 0.99) if lags else math.nan,
        "loadgen_lag_max_ms": 1000.0 * lags[-1] if lags else math.nan,
    }
    return summary, latencies


def cdf_points(sorted_latencies_ms: Sequence[float]) -> list[list[float]]:
    """``[quantile, latency_ms]`` pairs at ``CDF_QUANTILES`` (plus the maximum)."""
    if not sorted_latencies_ms:
        return []
    points = [[q, percentile(sorted_latencies_ms, q)] for q in CDF_QUANTILES if q > 0]
    points.append([1.0, sorted_latencies_ms[-1]])
    return points


def _median(values: Sequence[float]) -> float:
    """The median over rounds of the figures present; NaN when no round has one."""
    value = median(values)
    return math.nan if value is None else value


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One (policy, setting, load) over its rounds: medians, min-max of the tail, sums of counts."""
    first = runs[0]
    out: dict[str, Any] = {
        "policy": first["policy"],
        "setting": first["setting"],
        "load": first["load"],
        "rate_rps": first["rate_rps"],
        "rounds": len(runs),
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "timeouts": sum(r["timeouts"] for r in runs),
    }
    for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "cpu_pct", "max_process_cpu_pct"):
        out[key] = _median([r[key] for r in runs])
    out["http_errors"] = sum(r.get("http_errors", 0) for r in runs)
    if any("sinkhole_attempts" in r for r in runs):
        out["sinkhole_attempts"] = sum(r["sinkhole_attempts"] for r in runs)
        out["sinkhole_avoided"] = [r["sinkhole_avoided"] for r in runs]
    for key in (
        "probes_per_req",
        "fallback_pct",
        "probe_failed_pct",
        "rif_p99",
        "share_speed_corr",
        "steal_pct",
        "loadgen_lag_p99_ms",
        "replicas_cpu_pct",
        "balancer_cpu_interference_pct",
        "load_cpu_interference_pct",
        "balancer_core_pct",
        "p99_ok_ms",
        "p999_ok_ms",
    ):
        out[key] = _median([r[key] for r in runs if r.get(key) is not None])
    for key in ("p99_ms", "p999_ms"):
        values = [r[key] for r in runs]
        out[f"{key}_range"] = [min(values), max(values)]
    n = len(first["shares"])
    out["shares"] = [_median([r["shares"][i] for r in runs]) for i in range(n)]
    out["invalid_rounds"] = sum(1 for r in runs if not r["valid"])
    out["valid"] = out["invalid_rounds"] == 0
    out["runs"] = [{k: v for k, v in r.items() if k not in ("policy", "setting", "load", "cdf_ms")} for r in runs]
    return out

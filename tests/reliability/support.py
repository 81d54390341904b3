"""Small helpers shared by the reliability cases: metrics, attempts, pool configuration, windows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx

from tests.reliability.load import Result


def pools_env(pools: dict[str, Any], **extra: str) -> dict[str, str]:
    """``PREQUAL_POOLS`` (and other variables) for a gateway process."""
    return {"PREQUAL_POOLS": json.dumps(pools), **extra}


def metric(gateway_url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when there is none)."""
    text = httpx.get(gateway_url + "/_prequal/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )  # values keep their quotes
        if all(found.get(k) == json.dumps(v) for k, v in labels.items()):
            total += float(value)
    return total


def attempts(gateway_url: str) -> list[tuple[float, str]]:
    """Every upstream attempt the gateway recorded (``--record-attempts``): (wall time, backend)."""
    return [(float(t), str(b)) for t, b in httpx.get(gateway_url + "/_test/attempts", timeout=10).json()]


def pool_state(gateway_url: str, prefix: str = "/api") -> dict[str, Any]:
    described = httpx.get(gateway_url + "/_prequal/backends", timeout=5).json()
    return next(p for p in described["pools"] if p["prefix"] == prefix)


def member_urls(gateway_url: str, prefix: str = "/api") -> list[str]:
    return sorted(m["url"] for m in pool_state(gateway_url, prefix)["members"])


def seconds_until(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02) -> float:
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def shares(
    events: Iterable[tuple[float, str]], target: str, start: float, end: float, window_s: float
) -> list[tuple[float, float, int]]:
    """Per window from ``start``: (window start offset, ``target``'s share of events, events)."""
    n = max(1, round((end - start) / window_s))
    counts = [0] * n
    hits = [0] * n
    for t, who in events:
        i = int((t - start) // window_s)
        if 0 <= i < n:
            counts[i] += 1
            hits[i] += who == target
    return [(i * window_s, hits[i] / counts[i] if counts[i] else 0.0, counts[i]) for i in range(n)]


def by_status(results: Sequence[Result]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.error is None else (r.error.split(":", 1)[0] or "error")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"

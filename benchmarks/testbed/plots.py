"""PNG plots of a testbed result document (needs matplotlib: ``pip install matplotlib``).

- ``testbed_tail.png``: p99 and p99.9 against load, one line per contender, one row per setting (the
  shape of the paper's Fig. 6), and the oracle replayed over the same queries (``oracle.py``) as the floor;
  invalid points (balancer above the CPU limit) are hollow.
- ``testbed_cdf.png``: latency CDFs at one load (logit y axis, so the body and the tail both show).
- ``testbed_shares.png``: each replica's share of the requests (times n) at that load in round 1, replicas
  sorted by their mean speed over that round's measured window, with the speed-proportional share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .oracle import oracle_cdf, oracle_points

STYLES = {
    "prequal": ("tab:red", "o", "-"),
    "round_robin": ("tab:blue", "s", "--"),
    "random": ("tab:cyan", "v", "--"),
    "least_request": ("tab:green", "^", "-."),
    "peak_ewma": ("tab:olive", "D", "-."),
    "nginx_least_conn": ("tab:purple", "P", ":"),
    "nginx_round_robin": ("tab:gray", "X", ":"),
    "haproxy_leastconn": ("tab:brown", "*", ":"),
}


VARIANT_COLORS = ("tab:pink", "tab:orange", "black", "darkred")


def _style(policy: str) -> tuple[str, str, str]:
    if policy.startswith("prequal_"):  # a Prequal variant (Q_RIF, fallback, no check): a colour of its own, dashed
        return VARIANT_COLORS[sum(map(ord, policy)) % len(VARIANT_COLORS)], "o", "--"
    return STYLES.get(policy, ("black", "o", "-"))


def _draw_oracle(ax: Any, points: list[tuple[float, float]]) -> None:
    """The bound: a thick grey line under the contenders'."""
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "-", color="black", linewidth=2.5, alpha=0.5, label="oracle (replayed)")


def pick_load(results: list[dict[str, Any]], target: float = 1.1) -> float:
    """The measured load closest to ``target`` (ties: the higher)."""
    loads = sorted({float(r["load"]) for r in results})
    return min(loads, key=lambda x: (abs(x - target), -x))


def plot_tail(document: dict[str, Any], path: Path) -> Path:
    results = document["results"]
    settings = [s for s in ("single", "fleet") if any(r["setting"] == s for r in results)]
    deadline_ms = 1000.0 * document["config"]["deadline_s"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.2 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        rows = [r for r in results if r["setting"] == setting]
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        for col, (key, label) in enumerate((("p99_ms", "p99"), ("p999_ms", "p99.9"))):
            ax = axes[row][col]
            for policy in policies:
                points = sorted((r["load"], r[key], r["valid"]) for r in rows if r["policy"] == policy)
                color, marker, line = _style(policy)
                xs = [p[0] for p in points]
                ys = [min(p[1], deadline_ms) if p[1] is not None else None for p in points]
                ax.plot(xs, ys, line, color=color, label=policy, linewidth=1.5)
                for x, y, valid in zip(xs, ys, (p[2] for p in points), strict=True):
                    if y is not None:
                        face = color if valid else "none"
                        ax.plot([x], [y], marker, color=color, markerfacecolor=face, markersize=7)
            _draw_oracle(ax, oracle_points(document, key))
            ax.axhline(deadline_ms, color="black", linewidth=0.8, linestyle="--")
            ax.text(ax.get_xlim()[0], deadline_ms, " deadline (errors)", va="bottom", fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("load (fraction of the fleet's guaranteed capacity)")
            ax.set_ylabel(f"{label} latency, ms")
            ax.set_title(f"{label}, {setting}")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.suptitle("Testbed: tail latency against load (hollow: balancer above the CPU limit)")
    fig.tight_layout(rect=(0, 0.03 + 0.035 * ((len(labels) + 3) // 4) / len(settings), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cdf(document: dict[str, Any], path: Path, load: float) -> Path:
    results = [r for r in document["results"] if r["load"] == load and r.get("cdf_ms")]
    settings = [s for s in ("single", "fleet") if any(r["setting"] == s for r in results)]
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.8), squeeze=False)
    for col, setting in enumerate(settings):
        ax = axes[0][col]
        for r in (r for r in results if r["setting"] == setting):
            points = [(ms, q) for q, ms in r["cdf_ms"] if 0.0 < q < 1.0 and ms and ms > 0]
            color, _, line = _style(r["policy"])
            ax.plot([p[0] for p in points], [p[1] for p in points], line, color=color, label=r["policy"])
        _draw_oracle(ax, [(ms, q) for q, ms in oracle_cdf(document, load) if 0.0 < q < 1.0 and ms > 0])
        ax.set_xscale("log")
        ax.set_yscale("logit")
        ax.set_xlabel("latency, ms (errors at the deadline)")
        ax.set_ylabel("CDF")
        ax.set_title(f"latency CDF at load {load:g}, {setting}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shares(document: dict[str, Any], path: Path, load: float) -> Path:
    results = [r for r in document["results"] if r["load"] == load]
    settings = [s for s in ("single", "fleet") if any(r["setting"] == s for r in results)]
    fig, axes = plt.subplots(len(settings), 1, figsize=(12, 4.2 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        ax = axes[row][0]
        rows = [r for r in results if r["setting"] == setting]
        speeds = rows[0]["runs"][0].get("mean_speeds") or []
        n = len(rows[0]["shares"])
        order = sorted(range(n), key=lambda i: speeds[i] if i < len(speeds) else 0.0)
        width = 0.8 / max(1, len(rows))
        for k, r in enumerate(rows):
            color, _, _ = _style(r["policy"])
            xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(n)]
            shares = r["runs"][0]["shares"]  # the round the speeds are from
            ax.bar(xs, [shares[i] * n for i in order], width=width, color=color, label=r["policy"])
        if speeds:
            total = sum(speeds)
            proportional = [speeds[i] / total * n for i in order]
            ax.plot(range(n), proportional, "k_", markersize=22, mew=2, label="speed-proportional")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(n))
        ax.set_xticklabels([f"r{i}\n{speeds[i]:.2f}" if speeds else f"r{i}" for i in order], fontsize=7)
        ax.set_xlabel("replica (mean slot speed over the window of round 1), slowest first")
        ax.set_ylabel("share of requests x n")
        ax.set_title(f"per-replica share of the requests at load {load:g}, {setting}, round 1")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(document: dict[str, Any], outdir: Path, load: float | None = None) -> list[Path]:
    """Every plot of ``document`` into ``outdir``; returns the files written."""
    outdir.mkdir(parents=True, exist_ok=True)
    results = document["results"]
    if not results:
        return []
    at = pick_load(results) if load is None else load
    return [
        plot_tail(document, outdir / "testbed_tail.png"),
        plot_cdf(document, outdir / "testbed_cdf.png", at),
        plot_shares(document, outdir / "testbed_shares.png", at),
    ]


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) < 2:
        print("usage: python -m benchmarks.testbed.plots RESULTS.json [OUTDIR] [LOAD]")
        sys.exit(2)
    doc = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(sys.argv[1]).parent
    for png in plot_all(doc, out, float(sys.argv[3]) if len(sys.argv) > 3 else None):
        print(png)

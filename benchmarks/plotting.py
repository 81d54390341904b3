"""Small matplotlib helpers for the benchmark scripts.

matplotlib is optional (the ``bench`` extra): it is imported only when a plot is drawn, always with the
non-interactive Agg backend, so ``--help`` and the non-plot code paths work without it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The oracle (the simulator's bound) in every plot: black and dashed, the floor the policies are read against.
ORACLE_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--"}


def have_matplotlib() -> bool:
    """Whether matplotlib is installed (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; raises ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def band(
    ax: Any,
    xs: Sequence[float],
    median: Sequence[float],
    low: Sequence[float],
    high: Sequence[float],
    label: str,
    **style: Any,
) -> None:
    """A median line with markers and a shaded min-max band over the seeds."""
    (line,) = ax.plot(xs, median, marker="o", markersize=4, label=label, **style)
    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)


def deadline_line(ax: Any, deadline_ms: float, highest: float | None = None) -> None:
    """A dashed line at the client deadline (a percentile there means timeouts); only if ``highest`` gets near it."""
    if highest is not None and highest < 0.6 * deadline_ms:
        return
    ax.axhline(deadline_ms, color="grey", linestyle="--", linewidth=0.8)
    ax.annotate("deadline", (0.0, deadline_ms), xycoords=("axes fraction", "data"), fontsize=7, color="grey")


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG (creating the directory) and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

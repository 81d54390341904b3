"""The benchmarks' one percentile definition, and the median over rounds.

**Percentile**: nearest rank. The ``q`` percentile (``q`` in [0, 1]) of n sorted values is the value of
rank ``ceil(q * n)`` (1-based), the first value for ``q = 0``: the smallest value with at least a
fraction ``q`` of the values at or below it; always one of the values, never interpolated. NaN when
there are none. ``prequal_middleware.core.simulator.percentile`` is the same rule (0.0 when empty), so
simulator and benchmark figures compare.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of an already sorted sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None and NaN skipped: a round without that figure); None if none."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None

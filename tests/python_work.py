"""Counting what Python runs for an action: a cost test that does not depend on the clock."""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any


def python_work(action: Callable[[], object]) -> Counter[str]:
    """What Python ran for ``action``: ``{"calls": n, "lines": n}`` (a loop over n members shows in the lines).

    Garbage collection is paused around it: a collection's finalizers would otherwise run, and count,
    inside the action.
    """
    traced: Counter[str] = Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event in ("call", "line"):
            traced[event + "s"] += 1
        return tracer

    gc.collect()
    gc.disable()
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(previous)
        gc.enable()
    return traced

"""``RetryBudget``: retries allowed as a share of recent requests plus a floor (Linkerd, Finagle).

Retrying every failure turns a struggling fleet's trouble into a retry storm. A budget allows, over a
sliding ``window_s``, ``ratio`` retries per request plus ``min_per_s`` retries per second whatever the
traffic. Counts are kept in one-second slots, so memory is fixed and each call is O(1) amortized.

    budget = RetryBudget(ratio=0.2, min_per_s=10.0, window_s=10.0)
    budget.record_request(now)
    if budget.try_withdraw(now): ...retry...
"""

from __future__ import annotations

import math


class RetryBudget:
    """Parameters: ``ratio`` retries per request, ``min_per_s`` retries per second always, over ``window_s``."""

    __slots__ = ("ratio", "min_per_s", "window_s", "_slots", "_requests", "_retries", "_head")

    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0, window_s: float = 10.0) -> None:
        if not 0 <= ratio < math.inf:
            raise ValueError(f"ratio must be a finite number >= 0, got {ratio!r}")
        if not 0 <= min_per_s < math.inf:
            raise ValueError(f"min_per_s must be a finite number >= 0, got {min_per_s!r}")
        if not 1 <= window_s < math.inf:
            raise ValueError(f"window_s must be a finite number >= 1, got {window_s!r}")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._slots = max(1, int(window_s))
        self._requests = [0] * self._slots
        self._retries = [0] * self._slots
        self._head = -1  # the absolute second the newest slot stands for

    def _advance(self, now: float) -> int:
        second = int(now)
        if second > self._head:
            for s in range(max(self._head + 1, second - self._slots + 1), second + 1):
                i = s % self._slots
                self._requests[i] = 0
                self._retries[i] = 0
            self._head = second
        return second % self._slots

    def record_request(self, now: float) -> None:
        """Count one original request (not a retry)."""
        self._requests[self._advance(now)] += 1

    def available(self, now: float) -> float:
        """Retries that may still be made in the current window."""
        self._advance(now)
        allowed = self.ratio * sum(self._requests) + self.min_per_s * self._slots
        return allowed - sum(self._retries)

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        if self.available(now) < 1.0:
            return False
        self._retries[self._advance(now)] += 1
        return True

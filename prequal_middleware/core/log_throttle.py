"""``LogThrottle``: at most one log line per key per interval, and a count of what was held back.

A backend that flaps, or a client that hammers the admin routes, would otherwise write a line per
event. The first event of a key is logged; repeats within ``interval_s`` are only counted; the next one
logged after the interval reports that count ("suppressed K similar"). Sans-IO: ``now`` is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable


class LogThrottle:
    """Decides which events of a key are logged.

    Parameters:
        interval_s: the least time between two logged events of one key.
        max_keys: keys remembered; beyond it the least recently logged is forgotten (its next event is
            logged at once), so a stream of distinct keys cannot grow memory without bound.
    """

    __slots__ = ("interval_s", "max_keys", "_seen")

    def __init__(self, interval_s: float = 10.0, max_keys: int = 1024) -> None:
        if not 0 <= interval_s < math.inf:
            raise ValueError(f"interval_s must be a finite number >= 0, got {interval_s!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._seen: OrderedDict[Hashable, list[float]] = OrderedDict()  # key -> [logged at, held back since]

    def allow(self, key: Hashable, now: float) -> int | None:
        """``None`` when this event of ``key`` is held back; else how many were held back since the last
        one logged (0 for the first)."""
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            return None
        held = 0 if seen is None else int(seen[1])
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        if len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return held

    def held(self, key: Hashable) -> int:
        """How many events of ``key`` are held back now."""
        seen = self._seen.get(key)
        return 0 if seen is None else int(seen[1])

"""``Deadlines``: call ``fire(key)`` for each key still armed ``delay`` seconds after it was armed, on one
event-loop timer per distinct delay instead of one per key.

The request path arms a deadline per request (the response headers' timeout, a body's idle timeout, the
client-disconnect watch) and nearly always disarms it well before it is due. A loop timer per request
(a handle allocated, pushed on the loop's heap, then cancelled) cost about 1 µs each time; here arming
and disarming are two dict operations. Keys armed with the same delay are due in the order they were
armed, so each delay keeps its keys in a dict (insertion order) and one timer set for the oldest; when
it fires it calls what is due and is set again for the next. A deadline may fire up to 1 ms early
(uvloop's timers have millisecond resolution), never more than that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)

EARLY_S = 0.001  # how early a deadline may fire: a loop timer may fire that early


class _Delay(Generic[K]):
    __slots__ = ("delay", "armed", "timer")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.armed: dict[K, float] = {}  # key -> when it was armed; insertion order is arming order
        self.timer: asyncio.TimerHandle | None = None


class Deadlines(Generic[K]):
    """Calls ``fire(key)`` once ``delay`` seconds passed since ``arm(key, delay)``, unless disarmed first.

    One instance serves one event loop at a time; used from another loop it forgets what was armed on
    the old one (whose timers can no longer fire). ``fire`` runs from the loop's timer: an exception it
    raises is logged, and the other due keys still fire.
    """

    __slots__ = ("_fire", "_delays", "_where", "_loop")

    def __init__(self, fire: Callable[[K], object]) -> None:
        self._fire = fire
        self._delays: dict[float, _Delay[K]] = {}
        self._where: dict[K, _Delay[K]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """Keys armed and not yet fired or disarmed."""
        return len(self._where)

    def arm(self, key: K, delay: float) -> None:
        """Fire ``key`` in ``delay`` seconds (re-arming a key starts its delay again)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._delays.clear()
            self._where.clear()
        group = self._delays.get(delay)
        if group is None:
            group = self._delays[delay] = _Delay(delay)
        previous = self._where.get(key)
        if previous is not None:
            del previous.armed[key]
        self._where[key] = group
        now = loop.time()
        group.armed[key] = now
        if group.timer is None:
            group.timer = loop.call_at(now + delay, self._due, group)

    def disarm(self, key: K) -> None:
        """Do not fire ``key`` (nothing happens if it is not armed)."""
        group = self._where.pop(key, None)
        if group is not None:
            del group.armed[key]

    def _due(self, group: _Delay[K]) -> None:
        group.timer = None
        loop = self._loop
        if loop is None or self._delays.get(group.delay) is not group:
            return  # forgotten when another loop took over
        latest = loop.time() + EARLY_S - group.delay  # keys armed up to then are due
        armed = group.armed
        while armed:
            key, at = next(iter(armed.items()))
            if at > latest:
                group.timer = loop.call_at(at + group.delay, self._due, group)
                return
            del armed[key]
            del self._where[key]
            try:
                self._fire(key)
            except Exception:  # one key's failure must not leave the others armed for ever
                logger.exception("a deadline's callback failed")

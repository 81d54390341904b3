"""The simulator's oracle: each query goes where it would finish soonest, judged from the fleet's true state.

No gateway can run this. It is built from what only the simulator knows at the moment a query is
sent (``simulator.py`` keeps one ``OracleView`` per replica up to date):

- every query in service on the replica and the exact time it will finish (its work divided by the
  speed sampled when it started: the model fixes that time at the start);
- every query routed to the replica and not started yet, queued there or still on the network, in FIFO
  order, with its true work;
- the replica's current slot speed (the antagonist's state now, not its future schedule);
- the new query's own true work.

It is one dispatcher for the whole fleet (it sees every client's queries), and it projects each
replica's FIFO slots forward at the current speed: a slot frees when its query ends, the next routed
query takes the earliest free slot, so the new query would start at ``max(arrival, earliest free slot)``
and finish ``work / speed`` later. It picks the replica where that finish is soonest, ties at random.

Why it bounds the policies of this model: a real policy chooses from less (probes, counters, its own
latencies) with the same FIFO slot servers behind it, and no choice can finish this query sooner than
the projection says while the speed holds. It is a greedy bound, not a proven optimum: it minimises
each query's own finish without regard to those that follow (it may take a fast slot a later, longer
query needed), it does not foresee antagonist changes (a speed change between the decision and the
query's start makes the projection wrong), and nothing reorders a replica's queue. A policy could
therefore beat it at one percentile by luck; with the measured margins it does not (docs/simulator.md,
"The limit: an oracle").
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Hashable, Sequence

__all__ = ["OracleView", "oracle_choose", "project_slots"]


def project_slots(
    now: float, slots: int, running_ends: Sequence[float], waiting: Sequence[tuple[float, float]], speed: float
) -> list[float]:
    """The times the replica's slots free up (a heap) once every routed query is served FIFO at ``speed``.

    ``running_ends`` are the end times of the queries in service; ``waiting`` the ``(arrival, work)`` of
    those routed and not started, in FIFO order. A free slot is free from ``now``.
    """
    if len(running_ends) > slots:
        raise ValueError(f"{len(running_ends)} queries in service on {slots} slots")
    heap = [*running_ends, *([now] * (slots - len(running_ends)))]
    heapq.heapify(heap)
    for arrival, work in waiting:
        start = max(arrival, heap[0])
        heapq.heapreplace(heap, start + work / speed)
    return heap


class OracleView:
    """The oracle's knowledge of one replica, kept by the simulator at every event that changes it.

    The projection (``free_at``) is updated in place when a query is routed (exact: the query takes the
    earliest slot); a speed change or a dropped query makes it stale, and it is rebuilt on the next use.
    With ``exact=False`` the works routed here are guesses (the mean), so each start, which reveals the
    true end, makes it stale too.
    """

    __slots__ = ("slots", "speed", "exact", "running", "waiting", "free_at", "stale")

    def __init__(self, slots: int, speed: float, *, exact: bool = True) -> None:
        self.slots = slots
        self.exact = exact
        self.speed = speed
        self.running: dict[Hashable, float] = {}  # query -> end time
        self.waiting: deque[tuple[Hashable, float, float]] = deque()  # (query, arrival, work), FIFO
        self.free_at: list[float] = [0.0] * slots
        self.stale = False

    def finish_at(self, now: float, arrival: float, work: float) -> float:
        """When a query of ``work`` arriving at ``arrival`` would finish here, as projected at ``now``."""
        if self.stale:
            self.free_at = project_slots(
                now, self.slots, list(self.running.values()), [(a, w) for _, a, w in self.waiting], self.speed
            )
            self.stale = False
        return max(arrival, self.free_at[0]) + work / self.speed

    def route(self, query: Hashable, now: float, arrival: float, work: float) -> None:
        """``query`` was sent here; it joins the FIFO and takes the earliest projected slot."""
        end = self.finish_at(now, arrival, work)
        heapq.heapreplace(self.free_at, end)
        self.waiting.append((query, arrival, work))

    def start(self, query: Hashable, end: float) -> None:
        """``query`` entered service and ends at ``end`` (dropped queries left ``waiting`` already)."""
        head, _, _ = self.waiting.popleft()
        if head != query:
            raise RuntimeError("the replica started a query out of FIFO order")
        self.running[query] = end
        if not self.exact:
            self.stale = True

    def finish(self, query: Hashable) -> None:
        """``query`` ended at the time its start fixed: the projection already has it."""
        del self.running[query]

    def drop(self, query: Hashable) -> None:
        """``query`` timed out before starting: it leaves the FIFO and the projection is rebuilt."""
        for i, (q, _, _) in enumerate(self.waiting):
            if q == query:
                del self.waiting[i]
                self.stale = True
                return

    def set_speed(self, speed: float) -> None:
        """The antagonist changed the slot speed: what waits will be served at the new one."""
        if speed != self.speed:
            self.speed = speed
            self.stale = True


def oracle_choose(views: Sequence[OracleView], now: float, arrival: float, work: float, rng: random.Random) -> int:
    """The index of the replica where the query would finish soonest; ties broken at random by ``rng``."""
    best = math.inf
    ties: list[int] = []
    for i, view in enumerate(views):
        end = view.finish_at(now, arrival, work)
        if end < best:
            best = end
            ties = [i]
        elif end == best:
            ties.append(i)
    if not ties:
        raise ValueError("no replica to choose from")
    return ties[0] if len(ties) == 1 else rng.choice(ties)

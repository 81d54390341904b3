"""A small open-loop HTTP/1.1 load generator, one process: ``python -m benchmarks.openloop``.

Used by ``python -m benchmarks.overhead --rates ...`` to drive a target at fixed request rates. Open
loop: the arrival schedule (Poisson by default, or evenly spaced) is drawn up front from a seed, and
every request is sent at its scheduled time whether or not earlier ones were answered; latency runs from
the *scheduled* time, so a stalled target cannot hide its queue (no coordinated omission).

Built to cost little and never be the bottleneck at a few thousand requests per second on one shared
core: no task and no client objects per request. Each keep-alive connection is an ``asyncio.Protocol``
with an ``httptools`` response parser; a request is one ``transport.write`` of a fixed ``GET``; an
idle connection is reused (last idle first), a new one is opened when none is idle (at most
``max_connections``; beyond that requests wait, first come first served, and the wait counts in their
latency). A request unanswered ``timeout_s`` after its scheduled time is an error and its connection
is closed. ``lag`` is how late the generator itself dispatched a request (its own lateness, which the
caller checks); the generator's CPU is its own, to be measured apart from the target's.

Protocol (JSON lines, as ``benchmarks.testbed.loadgen``): the first line on stdin is the spec
(``LoadSpec`` fields); the generator draws the schedule and prints ``{"ready": true, "requests": n}``;
the next stdin line is ``{"t0": <unix time>}``, when arrival 0 is due. When every request has ended it
prints one line: ``summarize(...)`` of the requests scheduled in ``[warmup_s, warmup_s + duration_s)``
(the measured window) plus its connection counts and CPU seconds.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import httptools

from .harness.stats import percentile

ARRIVALS = ("poisson", "uniform")
STATUS_TIMEOUT = 0  # no answer within timeout_s of the scheduled time
STATUS_ERROR = -1  # connection refused, reset or closed before the answer, malformed answer
STATUS_UNSENT = -2  # never dispatched (the run was cut short)
MIN_SLEEP_S = 0.001


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadSpec:
    """One open-loop run against ``http://host:port{path}``."""

    host: str
    port: int
    path: str = "/"
    rate: float
    warmup_s: float
    duration_s: float
    arrivals: str = "poisson"
    seed: int = 1
    timeout_s: float = 5.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a finite number > 0, got {self.rate!r}")
        if self.warmup_s < 0 or self.duration_s <= 0 or self.timeout_s <= 0 or self.max_connections < 1:
            raise ValueError("warmup_s >= 0, duration_s > 0, timeout_s > 0 and max_connections >= 1 are required")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}, got {self.arrivals!r}")

    @property
    def window(self) -> tuple[float, float]:
        """The measured window, seconds after t0: requests scheduled in it are the ones reported."""
        return self.warmup_s, self.warmup_s + self.duration_s


def arrival_times(rate: float, seconds: float, arrivals: str = "poisson", seed: int = 1) -> list[float]:
    """Scheduled send times in ``[0, seconds)``, seconds after t0, ascending; the same for the same arguments.

    ``poisson``: exponential gaps of mean ``1 / rate`` (a Poisson process, as benchmark-method.md asks
    for latency at a fixed load). ``uniform``: exactly ``1 / rate`` apart, starting at 0.
    """
    if not (rate > 0 and math.isfinite(rate)) or seconds < 0:
        raise ValueError("rate must be a finite number > 0 and seconds >= 0")
    if arrivals == "uniform":
        gap = 1.0 / rate
        return [i * gap for i in range(math.ceil(seconds * rate - 1e-9))]
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {arrivals!r}")
    rng = random.Random(f"openloop-arrivals:{seed}")
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def summarize(
    times: Sequence[float],
    statuses: Sequence[int],
    latencies_s: Sequence[float],
    lags_s: Sequence[float],
    window: tuple[float, float],
) -> dict[str, Any]:
    """The requests scheduled in ``window`` (seconds after t0): counts, rates, latency and lag in ms.

    ``statuses``: the HTTP status, or ``STATUS_TIMEOUT`` / ``STATUS_ERROR`` / ``STATUS_UNSENT``.
    Latencies (from the scheduled time) are those of answered requests, whatever their status.
    ``answered_rps`` is the answers to those requests over the window's length: the rate achieved.
    """
    start, end = window
    span = end - start
    answered = ok = non_2xx = timeouts = errors = unsent = 0
    latencies: list[float] = []
    lags: list[float] = []
    scheduled = 0
    for t, status, latency, lag in zip(times, statuses, latencies_s, lags_s, strict=True):
        if not start <= t < end:
            continue
        scheduled += 1
        if status == STATUS_UNSENT:
            unsent += 1
            continue
        lags.append(lag)
        if status == STATUS_TIMEOUT:
            timeouts += 1
        elif status == STATUS_ERROR:
            errors += 1
        else:
            answered += 1
            latencies.append(latency)
            if 200 <= status < 300:
                ok += 1
            else:
                non_2xx += 1
    latencies.sort()
    lags.sort()

    def ms(values: Sequence[float], q: float) -> float | None:
        return 1000.0 * percentile(values, q) if values else None  # None, not NaN: the JSON stays valid

    return {
        "scheduled": scheduled,
        "answered": answered,
        "ok": ok,
        "non_2xx": non_2xx,
        "timeouts": timeouts,
        "connection_errors": errors,
        "unsent": unsent,
        "errors": non_2xx + timeouts + errors + unsent,
        "scheduled_rps": scheduled / span if span > 0 else None,
        "answered_rps": answered / span if span > 0 else None,
        "p50_ms": ms(latencies, 0.50),
        "p99_ms": ms(latencies, 0.99),
        "p999_ms": ms(latencies, 0.999),
        "max_ms": 1000.0 * latencies[-1] if latencies else None,
        "lag_p50_ms": ms(lags, 0.50),
        "lag_p99_ms": ms(lags, 0.99),
        "lag_max_ms": 1000.0 * lags[-1] if lags else None,
    }


# --- the client ------------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time (no pipelining)."""

    def __init__(self, client: OpenLoopClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.request: int | None = None  # index of the request in flight
        self.status = 0
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()
            self.client.finish(self, STATUS_ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.lost(self)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()  # before finish(): a closing connection is not handed the next request
        self.client.finish(self, self.status)

    def send(self, index: int, payload: bytes) -> None:
        assert self.transport is not None
        self.request = index
        self.status = 0
        self.transport.write(payload)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()


class OpenLoopClient:
    """Sends ``spec``'s schedule; ``statuses``, ``latencies`` and ``lags`` per request after ``run``."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.times = arrival_times(spec.rate, spec.warmup_s + spec.duration_s, spec.arrivals, spec.seed)
        n = len(self.times)
        self.statuses = [STATUS_UNSENT] * n
        self.latencies = [0.0] * n
        self.lags = [0.0] * n
        self.ended = bytearray(n)  # 1 once a request has its final status
        self.payload = f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n\r\n".encode("latin-1")
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        self.waiting: collections.deque[int] = collections.deque()
        self.opening = 0
        self.opened = 0
        self.connect_failures = 0
        self.max_open = 0
        self.outstanding = 0  # dispatched and not ended
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return len(self.idle) + len(self.busy)

    async def run(self, t0_unix: float) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        clock = time.perf_counter  # the loop's own time is in whole milliseconds under uvloop
        self._t0 = t0 = t0_unix + (clock() - time.time())  # arrival 0, on the perf_counter clock
        times = self.times
        n = len(times)
        reaper = loop.create_task(self._reap())
        try:
            i = 0
            while i < n:
                now = clock()
                due = t0 + times[i]
                if due > now:
                    # The loop's timers have a 1 ms resolution (libuv): a shorter sleep would spin.
                    await asyncio.sleep(max(due - now, MIN_SLEEP_S))
                    continue
                while i < n and t0 + times[i] <= now:
                    self.lags[i] = now - (t0 + times[i])
                    self._dispatch(i)
                    i += 1
            last = t0 + (times[-1] if times else 0.0) + self.spec.timeout_s + 1.0
            while self.outstanding and clock() < last:
                await asyncio.sleep(0.01)
        finally:
            reaper.cancel()
            for conn in [*self.idle, *self.busy]:
                conn.close()

    def _dispatch(self, index: int) -> None:
        self.outstanding += 1
        self.statuses[index] = STATUS_TIMEOUT  # until answered
        if self.idle:
            conn = self.idle.pop()
            self.busy.add(conn)
            conn.send(index, self.payload)
            return
        self.waiting.append(index)
        if self.open_connections + self.opening < self.spec.max_connections:
            self._open()

    def _open(self) -> None:
        assert self._loop is not None
        self.opening += 1
        task = self._loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        assert self._loop is not None
        try:
            _, conn = await self._loop.create_connection(lambda: _Connection(self), self.spec.host, self.spec.port)
        except OSError:
            self.opening -= 1
            self.connect_failures += 1
            if self.waiting:  # this request had no connection to go on: an error, not a silent wait
                self._end(self.waiting.popleft(), STATUS_ERROR)
            return
        self.opening -= 1
        self.opened += 1
        self._next(conn)
        self.max_open = max(self.max_open, self.open_connections)

    def _next(self, conn: _Connection) -> None:
        """``conn`` is free: give it the oldest waiting request, or keep it idle."""
        if conn.closed:
            return
        while self.waiting:
            index = self.waiting.popleft()
            if self.ended[index]:
                continue
            self.busy.add(conn)
            conn.send(index, self.payload)
            return
        self.busy.discard(conn)
        self.idle.append(conn)

    def _end(self, index: int, status: int, latency_s: float | None = None) -> None:
        """Request ``index`` ended with ``status`` (once: a later call changes nothing)."""
        if self.ended[index]:
            return
        assert self._loop is not None
        self.ended[index] = 1
        self.statuses[index] = status
        if latency_s is None:
            latency_s = time.perf_counter() - (self._t0 + self.times[index])
        self.latencies[index] = latency_s
        self.outstanding -= 1

    def finish(self, conn: _Connection, status: int) -> None:
        index = conn.request
        if index is None:
            return
        conn.request = None
        self._end(index, status)
        if conn.closed:
            self.busy.discard(conn)
            return
        self._next(conn)

    def lost(self, conn: _Connection) -> None:
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.request is not None:  # closed before the answer
            index, conn.request = conn.request, None
            self._end(index, STATUS_ERROR)
        if self.waiting and self.open_connections + self.opening < self.spec.max_connections:
            self._open()

    async def _reap(self) -> None:
        """Every 50 ms: requests past ``timeout_s`` since their scheduled time end as timeouts."""
        assert self._loop is not None
        timeout = self.spec.timeout_s
        while True:
            await asyncio.sleep(0.05)
            limit = time.perf_counter() - timeout
            for conn in list(self.busy):
                index = conn.request
                if index is not None and self._t0 + self.times[index] < limit:
                    conn.request = None
                    self._end(index, STATUS_TIMEOUT, timeout)
                    conn.close()
                    self.busy.discard(conn)
            while self.waiting and self._t0 + self.times[self.waiting[0]] < limit:
                self._end(self.waiting.popleft(), STATUS_TIMEOUT, timeout)

    def result(self) -> dict[str, Any]:
        summary = summarize(self.times, self.statuses, self.latencies, self.lags, self.spec.window)
        summary.update(
            {
                "total_requests": len(self.times),
                "connections_opened": self.opened,
                "max_open_connections": self.max_open,
                "connect_failures": self.connect_failures,
            }
        )
        return summary


async def _main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = LoadSpec(**json.loads(await reader.readline()))
    client = OpenLoopClient(spec)
    print(json.dumps({"ready": True, "requests": len(client.times)}), flush=True)
    line = await reader.readline()
    if not line:
        return 1
    cpu_before = os.times()
    await client.run(float(json.loads(line)["t0"]))
    cpu_after = os.times()
    result = client.result()
    result["cpu_s"] = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    result["spec"] = asdict(spec)
    print(json.dumps(result), flush=True)
    return 0


def main() -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(_main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main())


if __name__ == "__main__":
    sys.exit(main())

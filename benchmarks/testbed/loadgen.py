"""The open-loop Poisson load generator, in a process of its own: ``python -m benchmarks.testbed.loadgen``.

Protocol (JSON lines): the first line on stdin is the spec (``LoadSpec``); the generator draws the whole
schedule (arrival times, target instance, work) from the seed key, opens its sessions and prints
``{"ready": true}``; the next stdin line is ``{"t0": <unix time>}``, when arrival 0 is due. It then sends
every request at its scheduled time, never waiting for an earlier one, writes every request's record to
``spec.out`` and prints ``{"done": true, ...}``.

- Arrivals are Poisson at ``rate`` over ``warmup_s + seconds``; each request goes to an instance drawn
  uniformly at random (so each instance gets a Poisson quarter in the fleet setting), with a work
  drawn from the truncated normal of the fleet model. The same seed key gives the same schedule, so
  every contender of one (round, load) gets the same requests.
- Latency runs from the *scheduled* send time, so a late generator or a stalled proxy cannot hide
  queueing (no coordinated omission). ``lag`` records how late each send actually started.
- A request unanswered ``deadline_s`` after its scheduled time is cancelled (its connection closed) and
  counted as an error; its deadline also goes upstream in ``x-testbed-deadline`` for the replicas.
- Records are ``[t_sched, latency_s, status, replica, instance, lag_s]``: ``t_sched`` in seconds after
  ``t0``, ``status`` the HTTP status, 0 for a deadline, -1 for a connection error; ``replica`` the
  ``x-testbed-replica`` header (-1 when absent).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from prequal_middleware.core.sim_fleet import draw_work

STATUS_TIMEOUT = 0
STATUS_CONNECT_ERROR = -1


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadSpec:
    """One run's load."""

    targets: list[str]
    rate: float
    warmup_s: float
    seconds: float
    deadline_s: float
    work_mu_s: float
    seed_key: str
    out: str
    path: str = "/work"


def schedule(spec: LoadSpec) -> tuple[list[float], list[int], list[float]]:
    """Arrival times (seconds after t0), target indices and works, from the seed key alone."""
    rng = random.Random(f"testbed-arrivals:{spec.seed_key}")
    works_rng = random.Random(f"testbed-work:{spec.seed_key}")
    pick_rng = random.Random(f"testbed-pick:{spec.seed_key}")
    times: list[float] = []
    targets: list[int] = []
    works: list[float] = []
    end = spec.warmup_s + spec.seconds
    t = rng.expovariate(spec.rate)
    n = len(spec.targets)
    while t < end:
        times.append(t)
        targets.append(pick_rng.randrange(n) if n > 1 else 0)
        works.append(draw_work(works_rng, spec.work_mu_s))
        t += rng.expovariate(spec.rate)
    return times, targets, works


class Generator:
    """Sends the schedule and collects the records."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.times, self.targets, self.works = schedule(spec)
        self.records: list[list[Any]] = [[]] * len(self.times)
        self.sessions: list[aiohttp.ClientSession] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def open(self) -> None:
        for _ in self.spec.targets:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0, ttl_dns_cache=None)
            self.sessions.append(
                aiohttp.ClientSession(
                    connector=connector,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    timeout=aiohttp.ClientTimeout(total=None),
                )
            )

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()

    async def run(self, t0_unix: float) -> None:
        loop = asyncio.get_running_loop()
        offset = loop.time() - time.time()  # loop time = unix time + offset
        t0 = t0_unix + offset
        urls = [target.rstrip("/") + self.spec.path for target in self.spec.targets]
        tasks: list[asyncio.Task[None]] = []
        for i, t in enumerate(self.times):
            delay = t0 + t - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(self._one(i, t0, t0_unix, urls)))
        await asyncio.gather(*tasks)

    async def _one(self, i: int, t0: float, t0_unix: float, urls: list[str]) -> None:
        loop = asyncio.get_running_loop()
        t = self.times[i]
        scheduled = t0 + t
        lag = loop.time() - scheduled
        instance = self.targets[i]
        deadline_s = self.spec.deadline_s
        headers = {
            "x-testbed-work": f"{self.works[i]:.6f}",
            "x-testbed-deadline": f"{t0_unix + t + deadline_s:.6f}",
        }
        status = STATUS_TIMEOUT
        replica = -1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with asyncio.timeout_at(scheduled + deadline_s):
                async with self.sessions[instance].get(urls[instance], headers=headers) as response:
                    await response.read()
                    status = response.status
                    replica = int(response.headers.get("x-testbed-replica", "-1"))
            latency = loop.time() - scheduled
        except TimeoutError:
            status, latency = STATUS_TIMEOUT, deadline_s
        except (aiohttp.ClientError, OSError, ValueError):
            status, latency = STATUS_CONNECT_ERROR, loop.time() - scheduled
        finally:
            self.in_flight -= 1
        self.records[i] = [round(t, 6), round(latency, 6), status, replica, instance, round(lag, 6)]


async def _main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = LoadSpec(**json.loads(await reader.readline()))
    generator = Generator(spec)
    await generator.open()
    try:
        print(json.dumps({"ready": True, "requests": len(generator.times)}), flush=True)
        line = await reader.readline()
        if not line:
            return 1
        t0_unix = float(json.loads(line)["t0"])
        cpu_before = os.times()
        await generator.run(t0_unix)
        cpu_after = os.times()
    finally:
        await generator.close()
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    document = {"records": generator.records, "cpu_s": cpu_s, "max_in_flight": generator.max_in_flight}
    with open(spec.out, "w", encoding="utf-8") as f:
        json.dump(document, f, separators=(",", ":"))
    print(json.dumps({"done": True, "requests": len(generator.records), "cpu_s": round(cpu_s, 3)}), flush=True)
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

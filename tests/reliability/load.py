"""Open-loop load: requests started at a fixed rate whatever the answers, on an event loop of their own.

    load = OpenLoop(gateway.url, rate=200, duration_s=10).start()
    ...                       # kill something meanwhile
    results = load.join()     # one Result per request, wall-clock times

Open loop (a request every ``1/rate`` s, not one after the previous answer) is what a fleet of clients
does: a hung backend cannot slow the offered load down and hide its own effect.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

Request = tuple[str, str, bytes | None]  # method, path, body


@dataclass(frozen=True, slots=True)
class Result:
    start: float  # wall clock
    end: float
    status: int  # 0: no response (transport error or client timeout)
    backend: str | None
    error: str | None
    path: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None

    @property
    def elapsed(self) -> float:
        return self.end - self.start


def get(path: str) -> Callable[[int], Request]:
    return lambda i: ("GET", path, None)


class OpenLoop:
    """``rate`` requests per second for ``duration_s`` against ``base_url``, each bounded by ``timeout_s``."""

    def __init__(
        self,
        base_url: str,
        *,
        rate: float,
        duration_s: float,
        request: Callable[[int], Request] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url
        self.rate = rate
        self.duration_s = duration_s
        self.request = request if request is not None else get("/api/echo")
        self.timeout_s = timeout_s
        self.results: list[Result] = []
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, name="open-loop", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> OpenLoop:
        self.started_at = time.time()
        self._thread.start()
        return self

    def join(self) -> list[Result]:
        self._thread.join(self.duration_s + self.timeout_s + 30)
        if self._thread.is_alive():
            raise AssertionError("the load generator did not finish in time")
        if self._error is not None:
            raise self._error
        return sorted(self.results, key=lambda r: r.start)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by join()
            self._error = exc

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            loop = asyncio.get_running_loop()
            begin = loop.time()
            total = math.floor(self.rate * self.duration_s)
            tasks = []
            for i in range(total):
                delay = begin + i / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(self._one(session, i)))
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        method, path, body = self.request(i)
        start = time.time()
        status, backend, error = 0, None, None
        try:
            async with session.request(method, self.base_url + path, data=body) as response:
                status = response.status
                backend = response.headers.get("x-backend")
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.results.append(Result(start, time.time(), status, backend, error, path))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def describe_failures(results: Sequence[Result], limit: int = 5) -> str:
    bad = [r for r in results if not r.ok]
    lines = [f"{r.path} at {r.start:.3f}: status {r.status}, {r.error}" for r in bad[:limit]]
    return f"{len(bad)} failed: " + "; ".join(lines)

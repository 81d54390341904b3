"""CPU cost of one Prequal probe: ``ProbeClient`` vs an ``aiohttp`` GET (and ``httpx``, for reference).

``task+probe`` is how the gateway sent a probe before (a task awaiting ``probe()``), ``send`` how it
sends one now (``ProbeClient.send`` with a callback, no task).

The backend (a Starlette app behind ``LoadReportingMiddleware``) runs in a uvicorn subprocess, so the
CPU time measured with ``time.process_time()`` is the probing client's alone. Probes run serially over
one keep-alive connection; rounds are interleaved so drift hits every client alike. ``floor`` is a bare
asyncio protocol that only waits for the answer's last byte: the kernel's and the event loop's share.

    python -m benchmarks.probe_cost                  # 5,000 probes per client and round, 3 rounds
    python -m benchmarks.probe_cost -n 20000 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import uvicorn
from starlette.applications import Starlette

from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.transports.probe import ProbeClient

from .harness.ports import free_port, wait_port
from .harness.procs import Supervisor

PROBE_PATH = "/_prequal/probe"
WARMUP = 500
STARTUP_TIMEOUT_S = 10.0

Probe = Callable[[], Awaitable[int]]


class _Floor(asyncio.Protocol):
    """No parsing, no timeout, no pool: what the kernel and the event loop cost alone."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(b"}") and self.waiter is not None:  # the end of the JSON body
            self.buffer = b""
            self.waiter.set_result(None)


def backend_app() -> LoadReportingMiddleware:
    return LoadReportingMiddleware(Starlette())


def start_backend(port: int, supervisor: Supervisor) -> None:
    command = [sys.executable, "-m", "benchmarks.probe_cost", "--serve", str(port)]
    supervisor.spawn(command, stdout=None)
    if not wait_port(port, STARTUP_TIMEOUT_S):
        raise RuntimeError("the backend did not start")


async def measure(probe: Probe, n: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per probe over ``n`` serial probes."""
    for _ in range(WARMUP):
        assert await probe() == 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await probe()
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def run(url: str, n: int, rounds: int) -> None:
    client = ProbeClient(timeout_s=1.0)
    session = aiohttp.ClientSession()
    http = httpx.AsyncClient()

    async def probe_client() -> int:
        return (await client.probe(url)).rif

    # How the gateway sends probes: before, one task per probe awaiting probe(); now send() with a
    # callback, no task. The waiter here only paces the serial loop.
    async def probe_task() -> int:
        return (await asyncio.create_task(client.probe(url))).rif

    async def probe_send() -> int:
        waiter: asyncio.Future[int] = loop.create_future()
        client.send(url, lambda result, error: waiter.set_result(result.rif if result is not None else -1))
        return await waiter

    async def probe_aiohttp() -> int:
        async with session.get(url + PROBE_PATH) as response:
            await response.read()
            return int(response.headers["x-prequal-rif"])

    async def probe_httpx() -> int:
        response = await http.get(url + PROBE_PATH)
        return int(response.headers["x-prequal-rif"])

    loop = asyncio.get_running_loop()
    port = int(url.rsplit(":", 1)[1])
    transport, floor = await loop.create_connection(_Floor, "127.0.0.1", port)
    request = f"GET {PROBE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def probe_floor() -> int:
        floor.waiter = loop.create_future()
        transport.write(request)
        await floor.waiter
        return 0

    clients: dict[str, Probe] = {
        "floor": probe_floor,
        "ProbeClient": probe_client,
        "task+probe": probe_task,
        "send": probe_send,
        "aiohttp": probe_aiohttp,
        "httpx": probe_httpx,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    try:
        for _ in range(rounds):
            for name, probe in clients.items():
                results[name].append(await measure(probe, n))
    finally:
        transport.close()
        await client.aclose()
        await session.close()
        await http.aclose()
    print(f"{n} serial probes x {rounds} rounds, Python {sys.version.split()[0]}, client loop {loop_name()}")
    print(f"{'client':<12} {'CPU us/probe (median, min)':>28} {'wall us/probe (median)':>24}")
    for name, rows in results.items():
        cpu = [row[0] for row in rows]
        wall = [row[1] for row in rows]
        print(f"{name:<12} {statistics.median(cpu):>19.1f} {min(cpu):>8.1f} {statistics.median(wall):>24.1f}")


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="probes per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the client's event loop")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        # A long keep-alive: the floor's one connection sits idle while the other clients run.
        uvicorn.run(backend_app(), host="127.0.0.1", port=args.serve, log_level="warning", timeout_keep_alive=3600)
        return
    port = free_port()
    with Supervisor(pin=False) as supervisor:  # its exit stops the backend, whatever happened
        start_backend(port, supervisor)
        coroutine = run(f"http://127.0.0.1:{port}", args.n, args.rounds)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(coroutine)
        else:
            asyncio.run(coroutine)


if __name__ == "__main__":
    main()

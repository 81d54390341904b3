"""Replica processes: several simulated replicas per process, each a uvicorn server on its own loopback port.

    python -m benchmarks.testbed.replica '{"fleet": {...}, "indices": [0, 1, 2], "host": "127.0.0.1"}'

Each replica is ``ReplicaFront(LoadReportingMiddleware(ReplicaApp))``:

- A *sinkhole* (``FleetConfig.sinkholes``, the last replicas) answers every query ``503`` after
  ``SINKHOLE_FAIL_S`` without taking a slot: a crashed handler behind a live ``LoadReportingMiddleware``,
  so its probe answers and piggybacked reports say RIF ~0 and a latency of ~1 ms.
- ``ReplicaApp`` serves any path: it reads the query's work (``x-testbed-work``, seconds at speed 1) and
  deadline (``x-testbed-deadline``, Unix time, as gRPC deadline propagation would carry it), waits for one
  of the replica's ``slots`` (a FIFO queue), then sleeps ``work / speed(t)`` and answers ``200 ok``. A query
  whose deadline passed while it queued is answered ``504`` without service (its client gave up). Every
  answer carries ``x-testbed-replica: <index>``.
- ``LoadReportingMiddleware`` (the library's server half) counts requests in flight and answers Prequal
  probes; probes never reach the app.
- ``ReplicaFront`` counts the probes (per 0.1 s bin since the run's epoch) and answers ``/healthz`` itself,
  so health checks are neither counted in RIF nor sampled as latencies.

The process prints one JSON line ``{"ports": [...]}`` once it listens, then takes commands as JSON lines
on stdin and answers each with one JSON line on stdout:

- ``{"cmd": "epoch", "t0": <unix>, "key": <schedule key>, "horizon_s": <s>}``: restart the antagonist
  clock at ``t0`` with the schedule ``key`` and reset the counters;
- ``{"cmd": "stats", "window": [a, b]}``: per replica, requests, probes and health checks in the window
  (seconds after the epoch), RIF samples (every 50 ms) in it, queries dropped at their deadline, and
  the requests in flight now;
- ``{"cmd": "quit"}``, SIGTERM or end of stdin: stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import signal
import socket
import sys
import time
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from prequal_middleware import LoadReportingMiddleware
from prequal_middleware.core.load_tracker import LoadTracker, LoadTrackerSettings

from .fleet import Antagonist, FleetConfig

PROBE_PATH = "/_prequal/probe"
HEALTH_PATH = "/healthz"
WORK_HEADER = b"x-testbed-work"
DEADLINE_HEADER = b"x-testbed-deadline"
REPLICA_HEADER = b"x-testbed-replica"
BIN_S = 0.1
RIF_SAMPLE_S = 0.05
SINKHOLE_FAIL_S = 0.001
BODIES = {200: b"ok", 503: b"sinkhole", 504: b"deadline exceeded"}
MAX_BINS = 36_000  # one hour of 0.1 s bins; anything later lands in the last bin


class Slots:
    """``n`` service slots with a strict FIFO queue behind them."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(future)
            raise

    def release(self) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.free += 1


class Counter:
    """Events per 0.1 s bin since the epoch."""

    def __init__(self) -> None:
        self.bins: dict[int, int] = collections.defaultdict(int)

    def add(self, t_rel: float) -> None:
        self.bins[min(MAX_BINS, max(-1, int(t_rel / BIN_S)))] += 1

    def window(self, start: float, end: float) -> int:
        lo, hi = math.floor(start / BIN_S + 1e-9), math.ceil(end / BIN_S - 1e-9)
        return sum(n for b, n in self.bins.items() if lo <= b < hi)


class Replica:
    """One replica's state: slots, antagonist, counters."""

    def __init__(self, fleet: FleetConfig, index: int) -> None:
        spec = fleet.specs[index]
        self.index = index
        self.header_value = str(index).encode()
        self.allocation = spec.allocation
        self.fast_speed = spec.fast_speed
        self.sinkhole = fleet.is_sinkhole(index)
        self.slots = Slots(fleet.slots)
        self.antagonist = Antagonist((), (), 0.0)  # busy until the first epoch
        self.t0 = time.time()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests = Counter()
        self.probes = Counter()
        self.health = Counter()
        self.expired = Counter()
        self.rif_samples: list[tuple[float, int]] = []

    def speed(self, now_unix: float) -> float:
        return self.allocation if self.antagonist.busy(now_unix - self.t0) else self.fast_speed


class ReplicaApp:
    """The service: FIFO slots, sleep-based work at the replica's current speed, deadline drops."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        work = 0.0
        deadline = math.inf
        for name, value in scope["headers"]:
            if name == WORK_HEADER:
                work = float(value)
            elif name == DEADLINE_HEADER:
                deadline = float(value)
        r = self.replica
        now = time.time()
        r.requests.add(now - r.t0)
        r.in_flight += 1
        status = 200
        try:
            if r.sinkhole:
                status = 503
                await asyncio.sleep(SINKHOLE_FAIL_S)
            else:
                status = await self._serve(work, deadline)
        finally:
            r.in_flight -= 1
        body = BODIES[status]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (REPLICA_HEADER, r.header_value),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _serve(self, work: float, deadline: float) -> int:
        """Queue for a slot, then work; 504 without service when the deadline passed in the queue."""
        r = self.replica
        await r.slots.acquire()
        try:
            now = time.time()
            if now > deadline:
                r.expired.add(now - r.t0)
                return 504
            if work > 0.0:
                await asyncio.sleep(work / r.speed(now))
            return 200
        finally:
            r.slots.release()


class ReplicaFront:
    """Counts probes (then lets ``LoadReportingMiddleware`` answer them) and answers ``/healthz``."""

    def __init__(self, app: Any, replica: Replica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            r = self.replica
            if path == PROBE_PATH:
                r.probes.add(time.time() - r.t0)
            elif path == HEALTH_PATH:
                r.health.add(time.time() - r.t0)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", b"2"), (REPLICA_HEADER, r.header_value)],
                    }
                )
                await send({"type": "http.response.body", "body": b"ok"})
                return
        await self.app(scope, receive, send)


class ReplicaProcess:
    """The replicas of one process, their servers, the RIF sampler and the command loop."""

    def __init__(self, fleet: FleetConfig, indices: list[int], host: str) -> None:
        self.fleet = fleet
        self.host = host
        self.replicas = [Replica(fleet, i) for i in indices]
        self.stop = asyncio.Event()
        self.sockets: list[socket.socket] = []
        self.servers: list[uvicorn.Server] = []

    def app_for(self, replica: Replica) -> ReplicaFront:
        """One replica's ASGI app: the front, the library's load reporting with the fleet's estimator window."""
        tracker = LoadTracker(LoadTrackerSettings(window_service_times=self.fleet.window_service_times))
        reporting = LoadReportingMiddleware(ReplicaApp(replica), probe_path=PROBE_PATH, tracker=tracker)
        return ReplicaFront(reporting, replica)

    def bind(self) -> list[int]:
        ports = []
        for _ in self.replicas:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(4096)
            sock.set_inheritable(True)
            self.sockets.append(sock)
            ports.append(sock.getsockname()[1])
        return ports

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        for replica, sock in zip(self.replicas, self.sockets, strict=True):
            app = self.app_for(replica)
            config = uvicorn.Config(
                app,
                http="httptools",
                lifespan="off",
                access_log=False,
                log_level="warning",
                server_header=False,
                date_header=False,
                proxy_headers=False,
                timeout_keep_alive=300,
                backlog=4096,
            )
            config.load()
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
            self.servers.append(server)
        sampler = asyncio.create_task(self._sample_rif())
        commands = asyncio.create_task(self._commands())
        print(json.dumps({"ports": [s.getsockname()[1] for s in self.sockets]}), flush=True)
        await self.stop.wait()
        sampler.cancel()
        commands.cancel()
        # Requests still sleeping are cancelled at shutdown: that is expected, not worth a traceback each.
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
        for server in self.servers:
            server.force_exit = True
        await asyncio.gather(*(s.shutdown(sockets=[]) for s in self.servers), return_exceptions=True)

    async def _sample_rif(self) -> None:
        while True:
            await asyncio.sleep(RIF_SAMPLE_S)
            now = time.time()
            for r in self.replicas:
                if len(r.rif_samples) < 200_000:
                    r.rif_samples.append((now - r.t0, r.in_flight))

    async def _commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                command = json.loads(line)
                if command.get("cmd") == "quit":
                    break
                reply = self.handle(command)
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
        finally:
            self.stop.set()

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        kind = command.get("cmd")
        if kind == "epoch":
            t0, key, horizon = float(command["t0"]), str(command["key"]), float(command["horizon_s"])
            for r in self.replicas:
                r.antagonist = self.fleet.schedule(r.index, key, horizon)
                r.t0 = t0
                r.reset()
            return {"ok": True}
        if kind == "stats":
            start, end = (float(x) for x in command.get("window", (0.0, math.inf)))
            out = []
            for r in self.replicas:
                out.append(
                    {
                        "index": r.index,
                        "in_flight": r.in_flight,
                        "requests": r.requests.window(start, end),
                        "probes": r.probes.window(start, end),
                        "health_checks": r.health.window(start, end),
                        "expired": r.expired.window(start, end),
                        "rif_samples": [n for t, n in r.rif_samples if start <= t < end],
                    }
                )
            return {"ok": True, "replicas": out}
        return {"ok": False, "error": f"unknown command {kind!r}"}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    fleet = FleetConfig.from_dict(spec["fleet"])
    process = ReplicaProcess(fleet, [int(i) for i in spec["indices"]], spec.get("host", "127.0.0.1"))
    process.bind()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(process.serve())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(process.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

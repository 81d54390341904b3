"""Soak: mixed traffic through a gateway process for minutes while backends churn.

    python -m benchmarks.soak --minutes 10 [--rate 100] [--json summary.json] [--doc docs/reliability.md]
    python -m benchmarks.soak --seconds 60

Everything is a real process on loopback: the gateway (``uvicorn example_app.gateway:app``, configured by
``PREQUAL_POOLS``, run as the README says) and five backends (this module with ``--role backend``).
Open-loop traffic at ``--rate`` requests per second, checked byte for byte:

- 50% ``GET /api/echo``; 15% downloads of 64 KiB to 1 MiB (SHA-1 checked); 15% ``POST`` uploads of 1 KiB
  to 512 KiB (the backend's SHA-256 checked); 10% streamed responses (5 chunks, 10 ms apart); 10% small ``PUT``.

Churn, one event every ``--churn-every`` seconds, in turn: a static backend SIGKILLed and, later,
restarted on its port; a self-registered backend (``SelfRegistration``) stopped with SIGTERM (it
unregisters) and started again; another unregistered through the admin API (it drains) and registered again.

A failed request counts as *injected* when it was in flight at the instant of a SIGKILL (its exchange
was cut by the fault); any other failure is *unexpected*. Every ``--report-every`` seconds (and at the
start and the end) it prints requests, errors, and the gateway process's RSS and open file descriptors
(from /proc) to stderr; the summary goes to stdout. ``--json`` writes the summary; ``--doc`` writes it into
the long-run section of docs/reliability.md (between the ``soak-long`` markers, which the test suite keeps
as they are).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from benchmarks.harness.ports import free_fixed_port
from benchmarks.harness.procs import Supervisor
from benchmarks.harness.progress import progress
from benchmarks.harness.stats import percentile

REPO = Path(__file__).resolve().parents[1]
LONG_SOAK_START = "<!-- soak-long:start -->"  # the same markers as tests/reliability/report.py
LONG_SOAK_END = "<!-- soak-long:end -->"
CHUNK = 64 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)
DOWNLOADS = (64 * 1024, 256 * 1024, 1024 * 1024)
UPLOADS = (1024, 64 * 1024, 512 * 1024)
STREAM_CHUNKS = 5
MiB = 1024 * 1024


def pattern_digest(n: int) -> str:
    h = hashlib.sha1()
    full, rest = divmod(n, CHUNK)
    for _ in range(full):
        h.update(_BLOCK)
    h.update(_BLOCK[:rest])
    return h.hexdigest()


# --- the backend (python -m benchmarks.soak --role backend) ----------------------------------------


def backend_app(name: str, register: str | None, port: int) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from prequal_middleware import LoadReportingMiddleware
    from prequal_middleware.backend.self_registration import SelfRegistration

    headers = {"x-backend": name}

    async def echo(request: Request) -> Response:
        return JSONResponse({"backend": name}, headers=headers)

    async def upload(request: Request) -> Response:
        h = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            h.update(chunk)
            size += len(chunk)
        return JSONResponse({"backend": name, "len": size, "sha256": h.hexdigest()}, headers=headers)

    async def download(request: Request) -> Response:
        n = int(request.query_params["n"])

        async def gen() -> AsyncIterator[bytes]:
            left = n
            while left > 0:
                piece = _BLOCK if left >= CHUNK else _BLOCK[:left]
                left -= len(piece)
                yield piece

        return StreamingResponse(gen(), headers={**headers, "content-length": str(n)})

    async def stream(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(STREAM_CHUNKS):
                yield f"chunk {i}\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(gen(), media_type="text/plain", headers=headers)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    url = f"http://127.0.0.1:{port}"
    registration = SelfRegistration(register, url, ttl_s=10.0, interval_s=2.0) if register else None
    app = Starlette(
        routes=[
            Route("/echo", echo),
            Route("/upload", upload, methods=["POST", "PUT"]),
            Route("/bytes", download),
            Route("/stream", stream),
            Route("/healthz", healthz),
        ],
        lifespan=registration.lifespan if registration is not None else None,
    )
    return LoadReportingMiddleware(app)


def run_backend(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        backend_app(args.name, args.register, args.port),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return 0


# --- child processes -------------------------------------------------------------------------------


def supervisor() -> Supervisor:
    """The driver's children: unpinned, SIGKILLed if the driver dies (no orphan survives it)."""
    return Supervisor(pin=False, death_signal=signal.SIGKILL)


@dataclass
class Child:
    """A process the soak starts, stops, SIGKILLs and starts again on the same port (a fixed one)."""

    name: str
    argv: list[str]
    port: int
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    supervisor: Supervisor = field(default_factory=supervisor, repr=False)
    popen: subprocess.Popen[Any] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.close_log()
        self._log = open(self.log_dir / f"{self.name}.log", "ab")  # open for the child's life
        env = {k: v for k, v in os.environ.items() if k == "PREQUAL_TRANSPORT" or not k.startswith("PREQUAL_")}
        env.update(PYTHONUNBUFFERED="1", **self.env)
        self.popen = self.supervisor.spawn(self.argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL (the injected fault): no chance to clean up."""
        if self.popen is not None:
            self.supervisor.stop(self.popen, 10.0, signal.SIGKILL)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout_s``."""
        if self.popen is not None:
            self.supervisor.stop(self.popen, timeout_s)
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def backend_child(name: str, log_dir: Path, supervisor: Supervisor, register: str | None = None) -> Child:
    port = free_fixed_port()
    argv = [sys.executable, "-m", "benchmarks.soak", "--role", "backend", "--name", name, "--port", str(port)]
    if register:
        argv += ["--register", register]
    return Child(name, argv, port, log_dir, supervisor=supervisor)


def gateway_child(log_dir: Path, statics: list[str], supervisor: Supervisor) -> Child:
    port = free_fixed_port()
    argv = [sys.executable, "-m", "uvicorn", "example_app.gateway:app", "--port", str(port), "--log-level", "warning"]
    argv += ["--no-proxy-headers", "--no-server-header", "--no-date-header"]
    pools = {"/api": {"upstreams": statics, "timeouts": {"response_headers_s": 15, "read_idle_s": 15}}}
    return Child("gateway", argv, port, log_dir, {"PREQUAL_POOLS": json.dumps(pools)}, supervisor)


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


# --- the driver ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    ok: bool
    status: int
    error: str | None


@dataclass
class Sample:
    t: float
    requests: int
    ok: int
    injected: int
    unexpected: int
    rss_mib: float
    fds: int
    members: int


@dataclass
class Summary:
    duration_s: float
    rate: float
    warmup_s: float
    requests: int = 0
    ok: int = 0
    errors_injected: int = 0
    errors_unexpected: int = 0
    unexpected_samples: list[str] = field(default_factory=list)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    churn: dict[str, int] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0


class Soak:
    def __init__(
        self, duration_s: float, rate: float, churn_every_s: float, report_every_s: float, log_dir: Path
    ) -> None:
        self.duration_s = duration_s
        self.rate = rate
        self.churn_every_s = churn_every_s
        self.report_every_s = report_every_s
        self.warmup_s = min(10.0, duration_s / 6)
        self.log_dir = log_dir
        self.rng = random.Random(20240601)
        self.outcomes: list[Outcome] = []
        self.kills: list[float] = []
        self.churn: Counter[str] = Counter()
        self.digests = {n: pattern_digest(n) for n in DOWNLOADS}
        self.uploads = {n: self.rng.randbytes(n) for n in UPLOADS}
        self.upload_sha = {n: hashlib.sha256(b).hexdigest() for n, b in self.uploads.items()}
        self.supervisor = supervisor()  # every child's: whatever is still running is stopped on the way out
        stable = [backend_child(f"static-{i}", log_dir, self.supervisor) for i in range(2)]
        self.victim = backend_child("static-killed", log_dir, self.supervisor)
        self.statics = [*stable, self.victim]
        self.gateway = gateway_child(log_dir, [b.url for b in self.statics], self.supervisor)
        admin = self.gateway.url + "/_prequal"
        self.self_registered = backend_child("self-registered", log_dir, self.supervisor, register=admin)
        self.admin_registered = backend_child("admin-registered", log_dir, self.supervisor)
        self.backends = [*self.statics, self.self_registered, self.admin_registered]

    # --- lifecycle ---

    async def run(self) -> Summary:
        started = time.monotonic()
        try:
            self.gateway.start()
            for b in self.backends:
                b.start()
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=15)
            ) as session:
                self.session = session
                await self.wait_up(self.gateway, "/_prequal/healthz")
                for b in self.backends:
                    await self.wait_up(b, "/healthz")
                await self.admin("register", self.admin_registered)
                await self.wait_members(5)
                summary = await self.drive()
        finally:
            with self.supervisor:  # its exit stops any child the loop below did not
                for child in [*self.backends, self.gateway]:
                    child.stop()
        summary.wall_s = round(time.monotonic() - started, 1)
        return summary

    async def wait_up(self, child: Child, path: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.session.get(child.url + path, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status < 500:
                        return
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} did not come up; see {self.log_dir / (child.name + '.log')}")
            await asyncio.sleep(0.05)

    async def admin(self, kind: str, child: Child) -> None:
        async with self.session.post(self.gateway.url + f"/_prequal/{kind}", json={"url": child.url}) as r:
            if r.status >= 300:
                raise RuntimeError(f"{kind} {child.url}: {r.status} {await r.text()}")
        self.churn[f"admin {kind}"] += 1

    async def members(self) -> int:
        async with self.session.get(self.gateway.url + "/_prequal/backends") as r:
            described = await r.json()
        return sum(len(p["members"]) for p in described["pools"])

    async def wait_members(self, n: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.members() != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway never had {n} members")
            await asyncio.sleep(0.1)

    # --- traffic ---

    async def drive(self) -> Summary:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        wall0 = time.time()
        tasks: set[asyncio.Task[None]] = set()
        samples: list[Sample] = []
        self.print_header()
        samples.append(await self.sample(0.0))
        churn = asyncio.ensure_future(self.churn_loop(t0))
        next_report = self.report_every_s
        warm_sampled = False
        i = 0
        try:
            while (elapsed := loop.time() - t0) < self.duration_s:
                if not warm_sampled and elapsed >= self.warmup_s:
                    warm_sampled = True
                    samples.append(await self.sample(elapsed))
                    if next_report - self.warmup_s < 1.0:
                        next_report += self.report_every_s  # just sampled
                if elapsed >= next_report:
                    next_report += self.report_every_s
                    samples.append(await self.sample(elapsed))
                delay = t0 + i / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(self.one(self.rng.random()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks)
        finally:
            churn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await churn
        samples.append(await self.sample(loop.time() - t0))
        return self.summarise(samples, wall0)

    async def one(self, x: float) -> None:
        start = time.time()
        if x < 0.5:
            kind, check = "GET echo", self.get("/api/echo", lambda body: b'"backend"' in body)
        elif x < 0.65:
            n = self.rng.choice(DOWNLOADS)
            digest = self.digests[n]
            kind, check = (
                f"GET {n // 1024} KiB",
                self.get(f"/api/bytes?n={n}", lambda b: hashlib.sha1(b).hexdigest() == digest),
            )
        elif x < 0.8:
            n = self.rng.choice(UPLOADS)
            kind, check = f"POST {n // 1024} KiB", self.send("POST", n)
        elif x < 0.9:
            expected = b"".join(f"chunk {i}\n".encode() for i in range(STREAM_CHUNKS))
            kind, check = "GET stream", self.get("/api/stream", lambda b: b == expected)
        else:
            kind, check = "PUT 1 KiB", self.send("PUT", UPLOADS[0])
        status, ok, error = await check
        self.outcomes.append(Outcome(kind, start, time.time(), ok, status, error))

    async def get(self, path: str, valid: Callable[[bytes], bool]) -> tuple[int, bool, str | None]:
        try:
            async with self.session.get(self.gateway.url + path) as r:
                body = await r.read()
                if r.status != 200:
                    return r.status, False, body[:120].decode("latin-1")
                return r.status, valid(body), None if valid(body) else "wrong body"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 0, False, f"{type(exc).__name__}: {exc}"

    async def send(self, method: str, n: int) -> tuple[int, bool, str | None]:
        try:
            async with self.session.request(method, self.gateway.url + "/api/upload", data=self.uploads[n]) as r:
                body = await r.read()
                if r.status != 200:
                    return r.status, False, body[:120].decode("latin-1")
                got = json.loads(body)
                ok = got.get("len") == n and got.get("sha256") == self.upload_sha[n]
                return r.status, ok, None if ok else "wrong echo"
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return 0, False, f"{type(exc).__name__}: {exc}"

    # --- churn ---

    async def churn_loop(self, t0: float) -> None:
        loop = asyncio.get_running_loop()
        events = [
            self.kill_static,
            self.restart_static,
            self.stop_self_registered,
            self.start_self_registered,
            self.unregister_admin,
            self.register_admin,
        ]
        await asyncio.sleep(self.warmup_s / 2)
        i = 0
        while True:
            await events[i % len(events)]()
            i += 1
            await asyncio.sleep(max(0.0, t0 + self.warmup_s / 2 + i * self.churn_every_s - loop.time()))

    async def kill_static(self) -> None:
        self.kills.append(time.time())
        self.victim.kill()
        self.churn["SIGKILL"] += 1

    async def restart_static(self) -> None:
        self.victim.start()
        await self.wait_up(self.victim, "/healthz")
        self.churn["restart after SIGKILL"] += 1

    async def stop_self_registered(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.self_registered.stop)
        self.churn["SIGTERM (self-unregisters)"] += 1

    async def start_self_registered(self) -> None:
        self.self_registered.start()
        await self.wait_up(self.self_registered, "/healthz")
        self.churn["start (self-registers)"] += 1

    async def unregister_admin(self) -> None:
        await self.admin("unregister", self.admin_registered)

    async def register_admin(self) -> None:
        await self.admin("register", self.admin_registered)

    # --- figures ---

    def counts(self) -> tuple[int, int, int, int]:
        outcomes = list(self.outcomes)
        failed = [o for o in outcomes if not o.ok]
        injected = sum(1 for o in failed if self.injected(o))
        return len(outcomes), len(outcomes) - len(failed), injected, len(failed) - injected

    def injected(self, o: Outcome) -> bool:
        return any(o.start <= k <= o.end + 0.05 for k in self.kills)

    async def sample(self, t: float) -> Sample:
        rss, fds = proc_figures(self.gateway.pid)
        requests, ok, injected, unexpected = self.counts()
        try:
            members = await self.members()
        except (aiohttp.ClientError, OSError, TimeoutError):
            members = -1
        s = Sample(round(t, 1), requests, ok, injected, unexpected, round(rss, 1), fds, members)
        progress(
            f"[{s.t:7.1f} s] requests {s.requests:7d}  ok {s.ok:7d}  errors {s.injected} injected"
            f" + {s.unexpected} unexpected  | gateway RSS {s.rss_mib:6.1f} MiB  fds {s.fds:4d}  | members {s.members}"
        )
        return s

    def print_header(self) -> None:
        progress(
            f"soak: {self.duration_s:g} s at {self.rate:g} req/s through gateway pid {self.gateway.pid} "
            f"({self.gateway.url}), 5 backends, a churn event every {self.churn_every_s:g} s; logs in {self.log_dir}"
        )

    def summarise(self, samples: list[Sample], wall0: float) -> Summary:
        requests, ok, injected, unexpected = self.counts()
        s = Summary(self.duration_s, self.rate, self.warmup_s, requests, ok, injected, unexpected)
        s.unexpected_samples = [
            f"{o.kind} at +{o.start - wall0:.2f} s: {o.status} {o.error}"
            for o in self.outcomes
            if not o.ok and not self.injected(o)
        ][:10]
        by_kind: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            c = by_kind.setdefault(o.kind, Counter())
            c["requests"] += 1
            c["ok" if o.ok else ("injected" if self.injected(o) else "unexpected")] += 1
        s.by_kind = {k: dict(v) for k, v in sorted(by_kind.items())}
        latencies = sorted(o.end - o.start for o in self.outcomes if o.ok and o.kind == "GET echo")
        s.latency_ms = {q: round(percentile(latencies, f) * 1000, 1) for q, f in (("p50", 0.5), ("p99", 0.99))}
        s.churn = dict(self.churn)
        warm = next((x for x in samples if x.t >= self.warmup_s), samples[0])
        after = [x for x in samples if x.t >= self.warmup_s]
        s.rss_mib = {
            "start": samples[0].rss_mib,
            "after_warmup": warm.rss_mib,
            "end": samples[-1].rss_mib,
            "max_after_warmup": max(x.rss_mib for x in after),
        }
        s.fds = {
            "start": samples[0].fds,
            "after_warmup": warm.fds,
            "end": samples[-1].fds,
            "max_after_warmup": max(x.fds for x in after),
        }
        s.samples = samples
        return s


# --- output ----------------------------------------------------------------------------------------


def print_summary(s: Summary) -> None:
    print(
        f"\nsoak done in {s.wall_s:g} s: {s.requests} requests, {s.ok} ok, {s.errors_injected} failed by injected "
        f"faults, {s.errors_unexpected} unexpected; echo p50 {s.latency_ms['p50']} ms, p99 {s.latency_ms['p99']} ms"
    )
    print(
        f"gateway RSS {s.rss_mib['start']} MiB at start, {s.rss_mib['after_warmup']} after warm-up, {s.rss_mib['end']} "
        f"at the end (max {s.rss_mib['max_after_warmup']}); fds {s.fds['start']} / {s.fds['after_warmup']} / "
        f"{s.fds['end']} (max {s.fds['max_after_warmup']})"
    )
    print("churn: " + ", ".join(f"{k} {v}" for k, v in s.churn.items()))
    for line in s.unexpected_samples:
        print("  unexpected: " + line)


def doc_section(s: Summary, command: str) -> str:
    step = max(1, math.ceil(len(s.samples) / 12))  # a dozen rows at most: start, every step-th, the end
    shown = [x for i, x in enumerate(s.samples) if i % step == 0 or i == len(s.samples) - 1]
    rows = "\n".join(
        f"| {x.t:g} | {x.requests} | {x.injected} | {x.unexpected} | {x.rss_mib:g} | {x.fds} | {x.members} |"
        for x in shown
    )
    kinds = ", ".join(f"{k} {v.get('requests', 0)}" for k, v in s.by_kind.items())
    latency = f"p50 {s.latency_ms['p50']} ms, p99 {s.latency_ms['p99']} ms"
    return f"""`{command}`: {s.duration_s:g} s at {s.rate:g} req/s (wall time {s.wall_s:g} s).

- Requests: {s.requests} ({kinds}).
- Outcomes: {s.ok} ok, {s.errors_injected} cut by a SIGKILL while in flight (injected),
  **{s.errors_unexpected} unexpected**. Echo latency {latency}.
- Churn: {", ".join(f"{k} {v}" for k, v in s.churn.items())}.
- Gateway RSS: {s.rss_mib["start"]} MiB at start, {s.rss_mib["after_warmup"]} MiB after the {s.warmup_s:g} s
  warm-up, {s.rss_mib["end"]} MiB at the end (max {s.rss_mib["max_after_warmup"]} MiB after warm-up).
- Gateway file descriptors: {s.fds["start"]} at start, {s.fds["after_warmup"]} after warm-up, {s.fds["end"]} at
  the end (max {s.fds["max_after_warmup"]} after warm-up).

Progress samples (a dozen at most, the first and the last included):

| t (s) | requests | injected errors | unexpected errors | gateway RSS (MiB) | gateway fds | members |
|---|---|---|---|---|---|---|
{rows}"""


def update_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Reliability\n"
    block = f"{LONG_SOAK_START}\n{section}\n{LONG_SOAK_END}"
    if LONG_SOAK_START in text and LONG_SOAK_END in text:
        head, _, rest = text.partition(LONG_SOAK_START)
        _, _, tail = rest.partition(LONG_SOAK_END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Soak, long run\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["driver", "backend"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--register", help=argparse.SUPPRESS)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default 1)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second [100]")
    parser.add_argument("--churn-every", type=float, default=2.5, help="seconds between churn events [2.5]")
    parser.add_argument("--report-every", type=float, default=10.0, help="seconds between progress lines [10]")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--doc", type=Path, help="write the summary into this reliability document's long-run section")
    parser.add_argument("--log-dir", type=Path, help="where the processes' logs go [a temporary directory]")
    args = parser.parse_args(argv)
    if args.role == "backend":
        return run_backend(args)
    duration = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 1.0)
    if duration < 12 or args.rate <= 0:
        parser.error("run for at least 12 seconds at a positive rate")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    soak = Soak(duration, args.rate, args.churn_every, args.report_every, log_dir)
    summary = asyncio.run(soak.run())
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(asdict(summary), indent=2))
    if args.doc:
        length_arg = f"--minutes {args.minutes:g}" if args.minutes is not None else f"--seconds {duration:g}"
        update_doc(args.doc, doc_section(summary, f"python -m benchmarks.soak {length_arg}"))
        print(f"wrote the long-run section of {args.doc}")
    return 1 if summary.errors_unexpected else 0


if __name__ == "__main__":
    sys.exit(main())

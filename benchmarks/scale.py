"""The gateway's cost as the work grows: CPU per request and memory as a pool grows and as pools multiply.

    python -m benchmarks.scale                      # 5 rounds, writes docs/results/scale.json
    python -m benchmarks.scale --quick --json /tmp/s.json

Four measurements, each for ``prequal`` and ``round_robin`` side by side:

- ``gateway``: the real request path in-process. A ``Gateway`` behind ``PrequalMiddleware`` is called as
  an ASGI app (no sockets: they cost the same at every size and only add noise), its upstreams answered
  by ``MockTransport`` with a canned 200 carrying a piggybacked load report (``x-prequal-rif``,
  ``x-prequal-latency-us``; each backend its own fixed values). Pool sizes 2, 10, 100 and 1,000 members
  in one pool, and 1, 10 and 100 pools (prefixes) of 10 members each, requests spread over the prefixes
  in turn. Backends are on 10.x addresses that are never contacted: the probes Prequal sends go through
  the real scheduler (``send_probes``, its in-flight cap, the result callback, ``policy.on_probe``) but to
  an in-process probe client that answers on the next event-loop turn, so no probe reaches the network
  and the network's share of a probe (``benchmarks.probe_cost``: ~75 µs) is left out and reported as a
  count (probes per request). The gateway's clock is a ``FakeClock`` that moves 1 ms per request
  (1,000 requests per second in simulated time), so whether a piggybacked report is fresh enough to stand
  in for a probe is the same on every run, whatever the machine's speed.
- ``sansio``: the policy alone: a ``select`` + ``on_start`` + ``on_report`` + ``on_finish`` cycle (the
  probes it asks for answered with ``on_probe``, as the gateway would), ``on_probe`` alone, and the
  membership changes: a member joins and leaves (``upsert_member`` / ``remove_member``), a health flip
  (``set_health`` down and up), each followed by the ``select`` that rebuilds the candidates, and a full
  ``set_members``.
- ``loops``: what the background loops cost per second at each size: the gauge update and the status
  history sample (once per second each), and an idle-probe round.
- ``memory``: ``tracemalloc`` around building a started gateway with N members, and again after traffic
  (every member chosen several times: the probe pool, the RIF history and the per-backend metric series
  filled); bytes per member from the slope between 2 and 1,000 members.

Method (a shared 2-core machine): CPU time of this thread (``time.thread_time``), not wall time; the
configurations interleaved in rounds (A B C ... A B C ...), each round's order rotated; medians and
min-max over the rounds, and each size's ratio to the 2-member case (1 prefix for the prefix series)
taken within each round. The gauge loop is slowed to once an hour while measuring (its cost per second
is measured on its own), so that it does not land in some batches and not others.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prequal_middleware
from prequal_middleware import Gateway, HealthSettings, PrequalMiddleware, UpstreamPool
from prequal_middleware.core import Member, Outcome, Policy, create_policy
from prequal_middleware.core.compiled import compiled_modules, describe
from prequal_middleware.core.load_report import encode_report
from prequal_middleware.gateway import scheduler as scheduler_module
from prequal_middleware.testing import CannedResponse, FakeClock, MockTransport
from prequal_middleware.transports.probe import ProbeCallback, ProbeResult

from .harness.progress import progress
from .harness.rounds import rotated

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "docs" / "results" / "scale.json"
POLICIES = ("prequal", "round_robin")
SIZES = (2, 10, 100, 1000)
PREFIXES = (1, 10, 100)
MEMBERS_PER_PREFIX = 10
STEP_S = 0.001  # simulated time per request: 1,000 requests per second
SEED = 1
SANSIO_OPS = ("cycle", "fallback", "on_probe", "join_leave", "health_flip", "set_members")


def backend_url(i: int) -> str:
    """A 10.x address: never contacted (requests and probes are answered in-process)."""
    return f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000"


def load_of(i: int) -> tuple[int, float]:
    """Backend ``i``'s fixed load report (RIF, latency): varied, so that hot/cold selection has work to do."""
    return i % 5, 0.001 + 0.00025 * (i % 8)


LOADS: dict[str, tuple[int, float]] = {}


class InstantProbes:
    """Stands in for the scheduler's ``ProbeClient``: answers each probe on the next event-loop turn."""

    backends_known = 0
    open_connections = 0

    def __init__(self) -> None:
        self.sent = 0

    def send(self, backend_url: str, callback: ProbeCallback) -> None:
        self.sent += 1
        rif, latency_s = LOADS[backend_url]
        asyncio.get_running_loop().call_soon(callback, ProbeResult(rif, latency_s), None)

    def forget(self, backend_url: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


# --- the gateway, driven in-process ------------------------------------------------------------------


async def _not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@dataclass
class GatewayCase:
    """One configuration: ``pools`` prefixes of ``members`` members each, balanced by ``policy``."""

    policy: str
    pools: int
    members: int
    series: str  # "members" or "prefixes"
    clock: FakeClock = field(default_factory=FakeClock)
    gateway: Gateway | None = None
    app: PrequalMiddleware | None = None
    probes: list[InstantProbes] = field(default_factory=list)
    errors: int = 0
    next_prefix: int = 0
    transport_requests: list[Any] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.policy}/{self.series}/p{self.pools}/m{self.members}"

    def transport(self) -> MockTransport:
        backends = {}
        for i in range(self.pools * self.members):
            url = backend_url(i)
            rif, latency_s = LOADS[url] = load_of(i)
            backends[url] = CannedResponse(
                200, [(b"content-type", b"text/plain"), *encode_report(rif, latency_s)], b"ok"
            )
        return MockTransport(backends)

    async def start(self, transport: MockTransport) -> None:
        pools = [
            UpstreamPool(
                f"/p{j}",
                upstreams=[backend_url(j * self.members + i) for i in range(self.members)],
                policy=self.policy,
                health=HealthSettings(path=None),  # active checks are a loop's cost, not the request's
            )
            for j in range(self.pools)
        ]
        self.transport_requests = transport.requests
        self.gateway = Gateway(pools, transport=transport, clock=self.clock, rng=random.Random(SEED))
        self.app = PrequalMiddleware(_not_found, gateway=self.gateway)
        await self.gateway.startup()
        scheduler = self.gateway._scheduler
        assert scheduler is not None
        for pool in self.gateway.pools.values():
            fake = InstantProbes()
            scheduler._probe_clients[id(pool)] = fake  # type: ignore[assignment]
            self.probes.append(fake)

    def probes_sent(self) -> int:
        return sum(p.sent for p in self.probes)

    def probes_requested(self) -> int:
        assert self.gateway is not None
        return sum(getattr(c, "probes_requested", 0) for p in self.gateway.pools.values() for c in p.clients)

    async def run(self, requests: int) -> float:
        """Send ``requests`` requests, one at a time; the CPU seconds they took."""
        app = self.app
        assert app is not None
        clock = self.clock
        status = [0]

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        paths = [(f"/p{j}/x", f"/p{j}/x".encode()) for j in range(self.pools)]
        headers = [(b"host", b"gateway.test")]
        started = time.thread_time()
        for _ in range(requests):
            clock.advance(STEP_S)
            path, raw = paths[self.next_prefix]
            self.next_prefix = (self.next_prefix + 1) % self.pools
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": raw,
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": ("127.0.0.1", 50000),
                "server": ("gateway.test", 80),
            }
            await app(scope, receive, send)
            if status[0] != 200:
                self.errors += 1
            await asyncio.sleep(0)  # the probe answers (next loop turn) are part of the request's cost
        elapsed = time.thread_time() - started
        self.transport_requests.clear()  # MockTransport records every request: not the gateway's memory
        return elapsed

    def loop_costs(self, repeats: int) -> dict[str, float]:
        """µs per call of each background loop's work at this size (gauges, history, an idle-probe round)."""
        assert self.gateway is not None and self.gateway._scheduler is not None
        scheduler = self.gateway._scheduler
        pools = list(self.gateway.pools.values())

        def idle_round() -> None:
            self.clock.advance(1.0)  # every client idle: each sends its idle probes
            t = self.clock.now
            for pool in pools:
                for policy in pool.clients:
                    targets = policy.idle_probes(t)
                    if targets:
                        scheduler.send_probes(pool, policy, targets)

        out = {}
        for name, fn in (
            ("gauges", scheduler.update_gauges),
            ("history", scheduler.sample_history),
            ("idle_probes", idle_round),
        ):
            started = time.thread_time()
            for _ in range(repeats):
                fn()
            out[name] = (time.thread_time() - started) / repeats * 1e6

        return out

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.shutdown()


def gateway_cases() -> list[GatewayCase]:
    cases = []
    for policy in POLICIES:
        cases += [GatewayCase(policy, 1, n, "members") for n in SIZES]
        cases += [GatewayCase(policy, p, MEMBERS_PER_PREFIX, "prefixes") for p in PREFIXES]
    return cases


# --- the policy alone (sans-IO) ------------------------------------------------------------------------


@dataclass
class SansIoCase:
    policy: str
    members: int
    now: float = 1000.0
    impl: Policy | None = None
    fallback: Policy | None = None
    urls: list[str] = field(default_factory=list)
    extra: int = 0
    probes: int = 0
    cycles: int = 0

    @property
    def key(self) -> str:
        return f"{self.policy}/m{self.members}"

    def build(self) -> None:
        self.urls = [backend_url(i) for i in range(self.members)]
        for i, url in enumerate(self.urls):
            LOADS[url] = load_of(i)
        self.impl = create_policy(self.policy, rng=random.Random(SEED))
        self.impl.set_members([Member(u) for u in self.urls], self.now)
        self.fallback = create_policy(self.policy, rng=random.Random(SEED))
        self.fallback.set_members([Member(u) for u in self.urls], self.now)

    def op(self, name: str, count: int) -> float:
        """CPU µs per ``name`` operation, ``count`` of them."""
        policy = self.impl
        assert policy is not None
        urls, loads = self.urls, LOADS
        started = time.thread_time()
        if name == "cycle":
            for _ in range(count):
                self.now += STEP_S
                now = self.now
                selection = policy.select(now)
                assert selection is not None
                backend = selection.backend
                policy.on_start(backend, now)
                for target in selection.probes:
                    rif, latency_s = loads[target]
                    policy.on_probe(target, now, rif, latency_s)
                self.probes += len(selection.probes)
                rif, latency_s = loads[backend]
                policy.on_report(backend, now, rif, latency_s)
                policy.on_finish(backend, now, 0.002, Outcome.SUCCESS)
            self.cycles += count
        elif name == "fallback":
            # A policy whose probe pool is empty (startup, after an idle second, probes capped or failing):
            # Prequal's fallback chooses; no probe is answered and no report kept, so it stays empty.
            fallback = self.fallback
            assert fallback is not None
            for _ in range(count):
                self.now += STEP_S
                now = self.now
                selection = fallback.select(now)
                assert selection is not None
                fallback.on_start(selection.backend, now)
                fallback.on_finish(selection.backend, now, 0.002, Outcome.SUCCESS)
        elif name == "on_probe":
            n = len(urls)
            for i in range(count):
                url = urls[i % n]
                rif, latency_s = loads[url]
                policy.on_probe(url, self.now, rif, latency_s)
        elif name == "join_leave":
            for _ in range(count):
                self.extra += 1
                member = Member(backend_url(100_000 + self.extra))
                policy.upsert_member(member, self.now)
                policy.select(self.now)  # rebuilds the candidates
                policy.remove_member(member.id, self.now)
                policy.select(self.now)
        elif name == "health_flip":
            n = len(urls)
            for i in range(count):
                url = urls[i % n]
                policy.set_health(url, False, self.now)
                policy.select(self.now)
                policy.set_health(url, True, self.now)
                policy.select(self.now)
        elif name == "set_members":
            members = [Member(u) for u in urls]
            for _ in range(count):
                policy.set_members(members, self.now)
        else:
            raise ValueError(name)
        return (time.thread_time() - started) / count * 1e6


# --- statistics and output -----------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def fmt(s: dict[str, Any], digits: int = 1) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


async def measure_gateway(
    rounds: int, requests: int, warmup: int, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    cases = gateway_cases()
    for case in cases:
        await case.start(case.transport())
        await case.run(max(warmup, 3 * case.pools * case.members))  # every member chosen, pools warm
    per_round: dict[str, list[float]] = {c.key: [] for c in cases}
    probes0 = {c.key: (c.probes_sent(), c.probes_requested()) for c in cases}
    errors0 = {c.key: c.errors for c in cases}
    for r in range(rounds):
        for case in rotated(cases, r):
            gc.collect()
            cpu = await case.run(requests)
            per_round[case.key].append(cpu / requests * 1e6)
        progress(f"gateway round {r + 1}/{rounds} done")
    results = []
    for case in cases:
        base = (
            f"{case.policy}/members/p1/m{SIZES[0]}"
            if case.series == "members"
            else f"{case.policy}/prefixes/p1/m{MEMBERS_PER_PREFIX}"
        )
        us = per_round[case.key]
        ratios = [a / b for a, b in zip(us, per_round[base], strict=True)]
        total = rounds * requests
        sent, asked = case.probes_sent() - probes0[case.key][0], case.probes_requested() - probes0[case.key][1]
        results.append(
            {
                "policy": case.policy,
                "series": case.series,
                "pools": case.pools,
                "members_per_pool": case.members,
                "members": case.pools * case.members,
                "cpu_us_per_request": stats(us),
                "ratio": stats(ratios),
                "probes_per_request": sent / total,
                "probes_requested_per_request": asked / total,
                "errors": case.errors - errors0[case.key],
                "loops_us_per_call": case.loop_costs(5),
            }
        )
    for case in cases:
        await case.stop()
    return results


def measure_sansio(rounds: int, count: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    cases = [SansIoCase(p, n) for p in POLICIES for n in SIZES]
    for case in cases:
        case.build()
        case.op("cycle", max(count, 3 * case.members))  # warm: the probe pool and RIF history filled
    counts = {
        "cycle": count,
        "fallback": max(1, count // 10),
        "on_probe": count,
        "join_leave": max(1, count // 10),
        "health_flip": max(1, count // 10),
        "set_members": max(1, count // 100),
    }
    per_round: dict[tuple[str, str], list[float]] = {(c.key, op): [] for c in cases for op in SANSIO_OPS}
    probes0 = {c.key: (c.probes, c.cycles) for c in cases}
    for r in range(rounds):
        for op in SANSIO_OPS:
            for case in rotated(cases, r):
                per_round[(case.key, op)].append(case.op(op, counts[op]))
        progress(f"sans-IO round {r + 1}/{rounds} done")
    results = []
    for case in cases:
        for op in SANSIO_OPS:
            us = per_round[(case.key, op)]
            base = per_round[(f"{case.policy}/m{SIZES[0]}", op)]
            entry: dict[str, Any] = {
                "policy": case.policy,
                "members": case.members,
                "op": op,
                "us": stats(us),
                "ratio": stats([a / b for a, b in zip(us, base, strict=True)]),
            }
            if op == "cycle":
                probes, cycles = case.probes - probes0[case.key][0], case.cycles - probes0[case.key][1]
                entry["probes_per_cycle"] = probes / cycles
            results.append(entry)
    return results


async def measure_memory(sizes: Sequence[int], traffic: int) -> list[dict[str, Any]]:
    """Bytes allocated (and still held) by building and starting a gateway of N members, and after traffic."""
    results = []
    for policy in POLICIES:
        for n in sizes:
            case = GatewayCase(policy, 1, n, "members")
            transport = case.transport()  # the benchmark's backends are not the gateway's memory
            gc.collect()
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            await case.start(transport)
            gc.collect()
            built = tracemalloc.get_traced_memory()[0] - base
            await case.run(3 * n + traffic)
            transport.requests.clear()  # what MockTransport recorded is the benchmark's, not the gateway's
            gc.collect()
            after = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
            await case.stop()
            results.append({"policy": policy, "members": n, "build_bytes": built, "after_traffic_bytes": after})
    return results


def per_member(memory: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for policy in POLICIES:
        rows = sorted((m for m in memory if m["policy"] == policy), key=lambda m: m["members"])
        lo, hi = rows[0], rows[-1]
        span = hi["members"] - lo["members"]
        out[policy] = {key: (hi[key] - lo[key]) / span for key in ("build_bytes", "after_traffic_bytes")}
    return out


def tables(result: dict[str, Any]) -> str:
    lines = ["### Per request, through the gateway (CPU µs, median (min–max) over rounds)", ""]
    lines.append("| policy | pools × members | CPU µs/request | ratio to the smallest | probes/request | gauges µs/s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for g in result["gateway"]:
        loops = g["loops_us_per_call"]
        lines.append(
            f"| {g['policy']} | {g['pools']} × {g['members_per_pool']:,} | {fmt(g['cpu_us_per_request'])} | "
            f"{fmt(g['ratio'], 2)}× | {g['probes_per_request']:.2f} | {loops['gauges'] + loops['history']:,.0f} |"
        )
    lines += ["", "### The policy alone (CPU µs per operation)", ""]
    ops = SANSIO_OPS
    lines.append("| policy | members | " + " | ".join(ops) + " |")
    lines.append("|---|---:|" + "---:|" * len(ops))
    by = {(s["policy"], s["members"], s["op"]): s for s in result["sansio"]}
    for policy in POLICIES:
        for n in SIZES:
            cells = []
            for op in ops:
                s = by[(policy, n, op)]
                cells.append(f"{s['us']['median']:,.2f} ({s['ratio']['median']:.2f}×)")
            lines.append(f"| {policy} | {n:,} | " + " | ".join(cells) + " |")
    lines += ["", "### Memory (tracemalloc, bytes held)", ""]
    lines.append("| policy | members | built and started | after traffic |")
    lines.append("|---|---:|---:|---:|")
    for m in result["memory"]:
        lines.append(f"| {m['policy']} | {m['members']:,} | {m['build_bytes']:,} | {m['after_traffic_bytes']:,} |")
    for policy, pm in result["memory_per_member"].items():
        lines.append(
            f"\n{policy}: {pm['build_bytes']:,.0f} bytes per member built, "
            f"{pm['after_traffic_bytes']:,.0f} after traffic"
        )
    return "\n".join(lines)


def goal(gateway: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-request CPU at 1,000 members over 2 (the median of the per-round ratios); the goal is <= 1.2."""
    out = {}
    for policy in POLICIES:
        row = next(
            g for g in gateway if g["policy"] == policy and g["series"] == "members" and g["members"] == SIZES[-1]
        )
        out[policy] = {"ratio_1000_vs_2": row["ratio"]["median"], "met": row["ratio"]["median"] <= 1.2}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    scheduler_module.GAUGE_INTERVAL_S = 3600.0  # measured on its own (loops_us_per_call)
    started = time.monotonic()
    gateway = await measure_gateway(args.rounds, args.requests, args.warmup, progress)
    sansio = measure_sansio(args.rounds, args.ops, progress)
    memory = await measure_memory(SIZES, args.warmup)
    return {
        "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:]),
        "meta": {
            "version": prequal_middleware.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "seconds": round(time.monotonic() - started, 1),
            # The sans-IO core's modules compiled by mypyc ([] when pure Python): this process's build.
            "core_compiled": list(compiled_modules()),
        },
        "settings": {
            "rounds": args.rounds,
            "requests": args.requests,
            "ops": args.ops,
            "warmup": args.warmup,
            "step_s": STEP_S,
            "sizes": list(SIZES),
            "prefixes": list(PREFIXES),
            "members_per_prefix": MEMBERS_PER_PREFIX,
            "policies": list(POLICIES),
        },
        "gateway": gateway,
        "sansio": sansio,
        "memory": memory,
        "memory_per_member": per_member(memory),
        "goal": goal(gateway),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="requests per configuration and round")
    parser.add_argument("--ops", type=int, default=5000, help="policy cycles per configuration and round")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before measuring (at least 3 per member)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 short rounds")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.ops, args.warmup = 2, 100, 200, 50
    print(f"sans-IO core: {describe()}", file=sys.stderr)
    result = asyncio.run(run(args))
    print(tables(result))
    for policy, g in result["goal"].items():
        print(f"\n{policy}: 1,000 members cost {g['ratio_1000_vs_2']:.2f}× 2 members per request (goal <= 1.2×)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

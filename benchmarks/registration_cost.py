"""Cost of one admin write (register, unregister) as a pool grows: 10, 100 and 1000 members.

    python -m benchmarks.registration_cost                     # 300 writes of each kind per size
    python -m benchmarks.registration_cost -n 1000 --sizes 10,1000 --json /tmp/r.json

Drives the real admin routes in-process: an ``httpx.AsyncClient`` over ``httpx.ASGITransport`` against a
started ``Gateway`` (memory registry, one pool with a health path, its scheduler running) whose
transport answers every health check with 200 at once, so no socket is involved. Each size is first
filled to ``n`` registered members (untimed); then one extra backend is registered and unregistered
again, ``-n`` times, each write timed from the request until the event loop has run what the write
woke (the scheduler's registry loop, the newcomer's first health check). The same is then done with
``Gateway.register`` / ``Gateway.unregister`` called directly (``direct``): the registration path
without the HTTP layer (routing, JSON, auth), which costs the same at every size. Reported: the median
and the 10th-90th percentiles in microseconds, per write kind and size. A table goes to stdout,
everything to ``--json`` (default ``benchmarks/results/registration-cost.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

import prequal_middleware
from prequal_middleware import AdminSettings, Gateway, HealthSettings, Timeouts, UpstreamPool
from prequal_middleware.registry.registration import RegistrationRequest
from prequal_middleware.transports.base import UpstreamRequest, UpstreamResponse

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "registration-cost.json"
TOKEN = "registration-cost-token"
POOL = "/api"
# Event-loop turns after a write: the registry loop wakes, syncs and applies; the newcomer's health
# check runs. More turns than needed cost the same at every size.
SETTLE_TURNS = 4
KINDS = ("register", "unregister", "direct_register", "direct_unregister")


class HealthyTransport:
    """Answers every request (the health checks) with an empty 200 at once."""

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        return UpstreamResponse(200, [], _empty())

    async def aclose(self) -> None:
        return None


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def backend_url(i: int) -> str:
    return f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000"


async def settle() -> None:
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)


async def measure(size: int, writes: int) -> dict[str, Any]:
    """µs per register and per unregister with ``size`` members in the pool, by HTTP and directly."""
    pool = UpstreamPool(POOL, health=HealthSettings(path="/healthz", interval_s=3600.0))
    admin = AdminSettings(token=TOKEN, max_members_per_pool=size + 10, max_writes_per_s=1e9)
    gateway = Gateway([pool], transport=HealthyTransport(), admin=admin)
    await gateway.startup()
    headers = {"authorization": f"Bearer {TOKEN}"}
    try:
        app = gateway.admin_app()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:

            async def post(kind: str, url: str) -> None:
                response = await client.post(f"/{kind}", json={"pool": POOL, "url": url}, headers=headers)
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"{kind} {url}: {response.status_code} {response.text}")

            for i in range(size):
                await post("register", backend_url(i))
            await settle()
            members = len(gateway.pools[POOL].members)
            if members != size:
                raise RuntimeError(f"expected {size} members, found {members}")
            samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
            extra = backend_url(size)
            request = RegistrationRequest(POOL, extra, ttl_s=admin.default_ttl_s)
            direct = {"register": gateway.register, "unregister": gateway.unregister}
            for _ in range(writes):
                for kind in ("register", "unregister"):
                    started = time.perf_counter()
                    await post(kind, extra)
                    await settle()
                    samples[kind].append((time.perf_counter() - started) * 1e6)
            for _ in range(writes):
                for kind in ("register", "unregister"):
                    started = time.perf_counter()
                    await direct[kind](request)
                    await settle()
                    samples[f"direct_{kind}"].append((time.perf_counter() - started) * 1e6)
    finally:
        await gateway.shutdown()
    return {"members": size, "writes": writes, **{kind: summary(s) for kind, s in samples.items()}}


def summary(samples: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(samples, n=10)
    return {
        "median_us": round(statistics.median(samples), 1),
        "p10_us": round(deciles[0], 1),
        "p90_us": round(deciles[-1], 1),
    }


def cell(stats: dict[str, float]) -> str:
    return f"{stats['median_us']:.1f} ({stats['p10_us']:.0f}-{stats['p90_us']:.0f})"


def table(results: list[dict[str, Any]]) -> str:
    header = "".join(f"  {kind.replace('_', ' ') + ' µs':>24}" for kind in KINDS)
    lines = [f"{'members':>8}{header}", f"{'':>8}" + f"  {'median (p10-p90)':>24}" * len(KINDS)]
    for r in results:
        cells = "".join(f"  {cell(r[kind]):>24}" for kind in KINDS)
        lines.append(f"{r['members']:>8}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--writes", type=int, default=300, help="writes of each kind per size [%(default)s]")
    parser.add_argument("--sizes", default="10,100,1000", help="pool sizes, comma-separated [%(default)s]")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the results here [%(default)s]")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for size in sizes:
        print(f"measuring {size} members ...", file=sys.stderr)
        results.append(asyncio.run(measure(size, args.writes)))
    config = {
        "writes": args.writes,
        "sizes": sizes,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "library": str(Path(prequal_middleware.__file__).parent),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"results written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

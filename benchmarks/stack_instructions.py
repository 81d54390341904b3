"""Instructions per proxied request of a whole proxy process, counted by callgrind: ``benchmarks.overhead``'s
saturated comparison without the machine's noise.

    python -m benchmarks.stack_instructions                     # aiohttp_raw, round robin, Prequal; 16 and 64 conns
    python -m benchmarks.stack_instructions --targets gateway_round_robin,gateway_prequal --connections 16
    python -m benchmarks.stack_instructions --baseline-rev 95f9084   # the gateway targets of a revision too

Why: ``benchmarks.overhead`` runs each target under wrk and compares req/s, and on this shared 2-core
machine the same comparison moves by ±10-15% between rounds and between runs (docs/benchmarks.md). A
ratio whose real value sits a few percent from a goal lands on either side of it from run to run.
``benchmarks.instructions`` counts without noise, but only our request path in process, on a mock
transport. This counts the whole process wrk measures: uvicorn, uvloop, httptools, the proxy and its
upstream client, all of user space.

What runs: each target exactly as ``benchmarks.overhead`` starts it (``benchmarks.overhead_targets``: one
uvicorn worker, uvloop + httptools, two backends answering 2 bytes on the other CPU), but under
``valgrind --tool=callgrind --instr-atstart=no``. Start-up runs uninstrumented; then ``callgrind_control``
turns instrumentation on, ``--warmup`` requests go out on each connection, the counters are zeroed,
``--requests`` requests go out on each of ``--connections`` keep-alive connections at once (a closed loop
like wrk's: the target under valgrind is the bottleneck, so requests queue and it batches them as under
wrk), and the counters are dumped. Instructions in that window divided by the requests in it is the count
per request. The backends' own counters give the upstream requests and probes per request in the window.

What it leaves out: the kernel (the system calls: per request a read and a write on each side, plus the
second write uvicorn makes for a response's head and body, alike for every target), and the cost of
waiting (cache misses, wake-ups). And timing: under valgrind the target runs ~50 times slower, so timers
fire ~50 times more often per request (uvicorn's 0.1 s tick adds ~1% to a count), and Prequal sees its
reports age ~50 times faster per request (the probes per request in the window say how many that
cost). Read it beside ``benchmarks.overhead``, not instead of it.

Needs valgrind (``callgrind_control`` comes with it) and ``taskset``. Every process it starts is
stopped by its PID. Writes ``benchmarks/results/stack-instructions.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.ports import free_port
from benchmarks.overhead import (
    HOST,
    PATH,
    TARGETS_BY_NAME,
    LaunchContext,
    Settings,
    baseline_targets,
    baseline_tree,
    core_compiled,
    library_revision,
    started,
    upstream_counters,
    upstreams_running,
    versions,
)

from .harness.results import write_results

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "stack-instructions.json"
DEFAULT_TARGETS = ("aiohttp_raw", "gateway_round_robin", "gateway_prequal")
BASELINE = "aiohttp_raw"
LOAD_CPU, PROXY_CPU = 0, 1
DUMP_TIMEOUT_S = 60.0
_SUMMARY = re.compile(rb"^summary:\s+(\d+)$", re.MULTILINE)
_TOTALS = re.compile(rb"^totals:\s+\d+", re.MULTILINE)
_REQUEST = f"GET {PATH} HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode("ascii")
_MAX_HEAD = 16_384


# --- the load: keep-alive connections, a fixed count each -----------------------------------------------


async def _one_connection(port: int, requests: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, limit=_MAX_HEAD)
    try:
        for _ in range(requests):
            writer.write(_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if head[9:12] != b"200":
                raise RuntimeError(f"the target answered {head[:64]!r}")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
    finally:
        writer.close()


async def _load(port: int, connections: int, requests: int) -> None:
    await asyncio.gather(*(_one_connection(port, requests) for _ in range(connections)))


def drive(port: int, connections: int, requests: int) -> None:
    """``requests`` GETs on each of ``connections`` keep-alive connections at once; every answer a 200."""
    asyncio.run(_load(port, connections, requests))


# --- callgrind ------------------------------------------------------------------------------------------


def control(pid: int, *args: str) -> None:
    """``callgrind_control <args> <pid>``: instrumentation on, zero, dump."""
    done = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {done.stdout}{done.stderr}")


def dumped_instructions(out_dir: Path) -> int:
    """The instructions in the first dump (``callgrind.<pid>.1``) since the counters were zeroed."""
    deadline = time.monotonic() + DUMP_TIMEOUT_S
    while time.monotonic() < deadline:
        for path in out_dir.glob("callgrind.*.1"):
            data = path.read_bytes()
            summary = _SUMMARY.search(data)
            if summary is not None and _TOTALS.search(data) is not None:  # totals: the file is whole
                return int(summary.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump in {out_dir} within {DUMP_TIMEOUT_S} s")


# --- one count ---------------------------------------------------------------------------------------------


def count(
    name: str,
    settings: Settings,
    cwd: Path | None,
    connections: int,
    warmup: int,
    requests: int,
    workdir: Path,
    keep_dumps: Path | None = None,
) -> dict[str, Any]:
    """One fresh target process under callgrind: instructions, upstream requests and probes per request.

    With ``keep_dumps``, the dump is kept there as ``<target>-c<connections>.callgrind`` (for
    ``callgrind_annotate``: where the instructions go, by function and by shared object)."""
    target = TARGETS_BY_NAME[name.partition("@")[0]]
    out_dir = Path(tempfile.mkdtemp(prefix="callgrind-", dir=workdir))
    port = free_port(HOST)
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/callgrind.%p"]
    argv += target.command(LaunchContext(port, settings.upstreams, workdir, None))
    with started(name, argv, PROXY_CPU, workdir, f"http://{HOST}:{port}{PATH}", cwd) as process:
        control(process.pid, "--instr=on")
        drive(port, connections, warmup)
        before = upstream_counters(settings.upstreams)
        control(process.pid, "--zero")
        drive(port, connections, requests)
        control(process.pid, "--dump")
        after = upstream_counters(settings.upstreams)
        instructions = dumped_instructions(out_dir)
    if keep_dumps is not None:
        keep_dumps.mkdir(parents=True, exist_ok=True)
        for dump in out_dir.glob("callgrind.*.1"):
            shutil.copyfile(dump, keep_dumps / f"{name.replace('@', '-at-')}-c{connections}.callgrind")
    shutil.rmtree(out_dir, ignore_errors=True)
    sent = connections * requests
    proxies = target.proxies
    return {
        "target": name,
        "connections": connections,
        "requests": sent,
        "instructions_per_request": round(instructions / sent),
        "probes_per_request": round((after[0] - before[0]) / sent, 4) if proxies else None,
        "upstream_requests_per_request": round((after[1] - before[1]) / sent, 4) if proxies else None,
    }


def ratios(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per connection count: every target against ``aiohttp_raw``, Prequal against round robin, and each
    ``<target>@<rev>`` against the current target (instructions; lower is less work)."""
    by = {(r["target"], r["connections"]): r["instructions_per_request"] for r in results}
    out: list[dict[str, Any]] = []
    for connections in dict.fromkeys(r["connections"] for r in results):
        pairs = [(t, BASELINE) for t, c in by if c == connections and t != BASELINE]
        pairs.append(("gateway_prequal", "gateway_round_robin"))
        pairs += [(t.partition("@")[0], t) for t, c in by if c == connections and "@" in t]
        for this, that in pairs:
            if (this, connections) in by and (that, connections) in by:
                value = by[this, connections] / by[that, connections]
                out.append({"connections": connections, "ratio": f"{this} / {that}", "instructions": round(value, 4)})
    return out


@contextlib.contextmanager
def _trees(rev: str | None, names: Sequence[str]) -> Iterator[tuple[list[tuple[str, Path | None]], bool]]:
    """The targets to count and the tree each runs from (ours, then ``rev``'s gateway targets), and
    whether ``rev``'s core was compiled."""
    chosen: list[tuple[str, Path | None]] = [(name, None) for name in names]
    if rev is None:
        yield chosen, False
        return
    with baseline_tree(rev) as tree:
        # Like with like: the revision's core compiled when ours is and it can be (before the compiled core
        # existed, a revision runs as it shipped: pure Python). The JSON says which ran.
        compiled = bool(core_compiled()) and (tree / "tools" / "build_core.py").exists()
        if compiled:
            build = [sys.executable, "tools/build_core.py", "build"]
            subprocess.run(build, cwd=tree, check=True, capture_output=True, timeout=900)
        yield chosen + [(t.name, tree) for t in baseline_targets(names, rev, tree)], compiled


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(
        rounds=1,
        duration_s=0,
        warmup_s=0,
        connections=args.connections,
        targets=args.targets,
        load_cpu=LOAD_CPU,
        proxy_cpu=PROXY_CPU,
    )
    results: list[dict[str, Any]] = []
    started_at = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="stack-instructions-") as tmp,
        _trees(args.baseline_rev, args.targets) as (chosen, baseline_compiled),
    ):
        workdir = Path(tmp)
        with upstreams_running(settings, workdir):
            for connections in args.connections:
                for name, cwd in chosen:
                    row = count(name, settings, cwd, connections, args.warmup, args.requests, workdir, args.keep_dumps)
                    results.append(row)
                    print(
                        f"{name:>28}  c={connections:<3} {row['instructions_per_request']:>10,} instructions/request"
                        f"  probes/req {row['probes_per_request']}",
                        file=sys.stderr,
                    )
    return {
        "config": {
            "targets": args.targets,
            "connections": args.connections,
            "warmup_per_connection": args.warmup,
            "requests_per_connection": args.requests,
            "upstreams": len(settings.upstreams),
            "baseline_rev": args.baseline_rev,
            "core_compiled": core_compiled(),
            "baseline_core_compiled": baseline_compiled,
            "versions": versions(),
            "revision": library_revision(),
            "elapsed_s": round(time.monotonic() - started_at, 1),
        },
        "results": results,
        "ratios": ratios(results),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| target | conns | instructions / request | probes / req | upstream req / req |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['target']} | {r['connections']} | {r['instructions_per_request']:,} "
            f"| {r['probes_per_request'] if r['probes_per_request'] is not None else '-'} "
            f"| {r['upstream_requests_per_request'] if r['upstream_requests_per_request'] is not None else '-'} |"
        )
    lines += ["", "| conns | ratio | instructions |", "|---|---|---:|"]
    lines += [f"| {r['connections']} | {r['ratio']} | {r['instructions']:.3f} |" for r in result["ratios"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stack_instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated overhead targets")
    parser.add_argument("--connections", default="16,64", help="comma-separated keep-alive connections [16,64]")
    parser.add_argument("--warmup", type=int, default=20, help="requests per connection before counting [20]")
    parser.add_argument("--requests", type=int, default=100, help="requests per connection counted [100]")
    parser.add_argument("--baseline-rev", help="also count the gateway targets of this git revision")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--keep-dumps", type=Path, help="keep each count's callgrind dump in this directory (for callgrind_annotate)"
    )
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in args.targets if t not in TARGETS_BY_NAME]
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c]
    except ValueError:
        parser.error("--connections: comma-separated integers")
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)} (known: {', '.join(sorted(TARGETS_BY_NAME))})")
    if not args.connections or min(args.connections) < 1 or args.requests < 1 or args.warmup < 0:
        parser.error("--connections and --requests >= 1, --warmup >= 0")
    for tool in ("valgrind", "callgrind_control", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install valgrind util-linux)")
    result = run(args)
    print(table(result))
    write_results(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

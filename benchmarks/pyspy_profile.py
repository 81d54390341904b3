"""Where a proxy target spends its CPU: py-spy samples of one target under wrk, grouped by package.

    pip install py-spy
    python -m benchmarks.pyspy_profile gateway_round_robin     # 10 s of samples under wrk -c16
    python -m benchmarks.pyspy_profile gateway_prequal --seconds 20 --raw /tmp/prequal.txt

The target and two backends start as ``benchmarks.overhead`` starts them (its ``started`` helper:
backends and wrk on CPU 0, the target alone on CPU 1), wrk runs for the sampling time plus 4 s, and
``py-spy record --format raw`` samples the target meanwhile. Printed: the share of samples whose innermost
frame is in each package or module of ours (self time), and wrk's req/s (lower than without the profiler).
Every process it starts is stopped by its PID. Needs ``wrk``, ``taskset`` and ``py-spy`` (ptrace allowed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.ports import free_port
from benchmarks.overhead import LaunchContext, python_target, started
from benchmarks.overhead_targets import APPS

PACKAGES = ("aiohttp", "uvicorn", "starlette", "prometheus_client", "asyncio", "yarl", "multidict", "httptools")
FRAME_FILE = re.compile(r"\(([^)]*?):\d+\)")


def group(frame: str) -> str:
    """A frame's part: ``prequal_middleware/<module>``, a third-party package, or the file name."""
    match = FRAME_FILE.search(frame)
    path = match.group(1) if match else frame
    if "prequal_middleware/" in path:
        return path[path.index("prequal_middleware/") :]
    for package in PACKAGES:
        if f"{package}/" in path:
            return package
    return path.rsplit("/", 1)[-1] or "(native)"


def self_shares(raw: Path) -> tuple[int, list[tuple[str, float]]]:
    """(samples, [(part, share of samples with its frame innermost)]) from py-spy's raw output."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        counts[group(stack.split(";")[-1])] += int(n)
    return total, [(part, count / total) for part, count in counts.most_common()] if total else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyspy_profile", description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=[name for name in APPS if name != "backend"])
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time [10]")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections [16]")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second [250]")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw (collapsed stacks) output here")
    parser.add_argument("--native", action="store_true", help="sample native frames too (compiled core, C code)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("wrk", "taskset", "py-spy") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (pip install py-spy; apt-get install wrk util-linux)")
    workdir = Path(tempfile.mkdtemp(prefix="pyspy-"))
    raw = args.raw or workdir / f"{args.target}.txt"
    ports = [free_port() for _ in range(3)]
    upstreams = [f"http://127.0.0.1:{p}" for p in ports[1:]]
    backend = python_target("backend")
    target_argv = python_target(args.target)(LaunchContext(ports[0], upstreams, workdir, None))
    # Started and pinned as benchmarks.overhead does: backends and wrk on CPU 0, the target on CPU 1.
    with contextlib.ExitStack() as stack:
        for port, url in zip(ports[1:], upstreams, strict=True):
            argv_b = backend(LaunchContext(port, [], workdir, None))
            stack.enter_context(started(f"backend-{port}", argv_b, 0, workdir, url + "/x"))
        target = stack.enter_context(started(args.target, target_argv, 1, workdir, f"http://127.0.0.1:{ports[0]}/x"))
        wrk_argv = ["taskset", "-c", "0", "wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds + 4:g}s"]
        wrk = subprocess.Popen([*wrk_argv, f"http://127.0.0.1:{ports[0]}/x"], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(2.0)  # warm up before sampling
            record = ["py-spy", "record", "--pid", str(target.pid), "--duration", f"{args.seconds:g}"]
            record += ["--rate", str(args.rate), "--format", "raw", "--output", str(raw)]
            # --native reads native stacks, which needs the target paused at each sample.
            record.append("--native" if args.native else "--nonblocking")
            subprocess.run(record, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out, _ = wrk.communicate(timeout=args.seconds + 30)
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
    total, shares = self_shares(raw)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    print(f"{args.target}: {total} samples, wrk {rps.group(1) if rps else '?'} req/s under the profiler; raw: {raw}")
    print("| part | self time |\n|---|---:|")
    for part, share in shares:
        if share >= 0.001:
            print(f"| {part} | {share:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

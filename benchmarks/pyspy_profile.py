"""Where a proxy target spends its CPU: py-spy samples of one target under wrk, grouped by package.

    pip install py-spy
    python -m benchmarks.pyspy_profile gateway_round_robin     # 10 s of samples under wrk -c16
    python -m benchmarks.pyspy_profile gateway_prequal --seconds 20 --raw /tmp/prequal.txt

The target and two backends start as ``benchmarks.overhead`` starts them (``benchmarks.overhead_targets``,
backends and wrk on CPU 0, the target alone on CPU 1), wrk runs for the sampling time plus 4 s, and
``py-spy record --format raw`` samples the target meanwhile. Printed: the share of samples whose innermost
frame is in each package or module of ours (self time), and wrk's req/s (lower than without the profiler).
Every process it starts is stopped by its PID. Needs ``wrk``, ``taskset`` and ``py-spy`` (ptrace allowed).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.overhead import free_port

REPO = Path(__file__).resolve().parents[1]
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


def start(cpu: int, *argv: str) -> subprocess.Popen[bytes]:
    command = ["taskset", "-c", str(cpu), sys.executable, "-m", "benchmarks.overhead_targets", *argv]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, deadline_s: float = 15.0) -> None:
    import httpx

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/x", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the target on port {port} did not answer within {deadline_s:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyspy_profile", description=__doc__.split("\n")[0])
    targets = ["aiohttp_raw", "gateway_round_robin", "gateway_prequal", "gateway_round_robin_h1", "gateway_prequal_h1"]
    parser.add_argument("target", choices=targets)
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time [10]")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections [16]")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second [250]")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw (collapsed stacks) output here")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("wrk", "taskset", "py-spy") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (pip install py-spy; apt-get install wrk util-linux)")
    raw = args.raw or Path(tempfile.mkdtemp(prefix="pyspy-")) / f"{args.target}.txt"
    ports = [free_port() for _ in range(3)]
    upstreams = ",".join(f"http://127.0.0.1:{p}" for p in ports[1:])
    procs = [start(0, "backend", "--port", str(p)) for p in ports[1:]]
    try:
        for p in ports[1:]:
            wait_ready(p)
        target = start(1, args.target, "--port", str(ports[0]), "--upstreams", upstreams)
        procs.append(target)
        wait_ready(ports[0])
        wrk_argv = ["taskset", "-c", "0", "wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds + 4:g}s"]
        wrk = subprocess.Popen([*wrk_argv, f"http://127.0.0.1:{ports[0]}/x"], stdout=subprocess.PIPE, text=True)
        procs.append(wrk)  # type: ignore[arg-type]
        time.sleep(2.0)  # warm up before sampling
        record = ["py-spy", "record", "--pid", str(target.pid), "--duration", f"{args.seconds:g}"]
        record += ["--rate", str(args.rate), "--format", "raw", "--output", str(raw), "--nonblocking"]
        subprocess.run(record, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = wrk.communicate(timeout=args.seconds + 30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
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

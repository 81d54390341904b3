"""Instructions per proxied request, counted by valgrind: a measure of the gateway's own cost that a noisy
machine does not move.

    python -m benchmarks.instructions                          # round robin and Prequal, this tree
    python -m benchmarks.instructions --baseline-rev 7dd6c13   # the same from a worktree of a revision too
    python -m benchmarks.instructions --policies prequal --requests 500 --json /tmp/i.json

Why: on a shared 2-core machine, req/s and CPU per request move by ±15% between rounds of the same code
(docs/benchmarks.md), so a change worth 2% is not seen by ``benchmarks.overhead`` without many rounds.
``valgrind --tool=callgrind`` counts the instructions a process executes, whatever else the machine is
doing: the same tree gives the same count within 0.5% (Prequal's timers read the real clock, which moves
50 times faster than the process under valgrind; round robin repeats within 0.01%).

What runs: the real request path in process, as ``benchmarks.scale``'s ``gateway`` measurement drives it
(``GatewayCase``: a started ``Gateway`` behind ``PrequalMiddleware`` called as an ASGI app, one pool of
``--members`` members answered by ``MockTransport`` with a piggybacked load report, a fake clock moving
1 ms per request, probes answered in process). Each (tree, policy) runs twice under callgrind, with
``--warmup`` requests and then with ``--warmup`` + ``--requests``; the difference divided by
``--requests`` is the count per request, so start-up and imports cancel out. ``PYTHONHASHSEED=0`` fixes
string hashing, which would otherwise vary the count slightly from run to run.

What it leaves out: sockets and the kernel (the same for every policy), and anything that depends on
timing (batching under load). It says how much work the Python side does per request, not how fast the
machine does it: ``benchmarks.overhead`` remains the measure of throughput. Run it on the build you
mean to compare: the in-place compiled core (``python tools/build_core.py build``) counts; with
``--baseline-rev`` the baseline tree is built the same way (compiled when this tree's core is).

Needs valgrind (Debian's ``valgrind``). Writes ``benchmarks/results/instructions.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "instructions.json"
POLICIES = ("round_robin", "prequal")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


# The measured process: run with ``python -c`` from the tree being measured, so that it imports that
# tree's package and ``benchmarks.scale`` (present since issue 14), not this file's.
DRIVER = """
import asyncio, sys
from benchmarks.scale import GatewayCase

async def main(policy, members, warmup, requests):
    case = GatewayCase(policy, 1, members, "members")
    await case.start(case.transport())
    await case.run(warmup)
    if requests:
        await case.run(requests)
    await case.gateway.shutdown()
    if case.errors:
        raise SystemExit(f"{case.errors} requests did not get a 200")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


def instructions(tree: Path, policy: str, members: int, warmup: int, requests: int, keep: Path | None = None) -> int:
    """Instructions valgrind counted for one run of ``DRIVER`` from ``tree`` (its package, its benchmarks);
    callgrind's profile goes to ``keep`` (a file) if given, for ``callgrind_annotate``."""
    out = str(keep) if keep is not None else "/dev/null"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", DRIVER]
    argv += [policy, str(members), str(warmup), str(requests)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=1800, check=False)
    match = _REFS.search(done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{policy} from {tree} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def per_request(tree: Path, policy: str, members: int, warmup: int, requests: int, keep: Path | None = None) -> float:
    """Instructions per request: two runs, with and without ``requests`` after the warm-up, differenced.

    With ``keep`` (a directory), both runs' profiles are kept there as ``<tree directory>-<policy>-{0,1}.out``:
    ``callgrind_annotate --inclusive=yes`` on each, differenced per function, says where the work went.
    """
    files = [keep / f"{tree.name}-{policy}-{i}.out" for i in (0, 1)] if keep is not None else [None, None]
    before = instructions(tree, policy, members, warmup, 0, files[0])
    return (instructions(tree, policy, members, warmup, requests, files[1]) - before) / requests


@contextlib.contextmanager
def baseline_tree(rev: str, compiled: bool) -> Iterator[Path]:
    """A detached worktree of ``rev`` (its core compiled in place when ``compiled``), removed afterwards."""
    from benchmarks.overhead import baseline_tree as worktree

    with worktree(rev) as tree:
        if compiled:
            build = [sys.executable, "tools/build_core.py", "build"]
            subprocess.run(build, cwd=tree, check=True, capture_output=True, timeout=900)
        yield tree


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.overhead import core_compiled, library_revision

    compiled = bool(core_compiled())
    trees: list[tuple[str, Path]] = [("current", REPO)]
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.baseline_rev:
            trees.append((args.baseline_rev, stack.enter_context(baseline_tree(args.baseline_rev, compiled))))
        for label, tree in trees:
            for policy in args.policies:
                count = per_request(tree, policy, args.members, args.warmup, args.requests, args.keep)
                results.append({"tree": label, "policy": policy, "instructions_per_request": round(count)})
                print(f"{label:>10}  {policy:<12} {count:>10,.0f} instructions per request", file=sys.stderr)
    return {
        "config": {
            "members": args.members,
            "warmup": args.warmup,
            "requests": args.requests,
            "baseline_rev": args.baseline_rev,
            "core_compiled": list(core_compiled()),
            "python": sys.version.split()[0],
            "library": library_revision(),
        },
        "results": results,
        "ratios": ratios(results),
    }


def ratios(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``prequal / round_robin`` per tree, and ``current / <rev>`` per policy, where both were measured."""
    count = {(r["tree"], r["policy"]): r["instructions_per_request"] for r in results}
    out: dict[str, float] = {}
    for tree in dict.fromkeys(r["tree"] for r in results):
        if (tree, "prequal") in count and (tree, "round_robin") in count:
            out[f"{tree}: prequal / round_robin"] = round(count[tree, "prequal"] / count[tree, "round_robin"], 4)
    for (tree, policy), value in count.items():
        if tree != "current" and ("current", policy) in count:
            out[f"{policy}: current / {tree}"] = round(count["current", policy] / value, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated [round_robin,prequal]")
    parser.add_argument("--members", type=int, default=2, help="backends in the pool [2]")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before counting [1000]")
    parser.add_argument("--requests", type=int, default=5000, help="requests counted [5000]")
    parser.add_argument("--baseline-rev", help="also count from a git worktree of this revision")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--keep", type=Path, help="keep callgrind's profiles in this directory (callgrind_annotate)")
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown or args.requests < 1 or args.members < 1 or args.warmup < 0:
        parser.error(f"policies are {', '.join(POLICIES)}; requests and members >= 1; warmup >= 0")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    if args.keep is not None:
        args.keep = args.keep.resolve()
        args.keep.mkdir(parents=True, exist_ok=True)
    result = run(args)
    print("\n| tree | policy | instructions per request |\n|---|---|---:|")
    for r in result["results"]:
        print(f"| {r['tree']} | {r['policy']} | {r['instructions_per_request']:,} |")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

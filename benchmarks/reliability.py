"""Write docs/reliability.md: run the reliability suite and copy the page it rendered.

    python -m benchmarks.reliability [-- PYTEST_ARGS...]
    python -m benchmarks.reliability --from build/reliability/reliability.md

The suite (``pytest tests/reliability``) only checks: it renders its page into
``build/reliability/reliability.md`` (or ``$PREQUAL_RELIABILITY_REPORT``), and only when every case ran
and passed. This runs it with the page sent to a temporary file and copies that file to docs/ when the
run passed; ``--from`` copies a page an earlier run rendered. docs/ is left as it was otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
RESULT_ENV = "PREQUAL_RELIABILITY_REPORT"  # read by tests/reliability/report.py


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="a page the suite rendered; skips the run")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.source is not None:
        return _install(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "reliability.md"
        env = {**os.environ, RESULT_ENV: str(rendered)}
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/reliability", *args.pytest_args]
        code = subprocess.run(command, cwd=REPO, env=env, check=False).returncode
        if code != 0 or not rendered.is_file():
            print(f"reliability: {DOC} left as it was (pytest exit {code}, no complete page)", file=sys.stderr)
            return code or 1
        return _install(rendered)


def _install(source: Path) -> int:
    if not source.is_file():
        print(f"reliability: no page at {source}", file=sys.stderr)
        return 1
    shutil.copyfile(source, DOC)
    print(f"reliability: wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

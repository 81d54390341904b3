"""Progress lines: on stderr, flushed at once, so that stdout (tables, results) can be redirected alone."""

from __future__ import annotations

import sys


def progress(line: str) -> None:
    """Write one progress line to stderr now."""
    print(line, file=sys.stderr, flush=True)

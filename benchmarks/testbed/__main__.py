"""``python -m benchmarks.testbed``: see ``benchmarks/testbed/__init__.py`` and docs/benchmarks.md."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Writing a benchmark's results: one JSON file, its directory made, its path said on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def write_results(path: Path, result: dict[str, Any]) -> None:
    """``result`` as indented JSON at ``path`` (parents created); ``written: <path>`` on stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written: {path}", file=sys.stderr)

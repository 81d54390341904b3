"""The gateway's data-plane suites on the opt-in ``AiohttpTransport``.

``H1Transport`` is the default, so the whole suite runs on it; this runs the data-plane suites again
with ``PREQUAL_TEST_TRANSPORT=aiohttp`` (``tests/conftest.py``), which puts ``AiohttpTransport`` under
every gateway built without a transport of its own. The reliability suite can be run the same way:
``PREQUAL_TEST_TRANSPORT=aiohttp PREQUAL_TRANSPORT=aiohttp pytest tests/reliability``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gateway_suites_pass_on_aiohttp() -> None:
    env = {**os.environ, "PREQUAL_TEST_TRANSPORT": "aiohttp"}
    suites = ["tests/test_gateway_http.py", "tests/test_gateway_lifecycle.py", "tests/test_quickstart.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout

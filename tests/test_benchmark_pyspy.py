"""``benchmarks.pyspy_profile``'s reading of py-spy's raw output (the profiling run itself needs ptrace)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.pyspy_profile import group, self_shares

RAW = """\
Runner.run (asyncio/runners.py:118);Forwarder.http (prequal_middleware/gateway/forwarding.py:200) 3
Runner.run (asyncio/runners.py:118);ClientRequest.send (aiohttp/client_reqrep.py:1752) 5
Runner.run (asyncio/runners.py:118) 2
"""


def test_frames_are_grouped_by_our_module_or_their_package() -> None:
    assert group("Forwarder.http (/x/site-packages/prequal_middleware/gateway/forwarding.py:200)") == (
        "prequal_middleware/gateway/forwarding.py"
    )
    assert group("ClientRequest.send (/x/site-packages/aiohttp/client_reqrep.py:1752)") == "aiohttp"
    assert group("foo (/usr/lib/python3.11/json/decoder.py:3)") == "decoder.py"


def test_self_time_counts_the_innermost_frame(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(RAW)
    total, shares = self_shares(raw)
    assert total == 10
    assert dict(shares) == pytest.approx(
        {"aiohttp": 0.5, "prequal_middleware/gateway/forwarding.py": 0.3, "asyncio": 0.2}
    )
    assert [part for part, _ in shares] == ["aiohttp", "prequal_middleware/gateway/forwarding.py", "asyncio"]

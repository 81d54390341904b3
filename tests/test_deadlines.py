"""``Deadlines``: one loop timer per delay, keys fired in order once due, never before (beyond 1 ms)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from prequal_middleware.transports.deadlines import EARLY_S, Deadlines

LOOPS: list[Callable[[Coroutine[Any, Any, None]], None]] = [asyncio.run, uvloop.run]


def fired_log() -> tuple[Deadlines[str], list[tuple[str, float]], dict[str, float]]:
    fired: list[tuple[str, float]] = []
    armed_at: dict[str, float] = {}

    def fire(key: str) -> None:
        fired.append((key, asyncio.get_running_loop().time()))

    deadlines: Deadlines[str] = Deadlines(fire)
    return deadlines, fired, armed_at


@pytest.mark.parametrize("run", LOOPS, ids=["asyncio", "uvloop"])
def test_keys_fire_once_due_in_order_and_disarmed_ones_never(run: Callable[..., None]) -> None:
    deadlines, fired, armed_at = fired_log()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for key in "abcd":
            armed_at[key] = loop.time()
            deadlines.arm(key, 0.05)
            await asyncio.sleep(0.01)
        deadlines.disarm("b")
        deadlines.disarm("nothing")  # not armed: no effect
        armed_at["e"] = loop.time()
        deadlines.arm("e", 0.02)  # a shorter delay armed later is due first
        assert len(deadlines) == 4
        await asyncio.sleep(0.15)
        assert len(deadlines) == 0

    run(main())
    assert [key for key, _ in fired] == ["a", "e", "c", "d"]
    delays = {"a": 0.05, "c": 0.05, "d": 0.05, "e": 0.02}
    for key, at in fired:
        assert at >= armed_at[key] + delays[key] - EARLY_S, key


@pytest.mark.parametrize("run", LOOPS, ids=["asyncio", "uvloop"])
def test_rearming_starts_the_delay_again(run: Callable[..., None]) -> None:
    deadlines, fired, _ = fired_log()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines.arm("a", 0.05)
        deadlines.arm("b", 0.05)
        await asyncio.sleep(0.03)
        again = loop.time()
        deadlines.arm("a", 0.05)
        await asyncio.sleep(0.1)
        assert [key for key, _ in fired] == ["b", "a"]
        assert fired[1][1] >= again + 0.05 - EARLY_S

    run(main())


def test_a_failing_callback_is_logged_and_the_others_still_fire(caplog: pytest.LogCaptureFixture) -> None:
    fired: list[str] = []

    def fire(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        fired.append(key)

    deadlines: Deadlines[str] = Deadlines(fire)

    async def main() -> None:
        for key in ("x", "bad", "y"):
            deadlines.arm(key, 0.01)
        await asyncio.sleep(0.05)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert fired == ["x", "y"]
    assert "a deadline's callback failed" in caplog.text


def test_a_new_event_loop_forgets_what_the_old_one_armed() -> None:
    fired: list[str] = []
    deadlines: Deadlines[str] = Deadlines(fired.append)

    async def arm_and_leave() -> None:
        deadlines.arm("old", 0.01)

    async def arm_and_wait() -> None:
        deadlines.arm("new", 0.01)
        assert len(deadlines) == 1
        await asyncio.sleep(0.05)

    asyncio.run(arm_and_leave())
    asyncio.run(arm_and_wait())
    assert fired == ["new"]

"""Rounds: the contenders interleaved, their order rotated each round (no one always first or last)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting at position ``round_index`` (mod their number), wrapping around."""
    k = round_index % len(items) if items else 0
    return [*items[k:], *items[:k]]

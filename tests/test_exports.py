"""The public API: a sorted ``__all__`` whose every name imports, and a version hatch can read."""

from __future__ import annotations

import re

import prequal_middleware
import prequal_middleware.core


def test_all_is_sorted_and_importable() -> None:
    for module in (prequal_middleware, prequal_middleware.core):
        names = module.__all__
        assert names == sorted(names, key=_isort_style), f"{module.__name__}.__all__ is not sorted"
        missing = [n for n in names if not hasattr(module, n)]
        assert missing == [], missing


def _isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions (and dunders)."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


def test_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", prequal_middleware.__version__)


def test_py_typed_ships() -> None:
    from importlib.resources import files

    assert files("prequal_middleware").joinpath("py.typed").is_file()

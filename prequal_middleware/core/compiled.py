"""Which build of the sans-IO core this interpreter runs: mypyc-compiled modules or pure Python.

Release wheels compile the load-balancing policies with mypyc (the ``include`` list of the hatch-mypyc
build hook in pyproject.toml); the sdist, ``pip install .`` and a source checkout run them as plain
Python unless they were built in place (``python tools/build_core.py build``). The test session's
header and the benchmarks' results say which one they ran, from here.
"""

from __future__ import annotations

import sys
import types
from importlib.machinery import EXTENSION_SUFFIXES

__all__ = ["compiled_modules", "describe", "is_compiled"]


def is_compiled(function: object) -> bool:
    """Whether ``function``, a module-level function of the calling module, runs compiled by mypyc.

    A compiled module's functions are builtins, not Python functions. The compiled modules ask it once,
    at import, to take a path that is cheaper compiled (``probe_pool``'s sorted history, ``load_report``'s
    digits), keeping the one that is cheaper in plain Python.
    """
    return not isinstance(function, types.FunctionType)


def compiled_modules() -> tuple[str, ...]:
    """The core's modules loaded from extension modules (compiled), sorted full names; () when pure Python.

    Reads the modules already imported: importing this module imports its package,
    ``prequal_middleware.core``, whose ``__init__`` imports every policy module.
    """
    prefix = __name__.rpartition(".")[0] + "."
    suffixes = tuple(EXTENSION_SUFFIXES)
    return tuple(
        sorted(
            name
            for name, module in list(sys.modules.items())
            if name.startswith(prefix) and str(getattr(module, "__file__", None) or "").endswith(suffixes)
        )
    )


def describe(modules: tuple[str, ...] | list[str] | None = None) -> str:
    """``"compiled (mypyc) 5 modules"`` or ``"pure Python"``, for ``modules`` (default: :func:`compiled_modules`)."""
    found = compiled_modules() if modules is None else modules
    return f"compiled (mypyc) {len(found)} modules" if found else "pure Python"

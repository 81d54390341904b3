"""``prequal_middleware.core`` imports nothing outside the standard library.

One exception: where the core runs compiled (a mypyc wheel, or ``tools/build_core.py build``), the compiled
modules load mypyc's runtime, a top-level extension module named ``<hash>__mypyc`` built with them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

# Runs in a fresh interpreter. The parent package is stubbed so that its __init__ (which wires in
# starlette, aiohttp, ...) does not run; then every module of the core is imported.
CHECK = """
import importlib, importlib.util, json, pkgutil, sys, types
spec = importlib.util.find_spec("prequal_middleware")
stub = types.ModuleType("prequal_middleware")
stub.__path__ = list(spec.submodule_search_locations)
sys.modules["prequal_middleware"] = stub
before = set(sys.modules)
core = importlib.import_module("prequal_middleware.core")
for info in pkgutil.iter_modules(core.__path__):
    importlib.import_module("prequal_middleware.core." + info.name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""
# mypyc names its runtime module after a hash of the compiled modules' names (mypyc.build.group_name: the
# first 20 hex digits of a SHA-1; with one module compiled, after that module, so it is one of ours).
MYPYC_RUNTIME = re.compile(r"[0-9a-f]{20}__mypyc")


def foreign_modules(loaded: set[str]) -> list[str]:
    """The modules in ``loaded`` that are neither ours, nor the standard library, nor mypyc's runtime."""
    return sorted(
        m
        for m in loaded
        if not m.startswith("prequal_middleware")
        and m.split(".")[0] not in sys.stdlib_module_names
        and not MYPYC_RUNTIME.fullmatch(m)
    )


def test_core_imports_only_the_standard_library() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    ours = {m for m in loaded if m.startswith("prequal_middleware")}
    foreign = foreign_modules(loaded)
    assert {"prequal_middleware.core.probe_pool", "prequal_middleware.core.load_tracker"} <= ours
    assert foreign == [], f"core pulled in non-stdlib modules: {foreign}"


def test_only_the_standard_library_and_mypycs_runtime_pass() -> None:
    assert foreign_modules({"json", "os.path", "prequal_middleware.core.policy", "0123456789abcdef0123__mypyc"}) == []
    for outsider in ("starlette", "mypy_extensions", "librt", "x__mypyc", "0123456789abcdef0123__mypyc.evil"):
        assert foreign_modules({outsider}) == [outsider]

"""``prequal_middleware.core`` imports nothing outside the standard library."""

from __future__ import annotations

import json
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


def test_core_imports_only_the_standard_library() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    ours = {m for m in loaded if m.startswith("prequal_middleware")}
    foreign = sorted(m for m in loaded - ours if m.split(".")[0] not in sys.stdlib_module_names)
    assert {"prequal_middleware.core.probe_pool", "prequal_middleware.core.load_tracker"} <= ours
    assert foreign == [], f"core pulled in non-stdlib modules: {foreign}"

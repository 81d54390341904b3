"""The package's requirements say what it imports: every third-party import is declared, every declared
requirement is imported (what arrives through another package's requirements can vanish with its next
release)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prequal_middleware"

# Declared but not imported by the package, and why.
NOT_IMPORTED: dict[str, str] = {}
# Imported only by a module that needs an extra, and the extra.
EXTRAS = {"redis": "redis", "fastapi": "fastapi", "opentelemetry-api": "otel"}
# Namespace packages several distributions install into, and the one whose modules we import
# (``opentelemetry.trace`` and ``opentelemetry.propagate`` are the API's; the SDK is the user's choice).
NAMESPACES = {"opentelemetry": "opentelemetry-api"}


def _requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", spec)
    assert match, spec
    return match.group(0).lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(spec) for spec in project["dependencies"]}
    extras = {
        name: {_requirement_name(spec) for spec in specs} for name, specs in project["optional-dependencies"].items()
    }
    return base, extras


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import nodes under ``if TYPE_CHECKING:``: the type checker's (and mypyc's), not run."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            found.update(n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return found


def _imported_distributions(*, at_run_time: bool = False) -> set[str]:
    modules: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree) if at_run_time else set()
        for node in ast.walk(tree):
            if node in skipped:
                continue
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m != "prequal_middleware"}
    mapping = packages_distributions()
    return {
        dist.lower().replace("_", "-")
        for module in third_party
        for dist in ([NAMESPACES[module]] if module in NAMESPACES else mapping.get(module, [module]))
    }


def test_every_third_party_import_is_declared() -> None:
    """Imports under ``TYPE_CHECKING`` are left out: mypy_extensions' ``mypyc_attr`` is read by the type
    checker and mypyc only (core/mypyc_compat.py), never imported at run time."""
    base, extras = _declared()
    undeclared = {
        dist
        for dist in _imported_distributions(at_run_time=True)
        if dist not in base and not (dist in EXTRAS and dist in extras[EXTRAS[dist]])
    }
    assert undeclared == set()


def test_every_declared_requirement_is_imported() -> None:
    base, _ = _declared()
    assert base - _imported_distributions() == set(NOT_IMPORTED)

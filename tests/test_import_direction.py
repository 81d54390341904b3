"""The import direction of architecture.md section 3, read from the source with ``ast``.

Arrows point down: ``core/`` imports nothing of ours; ``transports/`` and ``registry/`` import only
``core/``, ``config`` and ``exceptions``; ``gateway/`` never imports ``admin/`` at module level (only
inside ``admin_app()``/``admin_router()``); ``backend/`` (the server half) never imports ``gateway/``.
Every import counts, those under ``if TYPE_CHECKING:`` and inside functions included, except where a
rule says "module level".
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import prequal_middleware

PACKAGE = Path(prequal_middleware.__file__).parent
ROOT = "prequal_middleware"


def modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    base = parts[: len(parts) - node.level]
    return ".".join([*base, node.module] if node.module else base)


def _names(path: Path, node: ast.stmt) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        module = _absolute(path, node)
        for alias in node.names:
            # ``from prequal_middleware import admin`` imports the subpackage: name it in full.
            yield f"{module}.{alias.name}" if module == ROOT else module


def imports(path: Path, *, module_level_only: bool = False) -> list[str]:
    """Every package this file imports from ``prequal_middleware`` (``from x import y`` as ``x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and module_level_only:
                continue  # run when called, not when the module is imported
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend(name for name in _names(path, child) if name.split(".")[0] == ROOT)
            visit(child)

    visit(tree)
    return found


def within(name: str, *allowed: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def violations(subpackage: str, allowed: tuple[str, ...], *, module_level_only: bool = False) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in modules(subpackage)
        for name in imports(path, module_level_only=module_level_only)
        if not within(name, *allowed)
    ]


def forbidden(subpackage: str, banned: str, *, module_level_only: bool = False) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in modules(subpackage)
        for name in imports(path, module_level_only=module_level_only)
        if within(name, banned)
    ]


def test_every_subpackage_has_modules() -> None:
    # A rename that leaves a rule looking at an empty folder would pass every test below.
    for subpackage in ("core", "transports", "registry", "gateway", "admin", "backend"):
        assert modules(subpackage), f"no modules under {subpackage}/"


def test_core_imports_nothing_of_ours() -> None:
    assert violations("core", (f"{ROOT}.core",)) == []


@pytest.mark.parametrize("subpackage", ["transports", "registry"])
def test_transports_and_registry_import_only_core_config_and_exceptions(subpackage: str) -> None:
    allowed = (f"{ROOT}.{subpackage}", f"{ROOT}.core", f"{ROOT}.config", f"{ROOT}.exceptions")
    assert violations(subpackage, allowed) == []


def test_gateway_does_not_import_admin_at_module_level() -> None:
    assert forbidden("gateway", f"{ROOT}.admin", module_level_only=True) == []


def test_backend_does_not_import_the_gateway() -> None:
    assert forbidden("backend", f"{ROOT}.gateway") == []


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    # The rules above pass on an empty list; this pins that the reader finds each kind of import.
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import prequal_middleware.config\n"
        "from prequal_middleware.admin.status import describe\n"
        "from prequal_middleware import gateway\n"
        "if TYPE_CHECKING:\n"
        "    from prequal_middleware.registry import Registry\n"
        "def later():\n"
        "    from prequal_middleware.backend import load_reporting\n"
    )
    everything = [
        "prequal_middleware.config",
        "prequal_middleware.admin.status",
        "prequal_middleware.gateway",
        "prequal_middleware.registry",
        "prequal_middleware.backend",
    ]
    assert imports(source) == everything
    assert imports(source, module_level_only=True) == everything[:-1]


def test_importing_the_package_loads_no_admin_module() -> None:
    # What the rules are for: a user who never mounts the admin app never loads it.
    code = "import sys, prequal_middleware; print([m for m in sys.modules if m.startswith(f'{sys.argv[1]}.admin')])"
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


VALIDATION = ("pydantic", "pydantic_core", "pydantic_settings", "fastapi")

_SERVE_ONE_REQUEST = """
import sys
import httpx
from starlette.applications import Starlette
from prequal_middleware import Gateway, PrequalMiddleware, UpstreamPool
from prequal_middleware.testing import CannedResponse, MockTransport
from tests.servers import serve

backend = "http://a.invalid:80"
transport = MockTransport({backend: CannedResponse(200, [(b"content-type", b"text/plain")], b"hi")})
gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[backend])], transport=transport)
with serve(PrequalMiddleware(Starlette(), gateway=gateway)) as server:
    assert httpx.get(server.url + "/api/x").text == "hi"
print(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:]))
"""


def test_the_request_path_never_loads_pydantic() -> None:
    # pydantic validates configuration and admin bodies; a gateway built in code and serving requests
    # never loads it (nor FastAPI), so the request path cannot pay for it.
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE_REQUEST, *VALIDATION],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("subpackage", ["core", "transports", "gateway", "backend"])
def test_the_request_path_modules_import_no_validation_library(subpackage: str) -> None:
    # The rule behind the test above, for every module (a lazy import there would only load on some path).
    found = [
        f"{path.relative_to(PACKAGE)} imports {alias}"
        for path in modules(subpackage)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if alias.split(".")[0] in VALIDATION
    ]
    assert found == []


def test_admin_app_needs_no_fastapi() -> None:
    # admin_app() is plain Starlette: a Starlette user mounts it without FastAPI installed.
    code = (
        "import sys; from prequal_middleware import Gateway, UpstreamPool; "
        "Gateway(pools=[UpstreamPool('/api')]).admin_app(); print('fastapi' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

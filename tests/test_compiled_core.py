"""Which build of the sans-IO core runs, and the guard against a stale in-place build.

``prequal_middleware.core.compiled.compiled_modules()`` names the core modules loaded from extension
modules; ``tools/build_core.py`` compiles the modules pyproject.toml's hatch-mypyc hook lists in place
(tox's ``py`` env does, so this suite runs once compiled and once pure in CI) and removes them again;
tests/conftest.py stops a session whose compiled modules are older than their sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from prequal_middleware.core.compiled import describe
from tools import build_core

ROOT = Path(__file__).resolve().parent.parent
REPORT = "import json; from prequal_middleware.core.compiled import compiled_modules as c; print(json.dumps(c()))"
EXT = EXTENSION_SUFFIXES[0]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _copy_package(dest: Path) -> None:
    """The package's sources only: no extension module, no bytecode."""
    shutil.copytree(
        ROOT / "prequal_middleware", dest / "prequal_middleware", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )


def test_the_listed_modules_are_the_policies_and_the_report_parser() -> None:
    assert build_core.listed_modules() == [
        "prequal_middleware.core.probe_pool",
        "prequal_middleware.core.outliers",
        "prequal_middleware.core.policy",
        "prequal_middleware.core.policies",
        "prequal_middleware.core.prequal",
        "prequal_middleware.core.load_report",
    ]


def test_a_pure_tree_reports_no_compiled_module(tmp_path: Path) -> None:
    _copy_package(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", REPORT], cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []


def test_an_in_place_build_reports_the_listed_modules() -> None:
    if not build_core.compiled_in_tree():
        pytest.skip("the core is not built in place here (python tools/build_core.py build; tox's py env does)")
    # From the repository root, as the tests' and benchmarks' `python -m ...` subprocesses import it.
    done = subprocess.run([sys.executable, "-c", REPORT], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == sorted(build_core.listed_modules())


def test_describe() -> None:
    assert describe(()) == "pure Python"
    assert describe(("prequal_middleware.core.policy", "prequal_middleware.core.prequal")) == (
        "compiled (mypyc) 2 modules"
    )


# --- tools/build_core.py on a tree of its own (no compiler: extension files are planted) -----------------

PYPROJECT = """
[tool.hatch.build.targets.wheel.hooks.mypyc]
include = ["prequal_middleware/core/a.py", "prequal_middleware/core/b.py"]
"""


def _tree(root: Path) -> Path:
    core = root / "prequal_middleware" / "core"
    core.mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py"):
        (core / name).write_text("")
    (root / "prequal_middleware" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(PYPROJECT)
    return core


def _age(path: Path, seconds: float) -> None:
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def _built(root: Path, core: Path, *names: str) -> None:
    (root / f"0123456789abcdef0123__mypyc{EXT}").write_text("")
    for name in names:
        _age(core / f"{name}.py", 60)
        (core / f"{name}{EXT}").write_text("")


def test_a_fresh_build_and_a_pure_tree_have_no_problem(tmp_path: Path) -> None:
    core = _tree(tmp_path)
    assert build_core.problems(tmp_path) == []
    _built(tmp_path, core, "a", "b")
    assert build_core.problems(tmp_path) == []
    assert sorted(build_core.compiled_in_tree(tmp_path)) == ["prequal_middleware.core.a", "prequal_middleware.core.b"]


def test_a_source_edited_after_the_build_is_stale(tmp_path: Path) -> None:
    core = _tree(tmp_path)
    _built(tmp_path, core, "a", "b")
    (core / "b.py").write_text("x = 1\n")
    _age(core / f"b{EXT}", 1)
    assert build_core.problems(tmp_path) == ["prequal_middleware/core/b.py was changed after it was compiled"]


def test_partial_unlisted_and_runtime_less_builds_are_problems(tmp_path: Path) -> None:
    core = _tree(tmp_path)
    _built(tmp_path, core, "a", "c")
    next(tmp_path.glob("*__mypyc*")).unlink()
    assert build_core.problems(tmp_path) == [
        "prequal_middleware.core.c is compiled but not in pyproject.toml's mypyc include",
        "prequal_middleware.core.b is listed but not compiled (partial build)",
        "mypyc's runtime module (*__mypyc) is missing at the repository root",
    ]


def test_clean_removes_every_compiled_file_and_nothing_else(tmp_path: Path) -> None:
    core = _tree(tmp_path)
    _built(tmp_path, core, "a", "b", "c")
    (core / "a.cpython-399-other.so").write_text("")  # another interpreter's build
    (core / "b.pyd").write_text("")
    (tmp_path / "build" / "mypyc" / "c").mkdir(parents=True)
    (tmp_path / "keep.so").write_text("")  # not beside a source: not ours to remove
    before = {p for p in tmp_path.rglob("*") if p.suffix == ".py"} | {tmp_path / "pyproject.toml"}
    build_core.clean(tmp_path)
    assert not build_core.artefacts(tmp_path)
    assert not (tmp_path / "build").exists()
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == before | {tmp_path / "keep.so"}
    assert build_core.problems(tmp_path) == []


def test_the_include_list_must_name_files(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.replace("core/b.py", "core/*.py"))
    with pytest.raises(SystemExit, match="must list existing .py files"):
        build_core.listed_sources(tmp_path)


def test_a_stale_build_stops_the_session(tmp_path: Path) -> None:
    """tests/conftest.py's guard, end to end: pytest in a copy of the tree with a stale compiled module."""
    copied = ("pyproject.toml", "tools/__init__.py", "tools/build_core.py", "tests/__init__.py", "tests/conftest.py")
    for name in copied:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    _copy_package(tmp_path)
    (tmp_path / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    core = tmp_path / "prequal_middleware" / "core"
    _built(tmp_path, core, *(m.rpartition(".")[2] for m in build_core.listed_modules()))
    assert build_core.problems(tmp_path) == []
    # policy.py edited after the build. (The extensions planted are empty files: a session that got past
    # the guard would fail importing them, at the header at the latest.)
    os.utime(core / "policy.py")
    _age(core / f"policy{EXT}", 1)
    stale = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_nothing.py"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert stale.returncode == pytest.ExitCode.USAGE_ERROR, stale.stdout + stale.stderr
    message = stale.stdout + stale.stderr
    assert "prequal_middleware/core/policy.py was changed after it was compiled" in message
    assert "run python tools/build_core.py build or clean" in message
    assert "collected" not in stale.stdout

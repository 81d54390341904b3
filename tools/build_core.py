"""Compile the sans-IO core with mypyc in place, for the tests and the benchmarks; or remove that build.

    python tools/build_core.py build    # the .so files next to the .py files (and mypyc's runtime at the root)
    python tools/build_core.py clean    # back to pure Python: every compiled artefact removed
    python tools/build_core.py status   # what an import from this tree gets, and whether it is stale

The modules are the ones release wheels compile: the ``include`` list of the hatch-mypyc build hook in
pyproject.toml (``[tool.hatch.build.targets.wheel.hooks.mypyc]``), compiled with its ``mypy-args`` and
``options``, so the tests and the benchmarks measure what a compiled wheel ships. Once built, every import
from the source tree gets the compiled modules (CPython's import system prefers an extension module to the
``.py`` beside it): pytest, and the ``python -m ...`` subprocesses the tests and benchmarks start from the
repository root. tests/conftest.py stops a run whose compiled modules are older than their sources.

The build runs in ``build/mypyc/`` (mypyc's C files, setuptools' objects, any mypy cache), so setuptools
does not read this project's pyproject.toml (hatchling's, not setuptools') and nothing else lands in the
tree but the extension modules. Needs mypy, setuptools and a C compiler with the Python headers (the
``dev`` extra has the first two).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import shutil
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prequal_middleware"
BUILD_DIR = Path("build") / "mypyc"
# mypyc puts the code of every compiled module in one shared extension at the top level, named
# "<hash of the module names>__mypyc"; each listed module's own extension is a shim that loads it.
RUNTIME_GLOB = "*__mypyc.*"
# Extension files in any Python's naming (a build for another interpreter is an artefact too).
ANY_EXTENSION = (".so", ".pyd")


def hook_config(root: Path = ROOT) -> dict[str, Any]:
    """pyproject.toml's ``[tool.hatch.build.targets.wheel.hooks.mypyc]`` table."""
    with (root / "pyproject.toml").open("rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return config


def listed_sources(root: Path = ROOT) -> list[str]:
    """The compiled modules' files, as listed (paths relative to the root, ``/``-separated)."""
    include = hook_config(root)["include"]
    for path in include:
        if any(c in path for c in "*?[!") or not path.endswith(".py") or not (root / path).is_file():
            raise SystemExit(f"pyproject.toml's mypyc include must list existing .py files, not {path!r}")
    return list(include)


def module_name(source: str) -> str:
    """``prequal_middleware/core/policy.py`` -> ``prequal_middleware.core.policy``."""
    return source.removesuffix(".py").replace("/", ".")


def listed_modules(root: Path = ROOT) -> list[str]:
    return [module_name(s) for s in listed_sources(root)]


def _importable_extension(source: Path) -> Path | None:
    """The extension module this interpreter would import instead of ``source``, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def compiled_in_tree(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package that this interpreter would import compiled: name -> extension file.

    Any extension module beside a ``.py`` of the same name counts, listed or not (one left over from an
    older list shadows its source as much as a listed one does).
    """
    found = {}
    for source in sorted((root / PACKAGE).rglob("*.py")):
        extension = _importable_extension(source)
        if extension is not None:
            found[module_name(source.relative_to(root).as_posix())] = extension
    return found


def problems(root: Path = ROOT) -> list[str]:
    """Why the compiled modules in the tree are not a build of its current sources ([] when pure or fresh)."""
    compiled = compiled_in_tree(root)
    if not compiled:
        return []
    found = []
    for name, extension in compiled.items():
        source = extension.with_name(name.rpartition(".")[2] + ".py")
        if extension.stat().st_mtime < source.stat().st_mtime:
            found.append(f"{source.relative_to(root)} was changed after it was compiled")
    listed = listed_modules(root)
    found += [
        f"{name} is compiled but not in pyproject.toml's mypyc include" for name in compiled if name not in listed
    ]
    found += [f"{name} is listed but not compiled (partial build)" for name in listed if name not in compiled]
    if not any(_is_extension(p) for p in root.glob(RUNTIME_GLOB)):
        found.append("mypyc's runtime module (*__mypyc) is missing at the repository root")
    return found


def _is_extension(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ANY_EXTENSION)


def artefacts(root: Path = ROOT) -> list[Path]:
    """Every compiled file in the tree: extensions beside a ``.py`` in the package, mypyc's runtime at the root."""
    found = [p for p in root.glob(RUNTIME_GLOB) if _is_extension(p)]
    for source in (root / PACKAGE).rglob("*.py"):
        found += [p for p in source.parent.glob(source.stem + ".*") if _is_extension(p)]
        found += [p for p in (source.with_suffix(ext) for ext in ANY_EXTENSION) if p.is_file()]
    return sorted(set(found))


def clean(root: Path = ROOT) -> list[Path]:
    """Remove the compiled files and ``build/mypyc`` (``build/`` too when that leaves it empty)."""
    removed = artefacts(root)
    for path in removed:
        path.unlink()
    build_dir = root / BUILD_DIR
    if build_dir.exists():
        shutil.rmtree(build_dir)
        removed.append(build_dir)
        if not any(build_dir.parent.iterdir()):
            build_dir.parent.rmdir()
    return removed


def build(root: Path = ROOT) -> list[Path]:
    """Compile the listed modules and put their extensions in the tree; returns the files written."""
    sources = listed_sources(root)
    config = hook_config(root)
    mypy_args = list(config.get("mypy-args", []))
    options = {k: v for k, v in config.get("options", {}).items() if k != "target_dir"}
    clean(root)  # nothing from an earlier build (another list, another interpreter) is left to shadow this one
    work = root / BUILD_DIR
    work.mkdir(parents=True)
    here = Path.cwd()
    os.chdir(work)
    try:
        # setuptools first: mypyc builds with it when it is imported (with distutils otherwise, < 3.12).
        import setuptools  # type: ignore[import-untyped]
        from mypyc.build import mypycify

        extensions = mypycify([*mypy_args, *(str(root / s) for s in sources)], target_dir=str(work / "c"), **options)
        dist = setuptools.setup(
            name="prequal-middleware-core",
            version="0",
            packages=[],
            py_modules=[],
            ext_modules=extensions,
            script_args=["--quiet", "build_ext", "--build-lib", str(work / "lib"), "--build-temp", str(work / "temp")],
        )
        command: Any = dist.get_command_obj("build_ext")
        written = []
        for extension in extensions:
            target = root / command.get_ext_filename(extension.name)
            shutil.copyfile(command.get_ext_fullpath(extension.name), target)
            # Copied now, so newer than every source even when setuptools found its build up to date.
            os.utime(target)
            written.append(target)
    finally:
        os.chdir(here)
    return written


def _relative(paths: Sequence[Path], root: Path) -> str:
    return ", ".join(str(p.relative_to(root)) for p in paths) or "nothing"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/build_core.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "clean", "status"])
    args = parser.parse_args(argv)
    if args.action == "build":
        written = build()
        print(f"compiled {len(listed_sources())} modules in place: {_relative(written, ROOT)}")
    elif args.action == "clean":
        print(f"removed {_relative(clean(), ROOT)}")
    else:
        compiled = compiled_in_tree()
        print(f"sans-IO core in this tree: compiled (mypyc) {', '.join(compiled)}" if compiled else "pure Python")
        stale = problems()
        for problem in stale:
            print(f"stale: {problem}")
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

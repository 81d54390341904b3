"""The public API: a sorted ``__all__`` whose every name imports, and a version hatch can read."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import prequal_middleware
import prequal_middleware.core
from prequal_middleware import exceptions
from prequal_middleware.exceptions import PrequalError


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


FIRST = ["LoadReportingMiddleware", "SelfRegistration", "UpstreamPool", "Gateway", "PrequalMiddleware"]


def test_the_first_names_come_first() -> None:
    # What a reader of __init__.py (and of the README's API section) meets first.
    tree = ast.parse(Path(prequal_middleware.__file__).read_text(encoding="utf-8"))
    imported = [a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names]
    imported = [name for name in imported if name not in ("annotations", "TYPE_CHECKING", "Any")]
    assert sorted(imported[: len(FIRST)]) == sorted(FIRST)
    assert set(FIRST) <= set(prequal_middleware.__all__)


def test_redis_is_imported_only_for_redis_registry() -> None:
    code = (
        "import sys, prequal_middleware\n"
        "assert 'redis' not in sys.modules, 'importing the package imported redis'\n"
        "assert prequal_middleware.RedisRegistry.__name__ == 'RedisRegistry'\n"
        "assert 'redis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _package_modules() -> list[str]:
    # ``__main__`` runs the console script when imported.
    names = [m.name for m in pkgutil.walk_packages(prequal_middleware.__path__, "prequal_middleware.")]
    return [name for name in names if not name.endswith(".__main__")]


def _public_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _package_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                found[f"{name}.{attr}"] = value
    return found


def test_every_public_exception_is_a_prequal_error() -> None:
    found = _public_exceptions()
    assert "prequal_middleware.exceptions.UpstreamTimeout" in found, "the walk must see the package's exceptions"
    strays = sorted(name for name, cls in found.items() if not issubclass(cls, PrequalError))
    assert strays == [], f"not PrequalError subclasses: {strays}"


def test_the_exceptions_docstring_draws_every_class() -> None:
    # The tree in the docstring is the documentation of the hierarchy: every class, each under its parent.
    doc = exceptions.__doc__ or ""
    tree = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    drawn: dict[str, int] = {}  # class name -> the column it is drawn at
    for line in tree.splitlines():
        match = re.search(r"[A-Z]\w+", line)
        if match and not line[: match.start()].strip(" │├└─"):  # else a line that continues a description
            drawn[match.group()] = match.start()
    classes = {n: c for n, c in vars(exceptions).items() if isinstance(c, type) and issubclass(c, BaseException)}
    assert sorted(drawn) == sorted(classes)
    for name, cls in classes.items():
        if cls is PrequalError:
            continue
        parent = next(b for b in cls.__mro__[1:] if b.__module__ == exceptions.__name__)
        assert drawn[name] == drawn[parent.__name__] + 4, f"{name} is not drawn under {parent.__name__}"
    # Each public exception elsewhere in the package is one of these, imported, not a second definition.
    assert {c.__module__ for c in _public_exceptions().values()} == {exceptions.__name__}

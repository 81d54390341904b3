"""pytest never rewrites docs/: no test module writes to a path under docs/ (issue 15, section 4).

The committed pages are written by benchmarks and documented commands (``python -m
tests.reliability.report --write``); tests only check. This reads every module of tests/ (AST) and
fails on a write whose target is a docs path: a string constant such as ``"docs/x.md"``, a ``/
"docs"`` join, or a name bound to one anywhere in tests/ (so ``DOC`` imported from another module
counts). Writes are ``.write_text/.write_bytes/.touch``, ``open(..., "w"/"a"/"x"/"+")`` and
``.open(...)`` in those modes, ``shutil`` copies and moves, ``os.replace/rename``, and a docs path
handed to a command-line option (``["--doc", "docs/x.md"]``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# A path-like string (no spaces) with a "docs" component.
_DOCS_STRING = re.compile(r"^[\w./-]*(^|/)docs(/[\w./-]*)?$")
# Calls that keep a path a path: Path(x), x.resolve(), str(x), os.path.join(...).
_PATH_CALLS = {
    "Path",
    "PurePath",
    "resolve",
    "absolute",
    "joinpath",
    "with_name",
    "with_suffix",
    "str",
    "fspath",
    "join",
}
_WRITE_METHODS = {"write_text", "write_bytes", "touch", "symlink_to", "hardlink_to"}
_COPY_FUNCTIONS = {"copy", "copy2", "copyfile", "copytree", "move", "replace", "rename", "link", "symlink"}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_docs(node: ast.expr, tainted: set[str]) -> bool:
    """Whether ``node`` is a path under docs/ (through names bound to one, ``/`` joins, path calls)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and bool(_DOCS_STRING.match(node.value))
    if isinstance(node, ast.Name):
        return node.id in tainted
    if isinstance(node, ast.Attribute):  # DOC.parent, report.DOC
        return node.attr in tainted or _is_docs(node.value, tainted)
    if isinstance(node, ast.Subscript):  # parents[2]
        return _is_docs(node.value, tainted)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _is_docs(node.left, tainted) or _is_docs(node.right, tainted)
    if isinstance(node, ast.JoinedStr):
        return any(_is_docs(v.value, tainted) for v in node.values if isinstance(v, ast.FormattedValue)) or bool(
            _DOCS_STRING.match("".join(str(v.value) for v in node.values if isinstance(v, ast.Constant)))
        )
    if isinstance(node, ast.Call) and _name(node.func) in _PATH_CALLS:
        receiver = [node.func.value] if isinstance(node.func, ast.Attribute) else []
        return any(_is_docs(a, tainted) for a in [*receiver, *node.args])
    return False


def _write_mode(call: ast.Call, position: int) -> bool:
    modes = [call.args[position]] if len(call.args) > position else []
    modes += [k.value for k in call.keywords if k.arg == "mode"]
    return any(
        isinstance(m, ast.Constant) and isinstance(m.value, str) and bool(set(m.value) & set("wax+")) for m in modes
    )


def _docs_names(trees: list[ast.Module]) -> set[str]:
    """Every name bound (anywhere in tests/) to a docs path, to a fixed point."""
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if _is_docs(node.value, tainted):
                        tainted |= {n for t in targets for n in [_name(t)] if n}
        if len(tainted) == before:
            return tainted


def docs_writes(trees: dict[Path, ast.Module]) -> Iterator[str]:
    """``path:line: what`` for every write to a docs path in ``trees``."""
    tainted = _docs_names(list(trees.values()))
    for path, tree in trees.items():
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.List | ast.Tuple):
                for option, value in zip(node.elts, node.elts[1:], strict=False):
                    flag = option.value if isinstance(option, ast.Constant) else None
                    if isinstance(flag, str) and flag.startswith("--") and _is_docs(value, tainted):
                        yield f"{where}: a docs path passed to {flag}"
            if not isinstance(node, ast.Call):
                continue
            func, name = node.func, _name(node.func)
            receiver = func.value if isinstance(func, ast.Attribute) else None
            if name in _WRITE_METHODS and receiver is not None and _is_docs(receiver, tainted):
                yield f"{where}: .{name}() on a docs path"
            elif name == "open" and receiver is not None and _is_docs(receiver, tainted) and _write_mode(node, 0):
                yield f"{where}: .open() for writing on a docs path"
            elif name == "open" and receiver is None and node.args and _is_docs(node.args[0], tainted):
                if _write_mode(node, 1):
                    yield f"{where}: open() for writing on a docs path"
            elif name in _COPY_FUNCTIONS and node.args and _is_docs(node.args[-1], tainted):
                yield f"{where}: {name}() onto a docs path"


def _parse(source: str, path: Path) -> ast.Module:
    return ast.parse(source, filename=str(path))


def test_no_test_module_writes_under_docs() -> None:
    trees = {p.relative_to(TESTS.parent): _parse(p.read_text(), p) for p in sorted(TESTS.rglob("*.py"))}
    assert len(trees) > 50, "the whole tests tree is read"
    assert list(docs_writes(trees)) == []


def test_the_check_sees_the_old_writer_and_its_kin() -> None:
    """The detector itself: each of these writes is found, and reads or build/ writes are not."""
    writer = _parse(
        'DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"\nDOC.write_text(page)\n',
        Path("report.py"),
    )
    elsewhere = _parse("from report import DOC\nprevious = DOC.read_text()\nDOC.write_text(page)\n", Path("c.py"))
    kin = _parse(
        'open("docs/benchmarks.md", "w").write(x)\n'
        'json.dump(data, open(f"{ROOT}/docs/results/x.json", mode="a"))\n'
        'IMG = REPO / "docs" / "img"\n'
        '(IMG / "plot.png").open("wb")\n'
        'shutil.copyfile(tmp, IMG / "plot.png")\n'
        'subprocess.run([sys.executable, "-m", "benchmarks.soak", "--doc", "docs/reliability.md"])\n',
        Path("kin.py"),
    )
    innocent = _parse(
        'BUILD = REPO / "build" / "reliability.md"\n'
        "BUILD.write_text(page)\n"
        'text = (REPO / "docs" / "testing.md").read_text()\n'
        'open("docs/testing.md").read()\n'
        'message = "see docs/reliability.md for the figures"\n'
        "log.write_text(message)\n",
        Path("innocent.py"),
    )
    found = list(docs_writes({Path("report.py"): writer, Path("c.py"): elsewhere, Path("kin.py"): kin}))
    assert [f.split(":")[0] for f in found] == ["report.py", "c.py"] + ["kin.py"] * 5, found
    assert list(docs_writes({Path("innocent.py"): innocent})) == []

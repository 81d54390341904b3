"""The operator's two commands from a clean install of the built wheel, not the checkout.

The rest of the suite imports the package from wherever pytest finds it, which can be the source tree;
this test builds the wheel, installs it with its dependencies into a fresh virtual environment outside
the tree and runs what an operator runs: ``prequal-gateway --check`` and ``prequal-gateway --config``
under its own uvicorn, in front of a real backend. It catches what only a wheel can get wrong: a module
or static file left out of the package data, a dependency used but not declared, a console script that
points nowhere, FastAPI's admin router in an app built on the installed package.

The release wheel's other form is built too: with ``HATCH_BUILD_HOOKS_ENABLE=1`` the hatch-mypyc hook
compiles the sans-IO core's policies (pyproject.toml), and the installed package must run them compiled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import httpx
import pytest

from tests.apps import make_backend
from tests.helpers import wait_http
from tests.servers import free_port, serve
from tools import build_core

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def _run(
    command: list[str], *, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env={**_clean_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def _clean_env() -> dict[str, str]:
    # Nothing may lead the installed interpreter back to the checkout; the wheel is the plain one
    # unless a test asks for the compiled one.
    drop = {"PYTHONPATH", "WEB_CONCURRENCY", "VIRTUAL_ENV", "HATCH_BUILD_HOOKS_ENABLE"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PREQUAL_")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv (outside the checkout) with the wheel and its ``fastapi`` extra installed."""
    work = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(ROOT)], cwd=work)
    if built.returncode != 0 and not os.environ.get("CI"):
        pytest.skip(f"cannot build the wheel here (no index?): {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = work.glob("prequal_middleware-*.whl")
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    assert made.returncode == 0, made.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS)]
    done = _run([*pip, f"{wheel}[fastapi]"], cwd=work, timeout=600)
    if done.returncode != 0 and not os.environ.get("CI"):
        pytest.skip(f"cannot install from the package index here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    yield venv


def test_the_wheel_holds_the_package_and_its_static_files_only(installed: Path) -> None:
    (wheel,) = installed.parent.glob("prequal_middleware-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "prequal_middleware/py.typed",
        "prequal_middleware/admin/static/status.html",
        "prequal_middleware/admin/static/status.js",
        "prequal_middleware/admin/static/status.css",
        "prequal_middleware/cli.py",
        "prequal_middleware/__main__.py",
    ):
        assert needed in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "example_app/"))]
    # Pure Python, for any platform: not even an in-place build of the core in the checkout gets in.
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "prequal-gateway = prequal_middleware.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_is_the_one_imported(installed: Path) -> None:
    where = _run(
        [str(installed / "bin" / "python"), "-c", "import prequal_middleware as p; print(p.__file__)"], cwd=installed
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed)


def test_check_then_run_from_the_installed_console_script(installed: Path) -> None:
    script = installed / "bin" / "prequal-gateway"
    backend_app, backend_state = make_backend("wheel-backend")
    with serve(backend_app) as backend:
        port = free_port()
        config = installed.parent / "prequal.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [server]
                host = "127.0.0.1"
                port = {port}

                [pools."/api"]
                upstreams = ["{backend.url}"]
                """
            )
        )
        checked = _run([str(script), "--config", str(config), "--check"], cwd=installed.parent)
        assert checked.returncode == 0, checked.stderr
        assert "configuration ok: pools /api (1 upstreams)" in checked.stdout

        bad = installed.parent / "bad.toml"
        bad.write_text('[pools."/api"]\nupstreams = ["ftp://x"]\n')
        refused = _run([str(script), "--config", str(bad), "--check"], cwd=installed.parent)
        assert refused.returncode == 2
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1

        log = installed.parent / "gateway.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [str(script), "--config", str(config)],
                cwd=installed.parent,
                env=_clean_env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            ready = wait_http(f"{base}/_prequal/readyz", timeout_s=30)
            assert ready.status_code == 200, (ready.text, log.read_text())
            with httpx.Client(base_url=base, timeout=10) as client:
                answer = client.get("/api/hello")
                assert answer.status_code == 200
                assert answer.json()["backend"] == "wheel-backend"
                assert backend_state.requests == 1
                page = client.get("/_prequal/")
                assert page.status_code == 200 and "<html" in page.text.lower()
                # The page's script and style are inlined from the package's static files at import.
                assert "'sha256-" in page.headers["content-security-policy"]
                assert "<script" in page.text and "<style" in page.text
                metrics = client.get("/_prequal/metrics").text
                assert "prequal_" in metrics
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def test_fastapi_app_on_the_installed_package_lists_the_admin_routes(installed: Path) -> None:
    program = textwrap.dedent(
        """
        import json
        from fastapi import FastAPI
        from prequal_middleware import Gateway, PrequalMiddleware, UpstreamPool

        gateway = Gateway([UpstreamPool("/api", upstreams=[])])
        app = FastAPI()
        app.add_middleware(PrequalMiddleware, gateway=gateway)
        app.include_router(gateway.admin_router(), prefix="/_prequal")
        print(json.dumps(sorted(app.openapi()["paths"])))
        """
    )
    done = _run([str(installed / "bin" / "python"), "-c", program], cwd=installed.parent)
    assert done.returncode == 0, done.stderr
    paths = json.loads(done.stdout)
    for path in ("/_prequal/register", "/_prequal/backends", "/_prequal/readyz", "/_prequal/metrics"):
        assert path in paths


# --- the compiled wheel ---------------------------------------------------------------------------------

COMPILED_CHECK = textwrap.dedent(
    """
    import json, random
    from prequal_middleware.core import Member, PrequalPolicy, prequal
    from prequal_middleware.core.compiled import compiled_modules

    policy = PrequalPolicy(rng=random.Random(1))
    policy.set_members([Member("http://a"), Member("http://b")], 0.0)
    first = policy.select(0.0)
    for backend in first.probes:  # the probes it asked for, answered: a loaded, b idle
        policy.on_probe(backend, 0.01, {"http://a": 5, "http://b": 0}[backend], 0.01)
    chosen = policy.select(0.02)
    print(json.dumps({
        "compiled": compiled_modules(),
        "file": prequal.__file__,
        "first": [first.backend, first.reason, sorted(first.probes)],
        "chosen": [chosen.backend, chosen.reason],
    }))
    """
)


def _sources(dest: Path) -> Path:
    """What hatchling needs to build the wheel, copied: hatch-mypyc compiles in place and leaves the
    extension modules in the tree it builds (removing any in-place build there first), so a build in the
    checkout would change which core the rest of the session runs."""
    shutil.copytree(
        ROOT / "prequal_middleware", dest / "prequal_middleware", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel, a fresh venv it is installed in), built as release wheels are: HATCH_BUILD_HOOKS_ENABLE=1."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers.exists():
        if not os.environ.get("CI"):
            pytest.skip("no C compiler or no Python headers here: mypyc cannot build")
        pytest.fail("CI needs a C compiler and the Python headers (.ci/run installs gcc)")
    work = tmp_path_factory.mktemp("compiled-wheel")
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    # Built by the fresh venv's interpreter, none of the runtime dependencies installed: the build needs
    # only what the hook declares (hatch-mypyc, mypy) in pip's isolated build environment.
    built = _run(
        [python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(_sources(work / "src"))],
        cwd=work,
        timeout=900,
        env={"HATCH_BUILD_HOOKS_ENABLE": "1"},
    )
    if built.returncode != 0 and not os.environ.get("CI"):
        pytest.skip(f"cannot build the compiled wheel here (no index?): {built.stderr[-500:]}")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = work.glob("prequal_middleware-*.whl")
    done = _run([python, "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), str(wheel)], cwd=work, timeout=600)
    if done.returncode != 0 and not os.environ.get("CI"):
        pytest.skip(f"cannot install from the package index here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    yield wheel, venv


def test_the_compiled_wheel_holds_the_listed_modules_compiled(compiled: tuple[Path, Path]) -> None:
    wheel, _ = compiled
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert f"-{tag}-" in wheel.name and not wheel.name.endswith("-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    extensions = sorted(n for n in names if n.endswith(tuple(EXTENSION_SUFFIXES)))
    expected = [s.removesuffix(".py") + EXTENSION_SUFFIXES[0] for s in build_core.listed_sources()]
    runtime = [n for n in extensions if "/" not in n and n.partition(".")[0].endswith("__mypyc")]
    assert len(runtime) == 1, extensions
    assert sorted(extensions) == sorted([*expected, *runtime])
    assert "prequal_middleware/admin/static/status.js" in names


def test_the_installed_compiled_core_runs_compiled(compiled: tuple[Path, Path]) -> None:
    _, venv = compiled
    done = _run([str(venv / "bin" / "python"), "-c", COMPILED_CHECK], cwd=venv.parent)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["compiled"] == sorted(build_core.listed_modules())
    assert Path(report["file"]).is_relative_to(venv) and report["file"].endswith(EXTENSION_SUFFIXES[0])
    # No member probed yet: a random one, and both probed; then the idle one, from the probe pool.
    assert report["first"][1] == "fallback" and report["first"][2] == ["http://a", "http://b"]
    assert report["chosen"] == ["http://b", "cold"]

"""The operator's two commands from a clean install of the built wheel, not the checkout.

The rest of the suite imports the package from wherever pytest finds it, which can be the source tree;
this test builds the wheel, installs it with its dependencies into a fresh virtual environment outside
the tree and runs what an operator runs: ``prequal-gateway --check`` and ``prequal-gateway --config``
under its own uvicorn, in front of a real backend. It catches what only a wheel can get wrong: a module
or static file left out of the package data, a dependency used but not declared, a console script that
points nowhere, FastAPI's admin router in an app built on the installed package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.apps import make_backend
from tests.helpers import wait_http
from tests.servers import free_port, serve

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def _run(command: list[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _clean_env() -> dict[str, str]:
    # Nothing may lead the installed interpreter back to the checkout.
    drop = {"PYTHONPATH", "WEB_CONCURRENCY", "VIRTUAL_ENV"}
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

"""Membership under ``uvicorn --workers 2``: a registration reaches every worker (the shared SQLite default),
and a memory registry, which cannot, is refused at startup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.registry import MemoryRegistry, SqliteRegistry
from prequal_middleware.registry.default import (
    check_registry_fits_workers,
    default_registry,
    shared_registry_path,
    worker_count,
)
from tests.apps import make_backend
from tests.helpers import consecutive_free_ports, wait_http
from tests.servers import serve


def _gateway(port: int, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example_app.gateway:app", "--port", str(port), *extra],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_a_registration_reaches_every_worker(tmp_path: Path) -> None:
    app, state = make_backend("late")
    with serve(app) as backend:
        port = consecutive_free_ports(1)
        env = {
            "PREQUAL_POOLS": json.dumps({"/api": []}),  # empty: only registration fills it
            "PREQUAL_REGISTRY_PATH": str(tmp_path / "registry.db"),
            "PREQUAL_ADMIN_TRUST_LOOPBACK": "1",
        }
        process = _gateway(port, env, "--workers", "2")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/_prequal/healthz", timeout_s=30)
            with httpx.Client() as client:
                answer = client.post(url + "/_prequal/register", json={"pool": "/api", "url": backend.url})
            assert answer.status_code in (200, 201), answer.text
            vias: set[str] = set()
            statuses = []
            for _ in range(60):
                with httpx.Client() as client:  # a new connection each time: the kernel spreads them
                    response = client.get(url + "/api/x")
                statuses.append(response.status_code)
                if response.status_code == 200:
                    headers = dict(response.json()["headers"])
                    vias.add(headers["via"])
        finally:
            process.terminate()
            process.wait(timeout=15)
            assert process.stderr is not None
            process.stderr.close()
    # The first requests may beat a worker's poll of the file (~0.1 s); after that every answer is 200.
    assert statuses[10:] == [200] * 50, statuses
    assert len(vias) >= 2, f"two workers (two Via pseudonyms) served the backend: {vias}"
    assert state.requests == statuses.count(200)


def test_a_memory_registry_under_two_workers_is_refused_at_startup() -> None:
    port = consecutive_free_ports(1)
    process = _gateway(port, {"PREQUAL_REGISTRY": "memory"}, "--workers", "2")
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=15)
    # The server stops by itself (uvicorn's supervisor exits 0 when a worker fails to start: its choice).
    assert process.returncode is not None
    assert b"Application startup failed" in stderr
    assert b"MemoryRegistry lives in one process, but the server runs 2 workers" in stderr


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, ["uvicorn", "app:app"], 1),
        ({}, ["uvicorn", "app:app", "--workers", "3"], 3),
        ({}, ["uvicorn", "app:app", "--workers=4"], 4),
        ({}, ["gunicorn", "-w", "2", "app:app"], 2),
        ({}, ["gunicorn", "-w5", "app:app"], 5),
        ({"WEB_CONCURRENCY": "6"}, ["uvicorn", "app:app"], 6),
        ({"WEB_CONCURRENCY": "6"}, ["uvicorn", "app:app", "--workers", "2"], 2),  # the flag wins
        ({"PREQUAL_WORKERS": "7", "WEB_CONCURRENCY": "6"}, ["x", "--workers", "2"], 7),  # ours wins
    ],
)
def test_worker_count(env: dict[str, str], argv: list[str], expected: int) -> None:
    assert worker_count(env, argv) == expected


@pytest.mark.parametrize(
    ("env", "argv", "where"),
    [
        ({"PREQUAL_WORKERS": "two"}, [], "PREQUAL_WORKERS"),
        ({"PREQUAL_WORKERS": "0"}, [], "PREQUAL_WORKERS"),
        ({"WEB_CONCURRENCY": "-1"}, [], "WEB_CONCURRENCY"),
        ({}, ["uvicorn", "--workers", "many"], "--workers"),
    ],
)
def test_a_bad_worker_count_names_its_source(env: dict[str, str], argv: list[str], where: str) -> None:
    with pytest.raises(ConfigurationError, match=where):
        worker_count(env, argv)


def test_the_default_registry_follows_the_worker_count(tmp_path: Path) -> None:
    assert isinstance(default_registry({}, ["uvicorn"]), MemoryRegistry)
    shared = default_registry({"PREQUAL_REGISTRY_PATH": str(tmp_path / "r.db")}, ["uvicorn", "--workers", "2"])
    assert isinstance(shared, SqliteRegistry)
    assert shared.path == tmp_path / "r.db"
    assert shared_registry_path({}).name == f"prequal-registry-{os.getppid()}.db"
    check_registry_fits_workers(shared, {}, ["uvicorn", "--workers", "2"])
    check_registry_fits_workers(MemoryRegistry(), {}, ["uvicorn"])
    with pytest.raises(ConfigurationError, match="server runs 2 workers"):
        check_registry_fits_workers(MemoryRegistry(), {}, ["uvicorn", "--workers", "2"])


def test_prequal_registry_names_a_sqlite_file(tmp_path: Path) -> None:
    from prequal_middleware.envconfig import registry_from_env

    registry = registry_from_env({"PREQUAL_REGISTRY": f"sqlite:{tmp_path / 'r.db'}"})
    assert isinstance(registry, SqliteRegistry)
    assert registry.path == tmp_path / "r.db"
    assert isinstance(registry_from_env({"PREQUAL_REGISTRY": "memory", "PREQUAL_WORKERS": "2"}), MemoryRegistry)
    unset = registry_from_env({"PREQUAL_WORKERS": "2", "PREQUAL_REGISTRY_PATH": str(tmp_path / "w.db")})
    assert isinstance(unset, SqliteRegistry)
    assert unset.path == tmp_path / "w.db"
    with pytest.raises(ConfigurationError, match="PREQUAL_REGISTRY: sqlite: needs a file path"):
        registry_from_env({"PREQUAL_REGISTRY": "sqlite:"})

"""Probes and health checks leave no line in a backend's access log; every other request does."""

from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import pytest

from prequal_middleware.backend.access_log import QuietPathsFilter, quiet_access_log
from tests.helpers import consecutive_free_ports, wait_http


def test_a_real_uvicorn_backend_logs_requests_but_not_probes_or_health_checks() -> None:
    port = consecutive_free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example_app.backend:app", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", timeout_s=30)
        with httpx.Client() as client:
            for _ in range(3):
                assert client.get(url + "/_prequal/probe").status_code == 200
                assert client.get(url + "/_prequal/probe?x=1").status_code == 200
                assert client.get(url + "/healthz").status_code == 200
            assert client.get(url + "/hello").status_code == 200
            assert client.get(url + "/users/7?q=1").status_code == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    lines = [line for line in output.decode().splitlines() if '" 200' in line]
    assert len(lines) == 2, output.decode()
    assert '"GET /hello HTTP/1.1" 200' in lines[0]
    assert '"GET /users/7?q=1 HTTP/1.1" 200' in lines[1]


def _record(path: str) -> logging.LogRecord:
    args = ("127.0.0.1:5000", "GET", path, "1.1", 200)
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("/_prequal/probe", False),
        ("/_prequal/probe?anything=1", False),
        ("/svc/_prequal/probe", False),  # under a root_path
        ("/healthz", False),
        ("/_prequal/probe/x", True),
        ("/x_prequal/probe", True),
        ("/api/users", True),
        ("/", True),
    ],
)
def test_the_filter_matches_quiet_paths_only(path: str, kept: bool) -> None:
    assert QuietPathsFilter({"/_prequal/probe", "/healthz"}).filter(_record(path)) is kept


def test_records_of_another_shape_are_kept() -> None:
    quiet = QuietPathsFilter({"/healthz"})
    other = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "plain message /healthz", None, None)
    assert quiet.filter(other) is True


def test_installed_once_per_path_set() -> None:
    name = "tests.access_log.once"
    first = quiet_access_log({"/a"}, name)
    assert quiet_access_log({"/a"}, name) is first
    assert quiet_access_log({"/b"}, name) is not first
    assert len(logging.getLogger(name).filters) == 2

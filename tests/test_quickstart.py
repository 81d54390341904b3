"""The seed project's quick start, for real: the README's commands as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from tests.helpers import consecutive_free_ports, wait_http


@contextmanager
def uvicorn(app: str, port: int, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_seed_quick_start() -> None:
    gateway_port = consecutive_free_ports(3)
    backend_port, second_port = gateway_port + 1, gateway_port + 2
    gateway = f"http://localhost:{gateway_port}"
    with ExitStack() as stack:
        # uvicorn example_app.gateway:app --port 8000
        stack.enter_context(
            uvicorn("example_app.gateway:app", gateway_port, {"PREQUAL_POOLS": json.dumps({"/api": []})})
        )
        wait_http(gateway + "/_prequal/healthz")
        # PREQUAL_GATEWAY_URL=... PREQUAL_BACKEND_URL=... uvicorn example_app.backend:app --port 8001
        stack.enter_context(
            uvicorn(
                "example_app.backend:app",
                backend_port,
                {
                    "PREQUAL_GATEWAY_URL": gateway + "/_prequal",
                    "PREQUAL_BACKEND_URL": f"http://localhost:{backend_port}",
                    "PREQUAL_BACKEND_NAME": "first",
                },
            )
        )
        # curl http://localhost:8000/api/
        deadline = time.monotonic() + 15
        while (reply := httpx.get(gateway + "/api/")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reply.status_code == 200 and reply.json()["backend"] == "first"
        # A second backend, added by hand: curl -X POST .../_prequal/register -d '{"url": "http://localhost:8002"}'
        stack.enter_context(uvicorn("example_app.backend:app", second_port, {"PREQUAL_BACKEND_NAME": "second"}))
        wait_http(f"http://localhost:{second_port}/healthz")
        added = httpx.post(
            gateway + "/_prequal/register",
            content=json.dumps({"url": f"http://localhost:{second_port}"}),
            headers={"Content-Type": "application/json"},
        )
        assert added.status_code == 201
        # Sequential requests to an idle Prequal pool go to the backend with the lower latency estimate,
        # so the new one may wait until the other's estimate ages out (1 s): both serve within a few.
        seen: set[str] = set()
        deadline = time.monotonic() + 5
        while seen != {"first", "second"} and time.monotonic() < deadline:
            seen.add(httpx.get(gateway + "/api/").json()["backend"])
        assert seen == {"first", "second"}

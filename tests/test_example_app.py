"""The example app runs from the command line and from uvicorn, and stops cleanly."""

from __future__ import annotations

import json
import signal

import httpx

from tests.helpers import consecutive_free_ports, running, wait_http
from tests.servers import free_port


def test_python_m_example_app_balances_and_stops_on_ctrl_c() -> None:
    port = consecutive_free_ports(4)
    with running(["-m", "example_app", "--port", str(port), "--backends", "3"]) as process:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert f"gateway on http://127.0.0.1:{port}" in first
        wait_http(f"http://127.0.0.1:{port}/")
        seen = {wait_http(f"http://127.0.0.1:{port}/api/work").json()["backend"] for _ in range(40)}
        assert seen <= {"backend-1", "backend-2", "backend-3"} and len(seen) >= 2
        status = httpx.get(f"http://127.0.0.1:{port}/status").json()
        assert {b["probe_mode"] for b in status["pools"]["/api"]["backends"]} == {"probe"}
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=15)
        assert process.returncode == 0, out
        assert "stopped" in out


def test_gateway_and_backend_modules_under_uvicorn() -> None:
    backend_port, gateway_port = free_port(), free_port()
    backend_env = {"PREQUAL_BACKEND_NAME": "solo", "PREQUAL_BACKEND_DELAY_MS": "1"}
    pools = json.dumps({"/api": {"upstreams": [f"http://127.0.0.1:{backend_port}"], "policy": "round_robin"}})
    with (
        running(["-m", "uvicorn", "example_app.backend:app", "--port", str(backend_port)], backend_env),
        running(["-m", "uvicorn", "example_app.gateway:app", "--port", str(gateway_port)], {"PREQUAL_POOLS": pools}),
    ):
        wait_http(f"http://127.0.0.1:{backend_port}/healthz")
        assert wait_http(f"http://127.0.0.1:{gateway_port}/api/work").json()["backend"] == "solo"
        assert wait_http(f"http://127.0.0.1:{gateway_port}/").json()["pools"] == {
            "/api": [f"http://127.0.0.1:{backend_port}"]
        }

"""Metrics under ``uvicorn --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR``: every worker's requests are counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from tests.apps import make_backend
from tests.helpers import consecutive_free_ports, wait_http
from tests.servers import serve


def test_metrics_add_up_over_workers(tmp_path: object) -> None:
    directory = str(tmp_path)
    app, _ = make_backend("m")
    with serve(app) as backend:
        port = consecutive_free_ports(1)
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": directory,
            "PREQUAL_POOLS": json.dumps({"/api": [backend.url]}),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "example_app.gateway:app", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/_prequal/healthz", timeout_s=30)
            for _ in range(60):
                with httpx.Client() as client:  # a new connection each time: the kernel spreads them over workers
                    assert client.get(url + "/api/x").status_code == 200
            time.sleep(0.1)
            readings = []
            for _ in range(12):  # whichever worker answers, it reports every worker's requests
                with httpx.Client() as client:
                    text = client.get(url + "/_prequal/metrics").text
                line = next(x for x in text.splitlines() if x.startswith('prequal_requests_total{code_class="2xx"'))
                readings.append(float(line.rsplit(" ", 1)[1]))
            files = [f for f in os.listdir(directory) if f.endswith(".db")]
        finally:
            process.terminate()
            process.wait(timeout=15)
    assert len({f.rsplit("_", 1)[-1] for f in files}) >= 2, f"two workers wrote metrics: {files}"
    assert readings == [60.0] * 12, readings
    assert [line for line in text.splitlines() if "_created" in line] == []
    assert len([line for line in text.splitlines() if line.startswith("prequal_build_info{")]) == 1, text

"""Case 3: a backend that resets the connection mid-body: the client's stream ends in error, never hangs,
and the gateway keeps serving. Also: a reset before any response byte is retried for a GET (the client
sees 200) and is a 502 for a POST whose body went upstream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.load import OpenLoop, describe_failures, get
from tests.reliability.procs import backend_proc, gateway_proc, running
from tests.reliability.rawservers import LoopThread, Resetter
from tests.reliability.report import Report
from tests.reliability.support import ms, pool_state, pools_env

REPEAT = 5
NO_HANG_BOUND_S = 2.0  # the gateway's read_idle_s is 60 s: a hang would show


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread().start()
    yield thread
    thread.stop()


def stream_outcome(url: str) -> tuple[int, int, str, float]:
    """(status, body bytes received, how the stream ended, seconds) for a streamed GET."""
    started = time.monotonic()
    received = 0
    status = 0
    ending = "complete"
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(10.0)) as response:
            status = response.status_code
            for chunk in response.iter_raw():
                received += len(chunk)
    except httpx.HTTPError as exc:
        ending = type(exc).__name__
    return status, received, ending, time.monotonic() - started


def test_backend_resets_mid_body(log_dir: Path, report: Report, loop: LoopThread) -> None:
    resetter = Resetter(loop).start()
    healthy = backend_proc("healthy", log_dir)
    pools = {
        "/reset": {"upstreams": [resetter.url]},
        "/mixed": {"upstreams": [resetter.url, healthy.url], "policy": "round_robin"},
        "/ok": {"upstreams": [healthy.url]},
    }
    gateway = gateway_proc("gateway", log_dir, pools_env(pools))
    outcomes: dict[str, list[tuple[int, int, str, float]]] = {}
    try:
        with running(healthy), running(gateway, ready_path="/_prequal/healthz"):
            background = OpenLoop(gateway.url, rate=100, duration_s=4, request=get("/ok/echo")).start()
            for path in ("/rst-mid-body", "/rst-mid-chunked", "/fin-mid-body"):
                outcomes[path] = [stream_outcome(gateway.url + "/reset" + path) for _ in range(REPEAT)]
            retried = [httpx.get(gateway.url + "/mixed/rst-before-response", timeout=10) for _ in range(2 * REPEAT)]
            posted = httpx.post(gateway.url + "/reset/rst-before-response", content=b"x" * 1000, timeout=10)
            served = background.join()
            in_flight = pool_state(gateway.url, "/reset")["in_flight"] + pool_state(gateway.url, "/ok")["in_flight"]
            assert gateway.alive(), gateway.log_tail()
    finally:
        resetter.stop()

    cut = [o for path in ("/rst-mid-body", "/rst-mid-chunked", "/fin-mid-body") for o in outcomes[path]]
    slowest = max(o[3] for o in cut)
    report.record(
        3,
        "raw backend sends 100 kB of a declared 1 MB (or chunked) body, then RST (or FIN)",
        load=f"{REPEAT} streamed GETs per variant, beside 100 req/s of healthy traffic through the same gateway",
        happened=(
            "; ".join(
                f"{path}: status {outcomes[path][0][0]}, ~{outcomes[path][0][1] // 1000} kB then "
                f"{sorted({o[2] for o in outcomes[path]})}"
                for path in outcomes
            )
            + f"; RST before any byte: GET {sorted({r.status_code for r in retried})} (retried), "
            f"POST {posted.status_code} {posted.json().get('error')}; healthy traffic "
            f"{sum(r.ok for r in served)}/{len(served)} ok; requests in flight in the gateway after: {in_flight}"
        ),
        figure=f"every cut stream ended in error within {ms(slowest)} (bound < {ms(NO_HANG_BOUND_S)}, never a hang)",
    )
    for path, results in outcomes.items():
        for status, received, ending, seconds in results:
            assert status == 200, (path, status)
            assert ending != "complete", f"{path}: a truncated body was presented as complete ({received} bytes)"
            assert received < Resetter.TOTAL
            assert seconds < NO_HANG_BOUND_S, (path, seconds)
    assert {r.status_code for r in retried} == {200}, [r.text for r in retried if r.status_code != 200]
    assert all(r.headers.get("x-backend") == "healthy" for r in retried)
    assert posted.status_code == 502 and posted.json()["error"] == "upstream_error"
    assert all(r.ok for r in served), describe_failures(served)
    assert in_flight == 0

"""A gateway registered as its own backend refuses the request that comes back (issue 12, item 5).

Every request the gateway sends upstream carries ``Via: 1.1 <pseudonym>`` (RFC 9110 section 7.6.3); a
request whose ``Via`` already names this gateway is answered 508 ``loop_detected`` before it is
forwarded again. So a loop costs one extra request, whatever the configuration. Before, each pass
added a hop and sent the request on: the gateway fanned out into itself until a limit gave way (here
the pool's ``max_in_flight``, which keeps the failing run short; without it, the headers' size after
thousands of hops).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.procs import HttpProc, gateway_proc, pick_port
from tests.reliability.support import attempts, metric, pools_env
from tests.security.hostile_clients import COMBINATIONS, request, ws_handshake

Gateways = dict[tuple[str, str], HttpProc]


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    log_dir: Path = tmp_path_factory.mktemp("loops")
    procs: Gateways = {}
    for http, transport in COMBINATIONS:
        port = pick_port()
        itself = f"http://127.0.0.1:{port}"
        pool = {"upstreams": [itself], "health": {"path": None}, "strip_prefix": False, "max_in_flight": 50}
        env = pools_env({"/api": pool}, PREQUAL_TRANSPORT=transport)
        procs[(http, transport)] = gateway_proc(
            f"loop-{http}-{transport}", log_dir, env, port=port, http=http, record_attempts=True
        )
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_http(proc.url + "/_prequal/healthz")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_a_request_through_a_loop_is_refused_once(gateways: Gateways, http: str, transport: str) -> None:
    proc = gateways[(http, transport)]
    since = time.time()
    started = time.monotonic()
    responses = request(proc.port, b"/api/x")
    elapsed = time.monotonic() - started
    assert [r.status for r in responses] == [508], responses
    assert json.loads(responses[0].body)["error"] == "loop_detected"
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s"
    sent = [a for a in attempts(proc.url) if a[0] >= since]
    assert len(sent) == 1, f"{len(sent)} upstream attempts for one client request: the loop fanned out"
    assert metric(proc.url, "prequal_gateway_errors_total", error="loop_detected") >= 1


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_a_websocket_through_a_loop_is_refused_at_once(gateways: Gateways, http: str, transport: str) -> None:
    proc = gateways[(http, transport)]
    started = time.monotonic()
    status, _ = ws_handshake(proc.port, b"/api/ws")
    elapsed = time.monotonic() - started
    assert status in (502, 508), status  # the inner handshake refused (508); the outer one fails with it
    assert elapsed < 2.0, f"answered after {elapsed:.1f} s: the handshake went round the loop"

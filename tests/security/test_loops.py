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


def test_two_gateways_in_one_process_are_not_a_loop() -> None:
    """Gateway A forwards to gateway B, both in one process: each has its own pseudonym, so B serves it."""
    import httpx

    from prequal_middleware import Gateway, HealthSettings, UpstreamPool
    from prequal_middleware.exceptions import ConfigurationError
    from tests.apps import make_backend
    from tests.helpers import gateway_app
    from tests.servers import serve

    off = HealthSettings(path=None)
    app, _ = make_backend("end")
    with serve(app) as end:
        inner = Gateway(pools=[UpstreamPool("/api", upstreams=[end.url], health=off, strip_prefix=False)])
        with serve(gateway_app(inner)) as b:
            outer = Gateway(
                pools=[UpstreamPool("/api", upstreams=[b.url], health=off, strip_prefix=False)],
                via_pseudonym="edge-1",
            )
            with serve(gateway_app(outer)) as a:
                reply = httpx.get(a.url + "/api/echo", timeout=5)
                assert reply.status_code == 200, reply.text
                via = ", ".join(v for k, v in reply.json()["headers"] if k == "via")
                assert via.startswith("1.1 edge-1, 1.1 prequal-"), via
                looped = httpx.get(b.url + "/api/echo", headers={"via": "1.1 edge-1"}, timeout=5)
                assert looped.status_code == 200, "another gateway's name is not this one's"
                refused = httpx.get(a.url + "/api/echo", headers={"via": "1.0 edge-1"}, timeout=5)
                assert refused.status_code == 508 and refused.json()["error"] == "loop_detected"
    for bad in ("", "edge 1", "edge,1", "x" * 65, "é"):
        with pytest.raises(ConfigurationError, match="via_pseudonym"):
            Gateway(via_pseudonym=bad)

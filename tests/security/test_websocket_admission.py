"""WebSockets against hostile clients (issue 12, items 4 and 10), through real gateway processes.

- A handshake the backend refuses (403) is the client's problem, not the backend's failure: before,
  every refusal counted as a connect error, and a dozen refused handshakes ejected a healthy backend,
  so any client could empty a pool.
- WebSockets pass the same admission as HTTP (header limits, the pool's ``max_in_flight``) and have
  a limit of their own (``max_websockets``); open sockets hold no HTTP slot, so however many are open,
  HTTP on the same pool is still served, and one socket too many gets a clear 503.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.procs import HttpProc
from tests.reliability.rawservers import LoopThread
from tests.reliability.support import pool_state
from tests.security.hostile_clients import COMBINATIONS, HostileBackend, gateway_procs, request, ws_handshake

Gateways = dict[tuple[str, str], HttpProc]


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileBackend, HostileBackend, Gateways]]:
    log_dir: Path = tmp_path_factory.mktemp("ws-refusals")
    loop = LoopThread().start()
    backend, other = HostileBackend(loop).start(), HostileBackend(loop).start()
    # Two backends (one may be ejected: max_ejected_share 0.5), ejected after 3 failures in a row:
    # 20 refusals would eject one many times over if they counted.
    pools = {
        "/api": {
            "upstreams": [backend.url, other.url],
            "health": {"path": None},
            "outliers": {"consecutive_failures": 3, "base_ejection_s": 30.0},
        }
    }
    try:
        with gateway_procs("ws-refuse", log_dir, pools) as gateways:
            yield backend, other, gateways
    finally:
        backend.stop()
        other.stop()
        loop.stop()


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_refused_handshakes_do_not_eject_the_backend(
    refusing: tuple[HostileBackend, HostileBackend, Gateways], http: str, transport: str
) -> None:
    backend, other, gateways = refusing
    proc = gateways[(http, transport)]
    before = backend.refused + other.refused
    for _ in range(20):
        status, body = ws_handshake(proc.port, b"/api/refuse")
        assert status == 403, (status, body)  # the backend's answer, as the gateway's JSON refusal
        assert json.loads(body)["error"] == "upstream_refused", body
    assert backend.refused + other.refused - before == 20, "every handshake reached a backend"
    members = pool_state(proc.url)["members"]
    states = [(m["state"], m["ejected_for_s"], m["consecutive_failures"]) for m in members]
    assert states == [("healthy", None, 0)] * 2, members
    for _ in range(4):
        assert [r.status for r in request(proc.port, b"/api/plain")] == [200], "the backends still serve HTTP"
    assert httpx.get(proc.url + "/_prequal/readyz", timeout=5).status_code == 200


def _close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()

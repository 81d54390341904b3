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

from tests.helpers import wait_for
from tests.reliability.procs import HttpProc
from tests.reliability.rawclient import exchange
from tests.reliability.rawservers import LoopThread
from tests.reliability.support import pool_state
from tests.security.hostile_clients import (
    COMBINATIONS,
    HostileBackend,
    gateway_procs,
    request,
    ws_handshake,
    ws_handshake_bytes,
    ws_open,
)

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


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileBackend, Gateways]]:
    log_dir: Path = tmp_path_factory.mktemp("ws-limits")
    loop = LoopThread().start()
    backend = HostileBackend(loop).start()
    pools = {
        "/api": {
            "upstreams": [backend.url],
            "health": {"path": None},
            "max_in_flight": 2,
            "max_in_flight_per_backend": 1,
            "max_websockets": 3,
            "limits": {"max_headers": 50},
        }
    }
    try:
        with gateway_procs("ws-limit", log_dir, pools) as gateways:
            yield backend, gateways
    finally:
        backend.stop()
        loop.stop()


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_open_websockets_cannot_starve_http(
    limited: tuple[HostileBackend, Gateways], http: str, transport: str
) -> None:
    backend, gateways = limited
    proc = gateways[(http, transport)]
    socks: list[socket.socket] = []
    try:
        for i in range(3):  # more sockets than max_in_flight_per_backend and max_in_flight
            sock, status = ws_open(proc.port, b"/api/ws")
            socks.append(sock)
            assert status == 101, f"WebSocket {i + 1} of max_websockets=3: {status}"
        wait_for(lambda: backend.open_sockets >= 3, 5.0, "three sockets open at the backend")
        for _ in range(3):
            assert [r.status for r in request(proc.port, b"/api/plain")] == [200], "HTTP starved by WebSockets"
        status, body = ws_handshake(proc.port, b"/api/ws")
        assert status == 503, (status, body)
        assert json.loads(body)["error"] == "too_many_websockets", body
        assert b"max_websockets" in body
    finally:
        _close(socks)
    wait_for(lambda: backend.open_sockets == 0, 5.0, "the sockets closed upstream")
    wait_for(lambda: _opens(proc.port), 5.0, "a WebSocket admitted again once the others closed")


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_websocket_handshakes_pass_the_header_limits(
    limited: tuple[HostileBackend, Gateways], http: str, transport: str
) -> None:
    backend, gateways = limited
    proc = gateways[(http, transport)]
    before = len(backend.requests)
    many = b"".join(b"X-Filler-%d: x\r\n" % i for i in range(60))
    payload = ws_handshake_bytes(b"/api/ws")[:-2] + many + b"\r\n"
    responses, _ = exchange(proc.port, payload, idle_s=0.3)
    assert [r.status for r in responses] == [431], responses
    assert json.loads(responses[0].body)["error"] == "headers_too_large"
    assert len(backend.requests) == before, "the handshake reached the backend"


def _opens(port: int) -> bool:
    sock, status = ws_open(port, b"/api/ws")
    sock.close()
    return status == 101

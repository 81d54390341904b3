"""Hostile request targets, as raw bytes, through real gateway processes (``request_target``).

Every combination of uvicorn's HTTP parsers (httptools, h11) and the gateway's upstream transports
(aiohttp, h1) runs as its own process in front of two raw recorders: the pool's backend, and an
*elsewhere* server that stands for any host a hostile target might name. For each target:

- nothing ever reaches *elsewhere* (before ``request_target``, ``GET @127.0.0.1:<port>/`` with a
  pool at ``/`` made the gateway fetch it: an open proxy);
- a refused target is a 400 and reaches no backend;
- a path never climbs out of the pool's prefix: dot segments in any spelling are refused;
- a prefix matches the raw path byte for byte, and what goes upstream is the rest, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.procs import HttpProc
from tests.reliability.rawclient import RawResponse, exchange
from tests.reliability.rawservers import LoopThread, Recorder
from tests.security.hostile_clients import COMBINATIONS, gateway_procs

WS_HEADERS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@dataclass
class Setup:
    backend: Recorder
    elsewhere: Recorder
    catch_all: dict[tuple[str, str], HttpProc]  # a pool at "/"
    api: dict[tuple[str, str], HttpProc]  # a pool at "/api", the host app elsewhere


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    log_dir = tmp_path_factory.mktemp("targets")
    loop = LoopThread().start()
    backend, elsewhere = Recorder(loop).start(), Recorder(loop).start()
    pool = {"upstreams": [backend.url], "health": {"path": None}, "websockets": True}
    try:
        with contextlib.ExitStack() as stack:
            catch_all = stack.enter_context(gateway_procs("gw-root", log_dir, {"/": pool}))
            api = stack.enter_context(gateway_procs("gw-api", log_dir, {"/api": pool}))
            yield Setup(backend, elsewhere, catch_all, api)
    finally:
        backend.stop()
        elsewhere.stop()
        loop.stop()


def send(proc: HttpProc, target: bytes, headers: bytes = b"") -> list[RawResponse]:
    payload = b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n" + headers + b"Connection: close\r\n\r\n"
    responses, _ = exchange(proc.port, payload)
    return [r for r in responses if r.status >= 200]


def hostile_targets(elsewhere_port: int) -> list[bytes]:
    authority = f"127.0.0.1:{elsewhere_port}".encode()
    return [
        b"@" + authority + b"/secret",
        b"@" + authority,
        authority + b"/secret",
        authority,
        b"*",
        b"x@" + authority + b"/secret",
        b"%40" + authority + b"/secret",
        b"http://" + authority + b"/secret",
        b"//" + authority + b"/secret",
    ]


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_no_target_reaches_another_host(setup: Setup, http: str, transport: str) -> None:
    """With a pool at ``/``, no target makes the gateway talk to any host but the pool's backend."""
    proc = setup.catch_all[(http, transport)]
    for target in hostile_targets(setup.elsewhere.port):
        for headers in (b"", WS_HEADERS):
            before = len(setup.backend.requests)
            responses = send(proc, target, headers)
            assert responses, f"{target!r}: no response"
            status = responses[0].status
            assert not setup.elsewhere.requests, f"{target!r} ({headers!r}) reached another host"
            forwarded = setup.backend.requests[before:]
            if target.startswith(b"/"):
                # Origin-form: "//host/..." is a path like any other, sent to the pool's backend as it came.
                assert [r.target for r in forwarded] == [target], target
            elif status in (400, 403):  # refused by the gateway or by uvicorn before it
                assert not forwarded, f"{target!r} refused, yet it reached the backend"
            else:
                # httptools reduces an absolute-form target to its path: the pool's backend may serve it,
                # as origin-form, with the client's Host never promoted to the target's authority.
                assert target.startswith(b"http://") and http == "httptools", (target, status)
                assert [r.target for r in forwarded] in ([], [b"/secret"]), forwarded


DOT_SEGMENTS = [
    b"/api/../_prequal/backends",
    b"/api/./x",
    b"/api/%2e%2e/x",
    b"/api/%2E%2E/x",
    b"/api/.%2e/x",
    b"/api/%2e/x",
    b"/api/..%2fx",
    b"/api/a/..%2F..%2Fx",
    b"/api/..%5cx",
    b"/api/..",
    b"/api/.",
]


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_dot_segments_are_refused_in_every_spelling(setup: Setup, http: str, transport: str) -> None:
    proc = setup.api[(http, transport)]
    for target in DOT_SEGMENTS:
        before = len(setup.backend.requests)
        responses = send(proc, target)
        assert [r.status for r in responses] == [400], target
        assert b"invalid_path" in responses[0].body, responses[0].body
        assert setup.backend.requests[before:] == [], f"{target!r} reached the backend"


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_prefix_matching_and_the_upstream_path_agree_byte_for_byte(setup: Setup, http: str, transport: str) -> None:
    proc = setup.api[(http, transport)]
    cases = [
        (b"/api/a%2Fb/%7Ec", b"/a%2Fb/%7Ec"),  # the rest goes as it came: no decoding, no re-encoding
        (b"/api", b"/"),
        (b"/api/", b"/"),
        (b"/api/x..y/.z/..a", b"/x..y/.z/..a"),  # dots inside a segment are ordinary characters
        (b"/api/%61", b"/%61"),
    ]
    for target, upstream in cases:
        before = len(setup.backend.requests)
        responses = send(proc, target)
        assert [r.status for r in responses] == [200], target
        assert [r.target for r in setup.backend.requests[before:]] == [upstream], target
    # A percent-encoded prefix is not the prefix: the host app answers (404), nothing goes upstream.
    for target in (b"/%61pi/x", b"/%61%70%69", b"/API/x", b"/apix"):
        before = len(setup.backend.requests)
        responses = send(proc, target)
        assert [r.status for r in responses] == [404], target
        assert responses[0].header(b"x-prequal-pool") is None, "answered by the gateway, not the host app"
        assert setup.backend.requests[before:] == [], f"{target!r} reached the pool"

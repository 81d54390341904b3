"""A ``Location`` the gateway rewrites never names a host taken from the request (issue 12, item 6).

A backend redirects to itself (``http://127.0.0.1:<port>/target?x=1``); the gateway turns that into a
relative reference under the pool's prefix (``/api/target?x=1``), which needs no host at all. Before,
it built ``scheme://<client's Host>/api/...``: any client could make the gateway emit a redirect to
``evil.example`` (cache poisoning, password-reset links, open redirects through shared caches).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.procs import HttpProc
from tests.reliability.rawservers import LoopThread
from tests.security.hostile_clients import COMBINATIONS, HostileBackend, gateway_procs, request

HOSTILE_HOSTS = [
    b"evil.example",
    b"evil.example:443",
    b"user@evil.example",
    b"gw@evil.example",
    b"evil.example/x",
    b"evil.example\r\nX-Injected: 1",  # a second header line, as far as the server is concerned
    b"evil.example\tx",
    b"EVIL.EXAMPLE",
]


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileBackend, dict[tuple[str, str], HttpProc]]]:
    log_dir: Path = tmp_path_factory.mktemp("location")
    loop = LoopThread().start()
    backend = HostileBackend(loop).start()
    pools = {
        "/api": {"upstreams": [backend.url], "health": {"path": None}},
        "/raw": {"upstreams": [backend.url], "health": {"path": None}, "strip_prefix": False},
    }
    try:
        with gateway_procs("loc", log_dir, pools) as gateways:
            yield backend, gateways
    finally:
        backend.stop()
        loop.stop()


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_location_never_names_a_host_from_the_request(
    procs: tuple[HostileBackend, dict[tuple[str, str], HttpProc]], http: str, transport: str
) -> None:
    backend, gateways = procs
    port = gateways[(http, transport)].port
    for host in HOSTILE_HOSTS:
        for prefix, expected in ((b"/api", b"/api/target?x=1"), (b"/raw", b"/target?x=1")):
            responses = request(port, prefix + b"/redirect", host=host)
            assert responses, f"{host!r}: no response"
            response = responses[0]
            if response.status != 302:
                assert 400 <= response.status < 500, (host, response.status)  # refused by the server
                continue
            location = response.header(b"location")
            assert location == expected, (host, location)
    assert len(backend.requests) >= len(HOSTILE_HOSTS), "the redirects came from the backend"

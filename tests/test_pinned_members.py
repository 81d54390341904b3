"""Members pinned to an address (``http://name:port#address``, what DNS discovery makes): every transport
connects to the address and presents the name, in ``Host`` and, over TLS, in SNI and certificate checks."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from prequal_middleware.config import Timeouts
from prequal_middleware.core.member_url import pin_address
from prequal_middleware.exceptions import UpstreamConnectError
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport, UpstreamRequest, upstream_origin
from prequal_middleware.transports.http1 import H1Transport
from prequal_middleware.transports.httpx import HttpxTransport
from tests.apps import make_backend
from tests.servers import serve

TIMEOUTS = Timeouts(connect_s=2, response_headers_s=5, read_idle_s=5)

Factory = Callable[[ssl.SSLContext | None], Transport]
TRANSPORTS: dict[str, Factory] = {
    "h1": lambda ctx: H1Transport(ssl=ctx) if ctx else H1Transport(),
    "aiohttp": lambda ctx: AiohttpTransport(ssl=ctx) if ctx else AiohttpTransport(),
    "httpx": lambda ctx: HttpxTransport(httpx.AsyncClient(verify=ctx or True), close_client=True),
}


async def _body(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def _get(transport: Transport, backend: str) -> dict[str, object]:
    response = await transport.send(UpstreamRequest("GET", backend, "/echo?x=1", []), TIMEOUTS)
    try:
        assert response.status == 200
        data: dict[str, object] = json.loads(await _body(response.body))
        return data
    finally:
        await response.aclose()


def test_the_pin_is_parsed_once_and_checked() -> None:
    origin = upstream_origin("http://api.test:8000/base#127.0.0.7")
    assert (origin.host, origin.address, origin.port, origin.authority, origin.base_path) == (
        "api.test",
        "127.0.0.7",
        8000,
        "api.test:8000",
        "/base",
    )
    assert origin.pinned
    assert not upstream_origin("http://api.test:8000").pinned
    assert upstream_origin("http://api.test:8000#::1").address == "::1"
    with pytest.raises(UpstreamConnectError, match="fragment can only pin an IP address"):
        upstream_origin("http://api.test:8000#evil.example")
    with pytest.raises(ValueError):
        pin_address("http://api.test:8000", "evil.example")


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_a_pinned_member_connects_to_its_address_and_sends_the_name(kind: str) -> None:
    app, state = make_backend("pinned")
    with serve(app) as backend:
        member = pin_address(f"http://api.test:{backend.port}", "127.0.0.1")
        transport = TRANSPORTS[kind](None)
        try:
            answer = await _get(transport, member)
        finally:
            await transport.aclose()
    headers = dict(answer["headers"])  # type: ignore[arg-type]
    assert headers["host"] == f"api.test:{backend.port}"
    assert answer["raw_path"] == "/echo"
    assert state.requests == 1


def _certificate_for_a_name(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=api.test"]
    command += ["-addext", "subjectAltName=DNS:api.test", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None and not os.environ.get("CI"), reason="needs the openssl CLI")
@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_tls_to_a_pinned_member_verifies_the_name_not_the_address(kind: str, tmp_path: Path) -> None:
    key, cert = _certificate_for_a_name(tmp_path)
    app, state = make_backend("tls")
    with serve(app, ssl_keyfile=str(key), ssl_certfile=str(cert)) as backend:
        trusting = ssl.create_default_context(cafile=str(cert))
        transport = TRANSPORTS[kind](trusting)
        try:
            answer = await _get(transport, pin_address(f"https://api.test:{backend.port}", "127.0.0.1"))
            assert dict(answer["headers"])["host"] == f"api.test:{backend.port}"  # type: ignore[arg-type]
        finally:
            await transport.aclose()
        # The same server by its address alone (a fresh transport: httpx pools by address, so it would
        # reuse the connection verified above): the certificate names api.test, not 127.0.0.1.
        fresh = TRANSPORTS[kind](trusting)
        try:
            with pytest.raises(UpstreamConnectError):
                await _get(fresh, f"https://127.0.0.1:{backend.port}")
        finally:
            await fresh.aclose()
    assert state.requests == 1

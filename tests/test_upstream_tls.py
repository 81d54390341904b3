"""Per-pool upstream TLS (``UpstreamPool.tls``), against real uvicorn backends on loopback.

A private CA made with ``openssl`` signs the backends' certificates and the gateway's client
certificate. For each transport (H1, the default; aiohttp; httpx), through a running gateway:
forwarding, probes and health checks trust the pool's ``ca_file`` and nothing else; a backend that
requires a client certificate is reached only with ``cert_file``/``key_file``; ``server_name``
replaces the name verified. Bad settings fail at construction, naming the field.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from prequal_middleware import Gateway, HealthSettings, PrequalSettings, ProbeSettings, UpstreamPool, UpstreamTLS
from prequal_middleware.config import Timeouts
from prequal_middleware.core.member_url import pin_address
from prequal_middleware.exceptions import ConfigurationError, ProbeFailed, UpstreamTLSError
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport, UpstreamRequest
from prequal_middleware.transports.http1 import H1Transport
from prequal_middleware.transports.httpx import HttpxTransport
from prequal_middleware.transports.probe import ProbeClient
from prequal_middleware.transports.tls import client_context
from tests.apps import BackendState, make_backend
from tests.helpers import gateway_app
from tests.servers import ServerThread

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None and not os.environ.get("CI"), reason="needs the openssl CLI"
)

TRANSPORTS: dict[str, Callable[[], Transport]] = {
    "h1": H1Transport,
    "aiohttp": AiohttpTransport,
    "httpx": lambda: HttpxTransport(httpx.AsyncClient(), close_client=True),
}
TIMEOUTS = Timeouts(connect_s=5, response_headers_s=5, read_idle_s=5)
# fall=1: one slow check marks the backend unhealthy, so a timeout far beyond a loaded machine's
# handshake; an untrusted handshake fails at once whatever the timeout.
HEALTH = HealthSettings(interval_s=0.1, timeout_s=5.0, rise=1, fall=1)
# Each probe may need a fresh handshake to a uvicorn thread: the default 50 ms timeout is no TLS verdict.
PROBES = ProbeSettings(timeout_s=2.0)


@dataclass
class Pki:
    """A private CA and what it signed (paths as strings, as an operator's settings hold them)."""

    ca: str
    server_cert: str  # for 127.0.0.1 and localhost
    server_key: str
    named_cert: str  # for backend.test only
    named_key: str
    client_cert: str
    client_key: str
    client_combined: str  # the client certificate and its key in one file
    other_ca: str  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip


def _signed(d: Path, name: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other")
    _signed(d, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed(d, "named", "subjectAltName=DNS:backend.test\nextendedKeyUsage=serverAuth\n")
    _signed(d, "client", "extendedKeyUsage=clientAuth\n")
    (d / "client-combined.pem").write_bytes((d / "client.pem").read_bytes() + (d / "client.key").read_bytes())
    return Pki(
        ca=str(d / "ca.pem"),
        server_cert=str(d / "server.pem"),
        server_key=str(d / "server.key"),
        named_cert=str(d / "named.pem"),
        named_key=str(d / "named.key"),
        client_cert=str(d / "client.pem"),
        client_key=str(d / "client.key"),
        client_combined=str(d / "client-combined.pem"),
        other_ca=str(d / "other.pem"),
    )


@dataclass
class Backend:
    server: ServerThread
    state: BackendState

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"


def _backend(pki: Pki, *, cert: str, key: str, require_client_cert: bool = False) -> Iterator[Backend]:
    app, state = make_backend("tls")
    config: dict[str, Any] = {"ssl_certfile": cert, "ssl_keyfile": key}
    if require_client_cert:
        config.update(ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_ca_certs=pki.ca)
    server = ServerThread(app, **config).start()
    try:
        yield Backend(server, state)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def plain(pki: Pki) -> Iterator[Backend]:
    """A backend whose certificate (from the private CA) names 127.0.0.1."""
    yield from _backend(pki, cert=pki.server_cert, key=pki.server_key)


@pytest.fixture(scope="module")
def mutual(pki: Pki) -> Iterator[Backend]:
    """A backend that requires a client certificate from the private CA."""
    yield from _backend(pki, cert=pki.server_cert, key=pki.server_key, require_client_cert=True)


@pytest.fixture(scope="module")
def named(pki: Pki) -> Iterator[Backend]:
    """A backend whose certificate names backend.test only (it is addressed as 127.0.0.1)."""
    yield from _backend(pki, cert=pki.named_cert, key=pki.named_key)


@asynccontextmanager
async def gateway_for(
    kind: str, upstream: str, tls: UpstreamTLS | None, *, health: HealthSettings | None = None, **pool: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A running gateway with one pool ``/api`` on ``upstream``, and a client in front of it (in process)."""
    settings = UpstreamPool("/api", upstreams=[upstream], tls=tls, health=health or HealthSettings(path=None), **pool)
    gateway = Gateway(pools=[settings], transport=TRANSPORTS[kind]())
    async with gateway:
        asgi = httpx.ASGITransport(app=gateway_app(gateway))
        async with httpx.AsyncClient(transport=asgi, base_url="http://gateway", timeout=10) as client:
            yield gateway, client


def _count(gateway: Gateway, metric: str, **labels: str) -> float:
    gateway.metrics.flush()  # the request path's counts since the last flush
    value = gateway.metrics.registry.get_sample_value(metric, {"pool": "/api", **labels})
    return value or 0.0


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _state(gateway: Gateway, backend: str) -> str:
    snapshot = gateway.pools["/api"].clients[0].snapshot(gateway.clock())
    return next(b.state for b in snapshot.backends if b.id == backend)


def assert_tls_error(response: httpx.Response) -> None:
    """The gateway's own JSON 502 for a failed handshake, with no exception text in it."""
    assert response.status_code == 502, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "upstream_tls_error" and body["pool"] == "/api"
    assert "SSL" not in response.text and "certificate" not in response.text and "Error" not in body["detail"]


# --- (a) forwarding trusts the pool's CA --------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_forwarding_trusts_the_pools_ca_file_and_only_with_it(kind: str, pki: Pki, plain: Backend) -> None:
    before = plain.state.requests
    async with gateway_for(kind, plain.url, None) as (gateway, client):
        assert_tls_error(await client.get("/api/echo"))  # the system's CAs do not know the private CA
        assert _count(gateway, "prequal_gateway_errors_total", error="upstream_tls_error") == 1
    async with gateway_for(kind, plain.url, UpstreamTLS(ca_file=pki.other_ca)) as (_, client):
        assert_tls_error(await client.get("/api/echo"))  # a CA file trusts its CAs and nothing else
    assert plain.state.requests == before, "no request reached the backend over an untrusted handshake"
    async with gateway_for(kind, plain.url, UpstreamTLS(ca_file=pki.ca)) as (_, client):
        for _ in range(3):
            response = await client.get("/api/echo?x=1")
            assert response.status_code == 200, response.text
            assert response.json()["raw_path"] == "/echo"
    assert plain.state.requests == before + 3


# --- (b) probes and health checks use the same context -----------------------------------------------


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_probes_use_the_pools_tls(kind: str, pki: Pki, plain: Backend) -> None:
    fast_idle = PrequalSettings(max_idle_s=0.05)  # idle probes every ~50 ms, no request needed
    seen = plain.state.probes_seen
    async with gateway_for(kind, plain.url, None, prequal=fast_idle, probes=PROBES) as (gateway, _):
        await _until(lambda: _count(gateway, "prequal_probes_total", result="failed") >= 2, "failed probes")
        assert _count(gateway, "prequal_probes_total", result="ok") == 0
    assert plain.state.probes_seen == seen, "no probe got through the handshake"
    trusted = UpstreamTLS(ca_file=pki.ca)
    async with gateway_for(kind, plain.url, trusted, prequal=fast_idle, probes=PROBES) as (gateway, _):
        await _until(lambda: _count(gateway, "prequal_probes_total", result="ok") >= 2, "answered probes")
        assert _count(gateway, "prequal_probes_total", result="failed") == 0
        await _until(lambda: plain.state.probes_seen >= seen + 2, "the backend to answer probes")


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_health_checks_use_the_pools_tls(kind: str, pki: Pki, plain: Backend) -> None:
    async with gateway_for(kind, plain.url, None, health=HEALTH) as (gateway, client):
        await _until(lambda: _count(gateway, "prequal_health_checks_total", result="failed") >= 2, "failed checks")
        assert _count(gateway, "prequal_health_checks_total", result="ok") == 0
        assert _state(gateway, plain.url) == "unhealthy"
    async with gateway_for(kind, plain.url, UpstreamTLS(ca_file=pki.ca), health=HEALTH) as (gateway, client):
        await _until(lambda: _count(gateway, "prequal_health_checks_total", result="ok") >= 2, "passing checks")
        assert _count(gateway, "prequal_health_checks_total", result="failed") == 0
        assert _state(gateway, plain.url) == "healthy"
        assert (await client.get("/api/echo")).status_code == 200


# --- (c) a client certificate for a backend that requires one ----------------------------------------


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_a_backend_requiring_a_client_certificate_gets_the_pools(kind: str, pki: Pki, mutual: Backend) -> None:
    before = mutual.state.requests
    async with gateway_for(kind, mutual.url, UpstreamTLS(ca_file=pki.ca)) as (_, client):
        response = await client.get("/api/echo")
        # TLS 1.3: the server refuses the missing certificate after the client's handshake ended, so
        # the refusal may come as the request's answer (502 upstream_error) rather than in the handshake.
        assert response.status_code == 502 and response.json()["error"] in ("upstream_tls_error", "upstream_error")
    assert mutual.state.requests == before
    separate = UpstreamTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    combined = UpstreamTLS(ca_file=pki.ca, cert_file=pki.client_combined)  # the key in the certificate's file
    for tls in (separate, combined):
        async with gateway_for(kind, mutual.url, tls, health=HEALTH) as (gateway, client):
            assert (await client.get("/api/echo")).status_code == 200
            await _until(lambda: _count(gateway, "prequal_health_checks_total", result="ok") >= 1, "a passing check")
            await _until(lambda: _count(gateway, "prequal_probes_total", result="ok") >= 1, "an answered probe")
    assert mutual.state.requests == before + 2


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_a_connection_made_for_one_pool_is_not_lent_to_another(kind: str, pki: Pki, mutual: Backend) -> None:
    # Two pools on one backend: one presents the client certificate, one does not. A kept-alive
    # connection the first made must not carry the second's requests past the backend's check.
    trusted = UpstreamTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    pools = [
        UpstreamPool("/good", upstreams=[mutual.url], tls=trusted, health=HealthSettings(path=None)),
        UpstreamPool(
            "/bare", upstreams=[mutual.url], tls=UpstreamTLS(ca_file=pki.ca), health=HealthSettings(path=None)
        ),
    ]
    gateway = Gateway(pools=pools, transport=TRANSPORTS[kind]())
    async with gateway:
        asgi = httpx.ASGITransport(app=gateway_app(gateway))
        async with httpx.AsyncClient(transport=asgi, base_url="http://gateway", timeout=10) as client:
            for _ in range(2):
                assert (await client.get("/good/echo")).status_code == 200
                assert (await client.get("/bare/echo")).status_code == 502


# --- (d) server_name replaces the name verified -------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_server_name_is_the_name_verified(kind: str, pki: Pki, named: Backend) -> None:
    async with gateway_for(kind, named.url, UpstreamTLS(ca_file=pki.ca)) as (_, client):
        assert_tls_error(await client.get("/api/echo"))  # the certificate names backend.test, not 127.0.0.1
    tls = UpstreamTLS(ca_file=pki.ca, server_name="backend.test")
    async with gateway_for(kind, named.url, tls, health=HEALTH) as (gateway, client):
        response = await client.get("/api/echo")
        assert response.status_code == 200, response.text
        assert dict(response.json()["headers"])["host"] == f"127.0.0.1:{named.server.port}"  # Host is unchanged
        await _until(lambda: _count(gateway, "prequal_health_checks_total", result="ok") >= 1, "a passing check")
        await _until(lambda: _count(gateway, "prequal_probes_total", result="ok") >= 1, "an answered probe")


async def _reaches(kind: str, backend: str, tls: UpstreamTLS) -> bool:
    """Whether a request and a probe with the pool context of ``tls`` reach ``backend`` (both or neither)."""
    context = client_context(tls)
    transport = TRANSPORTS[kind]()
    probes = ProbeClient(ssl=context, timeout_s=5)
    try:
        try:
            response = await transport.send(UpstreamRequest("GET", backend, "/echo", [], tls=context), TIMEOUTS)
        except UpstreamTLSError:
            with pytest.raises(ProbeFailed, match="TLS"):
                await probes.probe(backend)
            return False
        await response.aclose()
        assert response.status == 200
        assert (await probes.probe(backend)).rif >= 0
        return True
    finally:
        await transport.aclose()
        await probes.aclose()


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_a_pinned_member_verifies_its_name_unless_server_name_overrides_it(
    kind: str, pki: Pki, named: Backend, plain: Backend
) -> None:
    # A DNS-pinned member (what discovery makes) connects to its address and presents its name...
    pinned = pin_address(f"https://backend.test:{named.server.port}", "127.0.0.1")
    assert await _reaches(kind, pinned, UpstreamTLS(ca_file=pki.ca))
    # ...unless server_name names another: here "localhost", which only plain's certificate names.
    assert not await _reaches(kind, pinned, UpstreamTLS(ca_file=pki.ca, server_name="localhost"))
    elsewhere = pin_address(f"https://backend.test:{plain.server.port}", "127.0.0.1")
    assert not await _reaches(kind, elsewhere, UpstreamTLS(ca_file=pki.ca))
    assert await _reaches(kind, elsewhere, UpstreamTLS(ca_file=pki.ca, server_name="localhost"))


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
async def test_verify_false_accepts_any_certificate(kind: str, named: Backend) -> None:
    async with gateway_for(kind, named.url, UpstreamTLS(verify=False)) as (_, client):
        assert (await client.get("/api/echo")).status_code == 200


# --- WebSockets over the pool's context (H1 and aiohttp; httpx has none) ------------------------------


@pytest.mark.parametrize("kind", ["aiohttp", "h1"])
async def test_websockets_use_the_pools_tls(kind: str, pki: Pki, mutual: Backend) -> None:
    tls = UpstreamTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[mutual.url], tls=tls, health=HealthSettings(path=None))],
                      transport=TRANSPORTS[kind]())  # fmt: skip
    server = ServerThread(gateway_app(gateway)).start()
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/api/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "tls:hello"
    finally:
        server.stop()


# --- (e) bad settings fail at construction, naming the field ------------------------------------------


def test_bad_settings_name_the_field(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"ca_file": str(tmp_path / "missing.pem")}, r"UpstreamTLS\.ca_file must name an existing file"),
        ({"ca_file": str(garbage)}, r"UpstreamTLS\.ca_file: cannot load"),
        ({"ca_file": str(empty)}, r"UpstreamTLS\.ca_file"),
        ({"ca_file": pki.server_key}, r"UpstreamTLS\.ca_file"),  # a key, not a certificate
        ({"cert_file": str(tmp_path / "missing.pem")}, r"UpstreamTLS\.cert_file must name an existing file"),
        ({"cert_file": str(garbage), "key_file": pki.client_key}, r"UpstreamTLS\.cert_file: cannot load"),
        ({"cert_file": pki.client_cert}, r"UpstreamTLS\.cert_file: no private key"),  # no key anywhere
        ({"cert_file": pki.client_cert, "key_file": str(garbage)}, r"UpstreamTLS\.key_file: cannot load"),
        ({"cert_file": pki.client_cert, "key_file": pki.server_key}, r"UpstreamTLS\.key_file"),  # not its key
        ({"key_file": pki.client_key}, r"UpstreamTLS\.key_file must be None unless cert_file is set"),
        ({"server_name": "bad name!"}, r"UpstreamTLS\.server_name must be"),
        ({"verify": "no"}, r"UpstreamTLS\.verify must be True or False"),
        ({"verify": False, "ca_file": pki.ca}, r"UpstreamTLS\.ca_file must be None when verify is False"),
        ({"min_version": "TLSv1.0"}, r"UpstreamTLS\.min_version must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            UpstreamTLS(**kwargs)
    with pytest.raises(ConfigurationError, match=r"UpstreamPool\.tls must be None or an UpstreamTLS"):
        UpstreamPool("/api", tls={"ca_file": pki.ca})  # type: ignore[arg-type]


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", pki.client_key, "-aes256", "-passout", "pass:secret", "-out", str(encrypted), cwd=tmp_path)
    with pytest.raises(ConfigurationError, match=r"UpstreamTLS\.key_file: the private key is encrypted"):
        UpstreamTLS(cert_file=pki.client_cert, key_file=str(encrypted))


def test_the_settings_keep_their_values_and_the_pool_builds_one_context(pki: Pki) -> None:
    tls = UpstreamTLS(ca_file=Path(pki.ca), server_name="Backend.Test.", min_version="TLSv1.3")
    assert tls.server_name == "backend.test"
    context = client_context(tls)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3 and context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname and len(context.get_ca_certs()) == 1
    insecure = client_context(UpstreamTLS(verify=False))
    assert insecure.verify_mode is ssl.CERT_NONE and not insecure.check_hostname
    # Existing positional and keyword construction is unchanged; no tls, no context.
    assert UpstreamPool("/api").tls is None
    gateway = Gateway(pools=[UpstreamPool("/a", tls=tls), UpstreamPool("/b")])
    assert isinstance(gateway.pools["/a"].ssl_context, ssl.SSLContext)
    assert gateway.pools["/b"].ssl_context is None


async def test_a_tls_failure_is_its_own_error_in_every_transport(pki: Pki, plain: Backend) -> None:
    untrusting = client_context(UpstreamTLS(ca_file=pki.other_ca))
    for kind, make in TRANSPORTS.items():
        transport = make()
        try:
            with pytest.raises(UpstreamTLSError) as failed:
                await transport.send(UpstreamRequest("GET", plain.url, "/", [], tls=untrusting), TIMEOUTS)
            assert failed.value.sent is False, kind
        finally:
            await transport.aclose()

"""Who may write to the admin routes, through a real uvicorn gateway and raw requests (``registration.authorize``).

- By default (no token, no loopback trust) every write is refused, with a 403 that says what to configure.
- A token is the whole proof, but the body must still be JSON.
- Under loopback trust: no proxy headers, no ``Origin`` (CSRF from a page), a ``Host`` that names this
  machine (DNS rebinding), a JSON body (a form post cannot send one without a preflight).
- Every refusal names the field, and nothing is half-applied: no member appears.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from prequal_middleware import AdminSettings, Gateway, UpstreamPool
from prequal_middleware.exceptions import ConfigurationError
from tests.helpers import gateway_app, members
from tests.reliability.rawclient import exchange
from tests.servers import ServerThread, serve

TOKEN = "a-long-admin-token"
BODY = b'{"url": "http://127.0.0.1:9"}'


def post(
    server: ServerThread, headers: bytes, body: bytes = BODY, path: bytes = b"/_prequal/register"
) -> tuple[int, bytes]:
    payload = (
        b"POST "
        + path
        + b" HTTP/1.1\r\n"
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    responses, _ = exchange(server.port, payload)
    assert responses, "no response"
    return responses[0].status, responses[0].body


def host(server: ServerThread) -> bytes:
    return f"Host: 127.0.0.1:{server.port}\r\n".encode()


JSON = b"Content-Type: application/json\r\n"


@pytest.fixture
def default_gateway() -> Iterator[ServerThread]:
    with serve(gateway_app(Gateway(pools=[UpstreamPool("/api")])), proxy_headers=False) as server:
        yield server


@pytest.fixture
def loopback_gateway() -> Iterator[ServerThread]:
    admin = AdminSettings(trust_loopback=True, allowed_hosts=("gateway.internal",))
    with serve(gateway_app(Gateway(pools=[UpstreamPool("/api")], admin=admin)), proxy_headers=False) as server:
        yield server


@pytest.fixture
def token_gateway() -> Iterator[ServerThread]:
    admin = AdminSettings(token=TOKEN)
    with serve(gateway_app(Gateway(pools=[UpstreamPool("/api")], admin=admin)), proxy_headers=False) as server:
        yield server


def test_by_default_writes_need_a_token(default_gateway: ServerThread) -> None:
    for path in (b"/_prequal/register", b"/_prequal/heartbeat", b"/_prequal/unregister"):
        status, body = post(default_gateway, host(default_gateway) + JSON, path=path)
        assert status == 403, path
        assert b"PREQUAL_REGISTRATION_TOKEN" in body and b"trust_loopback" in body
    assert members(default_gateway.url) == {}
    assert httpx.get(default_gateway.url + "/_prequal/backends").status_code == 200, "reads stay open"


def test_under_loopback_trust_a_plain_local_json_write_is_accepted(loopback_gateway: ServerThread) -> None:
    port = loopback_gateway.port
    for i, host_header in enumerate(
        (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}", "127.9.9.9", "gateway.internal")
    ):
        body = b'{"url": "http://127.0.0.1:%d"}' % (9000 + i)
        status, reply = post(loopback_gateway, f"Host: {host_header}\r\n".encode() + JSON, body)
        assert status == 201, (host_header, reply)
    assert len(members(loopback_gateway.url)) == 6


@pytest.mark.parametrize(
    ("headers", "status", "field"),
    [
        (b"Origin: http://evil.example\r\n" + JSON, 403, b'"origin"'),
        (b"Origin: null\r\n" + JSON, 403, b'"origin"'),
        (b"Content-Type: text/plain\r\n", 415, b'"content-type"'),
        (b"Content-Type: application/x-www-form-urlencoded\r\n", 415, b'"content-type"'),
        (b"Content-Type: multipart/form-data; boundary=x\r\n", 415, b'"content-type"'),
        (b"", 415, b'"content-type"'),
        (JSON + b"Content-Type: application/json\r\n", 415, b'"content-type"'),
        (b"Content-Type: application/jsonx\r\n", 415, b'"content-type"'),
        (b"X-Forwarded-For: 203.0.113.7\r\n" + JSON, 403, b"proxy"),
        (b"Forwarded: for=203.0.113.7\r\n" + JSON, 403, b"proxy"),
    ],
)
def test_under_loopback_trust_browsers_and_proxies_cannot_write(
    loopback_gateway: ServerThread, headers: bytes, status: int, field: bytes
) -> None:
    got, body = post(loopback_gateway, host(loopback_gateway) + headers)
    assert got == status, body
    assert field in body, body
    assert b"Traceback" not in body
    assert members(loopback_gateway.url) == {}, "nothing half-applied"


@pytest.mark.parametrize(
    "host_header",
    [
        b"evil.example",
        b"evil.example:80",
        b"127.0.0.1.evil.example",
        b"localhost.evil.example",
        b"10.0.0.1",
        b"[::1]x",
        b"127.0.0.1:80x",
        b"gateway.internal.evil",
    ],
)
def test_under_loopback_trust_a_rebound_host_cannot_write(loopback_gateway: ServerThread, host_header: bytes) -> None:
    status, body = post(loopback_gateway, b"Host: " + host_header + b"\r\n" + JSON)
    assert status in (400, 403), body  # 400: uvicorn's own answer to a malformed Host
    if status == 403:
        assert b'"field":"host"' in body.replace(b" ", b""), body
    assert members(loopback_gateway.url) == {}


def test_with_a_token_the_body_must_still_be_json(token_gateway: ServerThread) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    status, body = post(token_gateway, host(token_gateway) + auth + b"Content-Type: text/plain\r\n")
    assert status == 415 and b"content-type" in body
    status, _ = post(token_gateway, host(token_gateway) + JSON)
    assert status == 401
    assert members(token_gateway.url) == {}
    # A token holder may write from anywhere and through proxies: the token is the whole proof.
    status, _ = post(token_gateway, b"Host: gateway.example\r\nX-Forwarded-For: 203.0.113.7\r\n" + auth + JSON)
    assert status == 201
    assert list(members(token_gateway.url)) == ["http://127.0.0.1:9"]


def test_allowed_hosts_are_validated() -> None:
    for bad in (("evil example",), ("",), ("a/b",)):
        with pytest.raises(ConfigurationError, match="allowed_hosts"):
            AdminSettings(trust_loopback=True, allowed_hosts=bad)
    with pytest.raises(ConfigurationError, match="allowed_hosts"):
        AdminSettings(allowed_hosts="gateway.internal")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="trust_loopback"):
        AdminSettings(trust_loopback="yes")  # type: ignore[arg-type]

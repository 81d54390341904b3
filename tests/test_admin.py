"""The admin routes through a real uvicorn gateway: registration, auth, validation, drain, health, metrics."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from prequal_middleware import AdminSettings, Gateway, PrequalMiddleware, UpstreamPool
from prequal_middleware.exceptions import RegistrationError
from prequal_middleware.registry.registration import authorize
from tests.apps import BackendState, make_backend
from tests.helpers import gateway_app, members, wait_for
from tests.servers import ServerThread, free_port, serve

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def backends() -> Iterator[list[tuple[ServerThread, BackendState]]]:
    made = [make_backend(name) for name in ("r1", "r2", "r3")]
    with serve(made[0][0]) as s1, serve(made[1][0]) as s2, serve(made[2][0]) as s3:
        yield [(s1, made[0][1]), (s2, made[1][1]), (s3, made[2][1])]


@pytest.fixture
def one_pool() -> Iterator[tuple[str, Gateway, list[Any]]]:
    registered: list[Any] = []
    gateway = Gateway(
        pools=[UpstreamPool("/api")], on_register=registered.append, admin=AdminSettings(trust_loopback=True)
    )
    with serve(gateway_app(gateway), proxy_headers=False) as g:
        yield g.url, gateway, registered


# --- registration ---------------------------------------------------------------------------------


def test_register_then_traffic_flows(one_pool: tuple[str, Gateway, list[Any]], backends: Any) -> None:
    url, gateway, registered = one_pool
    assert httpx.get(url + "/api/x").status_code == 503, "an empty pool"
    backend = backends[0][0]
    response = httpx.post(url + "/_prequal/register", json={"url": backend.url})  # the seed's body
    assert response.status_code == 201
    body = response.json()
    assert (body["pool"], body["url"], body["weight"]) == ("/api", backend.url, 1.0)
    assert 29 < body["ttl_s"] <= 30, "the default lease"
    assert httpx.get(url + "/api/x").json()["backend"] == "r1"
    member = members(url)[backend.url]
    assert member["source"] == "registered" and member["state"] == "healthy"
    assert 0 < member["lease_expires_in_s"] <= 30
    assert [r.url for r in registered] == [backend.url], "the register hook ran"


def test_reregistration_updates_in_place(one_pool: tuple[str, Gateway, list[Any]], backends: Any) -> None:
    url, _, _ = one_pool
    backend = backends[0][0]
    httpx.post(url + "/_prequal/register", json={"url": backend.url, "weight": 1})
    reply = httpx.post(url + "/_prequal/register", json={"url": backend.url, "weight": 3, "metadata": {"zone": "b"}})
    assert reply.status_code == 201
    listed = members(url)
    assert list(listed) == [backend.url]
    assert listed[backend.url]["weight"] == 3.0 and listed[backend.url]["metadata"] == {"zone": "b"}


def test_heartbeat_renews_and_unknown_is_404(one_pool: tuple[str, Gateway, list[Any]], backends: Any) -> None:
    url, _, _ = one_pool
    backend = backends[1][0]
    httpx.post(url + "/_prequal/register", json={"url": backend.url, "ttl_s": 5})
    renewed = httpx.post(url + "/_prequal/heartbeat", json={"url": backend.url, "ttl_s": 60})
    assert renewed.status_code == 200 and renewed.json()["ttl_s"] > 55
    unknown = httpx.post(url + "/_prequal/heartbeat", json={"url": "http://127.0.0.1:1"})
    assert unknown.status_code == 404 and unknown.json() == {
        "error": "unknown_backend",
        "detail": "no such backend: register again",
        "field": "url",
    }


def test_lease_expiry_removes_the_backend(one_pool: tuple[str, Gateway, list[Any]], backends: Any) -> None:
    url, _, _ = one_pool
    backend = backends[2][0]
    # A lease long enough to be seen before it expires on a busy machine; never renewed, it must go.
    httpx.post(url + "/_prequal/register", json={"url": backend.url, "ttl_s": 2.0})
    assert backend.url in members(url)
    wait_for(lambda: backend.url not in members(url), timeout_s=10.0, what="the lease to expire")


def test_unregister_drains(one_pool: tuple[str, Gateway, list[Any]], backends: Any) -> None:
    url, gateway, _ = one_pool
    server_a, server_b = backends[0][0], backends[1][0]
    httpx.post(url + "/_prequal/register", json={"url": server_a.url})
    result: dict[str, httpx.Response] = {}
    # 5 s: still in flight after the register, unregister and 10 requests below, however busy the machine.
    slow = threading.Thread(target=lambda: result.setdefault("slow", httpx.get(url + "/api/sleep?s=5", timeout=20)))
    slow.start()  # a is the only member: the slow request is in flight to it
    wait_for(lambda: gateway.pools["/api"].backend_in_flight.get(server_a.url, 0) == 1, what="a request in flight to a")
    httpx.post(url + "/_prequal/register", json={"url": server_b.url})
    reply = httpx.post(url + "/_prequal/unregister", json={"url": server_a.url})
    assert reply.status_code == 200 and reply.json()["draining"] is True
    assert members(url)[server_a.url]["state"] == "draining"
    assert {httpx.get(url + "/api/x").json()["backend"] for _ in range(10)} == {"r2"}, "no new requests to a"
    slow.join(20)
    assert result["slow"].status_code == 200 and result["slow"].text == "slept r1", "the request in flight finished"
    wait_for(lambda: server_a.url not in members(url), what="the drained member to leave")


def test_unregister_unknown_and_static(backends: Any) -> None:
    server = backends[0][0]
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as g:
        static = httpx.post(g.url + "/_prequal/unregister", json={"url": server.url})
        assert static.status_code == 409 and static.json()["error"] == "static_member"
        unknown = httpx.post(g.url + "/_prequal/unregister", json={"url": "http://127.0.0.1:9"})
        assert unknown.status_code == 404


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [
        ({"url": "file:///etc/passwd"}, 400, "invalid_field", "url"),
        ({"url": "http://user:pw@127.0.0.1:8001"}, 400, "invalid_field", "url"),
        ({"url": "http://127.0.0.1"}, 400, "invalid_field", "url"),
        ({"url": "ftp://127.0.0.1:21"}, 400, "invalid_field", "url"),
        ({"url": "http://127.0.0.1:8001/?x=1"}, 400, "invalid_field", "url"),
        ({"url": ""}, 400, "invalid_field", "url"),
        ({"url": 7}, 400, "invalid_field", "url"),
        ({}, 400, "invalid_field", "url"),
        ({"url": "http://127.0.0.1:8001", "pool": "/nope"}, 400, "invalid_field", "pool"),
        ({"url": "http://127.0.0.1:8001", "weight": 0}, 400, "invalid_field", "weight"),
        ({"url": "http://127.0.0.1:8001", "weight": True}, 400, "invalid_field", "weight"),
        ({"url": "http://127.0.0.1:8001", "weight": "2"}, 400, "invalid_field", "weight"),
        ({"url": "http://127.0.0.1:8001", "ttl_s": 10**9}, 400, "invalid_field", "ttl_s"),
        ({"url": "http://127.0.0.1:8001", "metadata": [1]}, 400, "invalid_field", "metadata"),
        ({"url": "http://127.0.0.1:8001", "metadata": {"x": "y" * 5000}}, 400, "invalid_field", "metadata"),
        ({"url": "http://127.0.0.1:8001", "admin": True}, 400, "unknown_field", "admin"),
        ({"url": "http://127.0.0.1:8001/ x"}, 400, "invalid_field", "url"),
        ({"url": "http://127.0.0.1:8001/\u00e9"}, 400, "invalid_field", "url"),
    ],
)
def test_bad_registrations_name_the_field_and_change_nothing(
    one_pool: tuple[str, Gateway, list[Any]], body: dict[str, Any], status: int, error: str, field: str
) -> None:
    url, _, registered = one_pool
    before = httpx.get(url + "/_prequal/backends").json()
    reply = httpx.post(url + "/_prequal/register", json=body)
    assert reply.status_code == status
    assert reply.json()["error"] == error and reply.json()["field"] == field
    assert "Traceback" not in reply.text
    assert httpx.get(url + "/_prequal/backends").json()["pools"] == before["pools"], "nothing half-applied"
    assert registered == []


def test_malformed_bodies(one_pool: tuple[str, Gateway, list[Any]]) -> None:
    url, _, _ = one_pool
    deep = b"[" * 5000 + b"]" * 5000
    nan = b'{"url": "http://127.0.0.1:8001", "metadata": {"x": NaN}}'
    for content in (
        b"{not json",
        b"[1, 2]",
        b"",
        b"\xff\xfe",
        deep,
        nan,
        b'{"url": "http://127.0.0.1:8001", "weight": Infinity}',
    ):
        reply = httpx.post(url + "/_prequal/register", content=content, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and reply.json()["error"] == "invalid_json", content
    big = httpx.post(
        url + "/_prequal/register", content=b"{" + b" " * 20_000 + b"}", headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"


def test_pool_is_required_with_several_pools(backends: Any) -> None:
    gateway = Gateway(pools=[UpstreamPool("/a"), UpstreamPool("/b")], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as g:
        reply = httpx.post(g.url + "/_prequal/register", json={"url": backends[0][0].url})
        assert reply.status_code == 400 and reply.json()["field"] == "pool"
        assert (
            httpx.post(g.url + "/_prequal/register", json={"url": backends[0][0].url, "pool": "/b"}).status_code == 201
        )


def test_token_is_required_when_configured(backends: Any) -> None:
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(token=TOKEN))
    body = {"url": backends[0][0].url}
    with serve(gateway_app(gateway)) as g:
        assert httpx.post(g.url + "/_prequal/register", json=body).status_code == 401
        wrong = httpx.post(g.url + "/_prequal/register", json=body, headers={"authorization": "Bearer nope-nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        right = httpx.post(g.url + "/_prequal/register", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 201
        assert httpx.get(g.url + "/_prequal/backends").status_code == 200, "reads need no token"


def test_without_a_token_proxied_requests_are_refused(one_pool: tuple[str, Gateway, list[Any]], backends: Any) -> None:
    url, _, _ = one_pool
    for header in ({"x-forwarded-for": "127.0.0.1"}, {"forwarded": "for=127.0.0.1"}, {"x-real-ip": "127.0.0.1"}):
        reply = httpx.post(url + "/_prequal/register", json={"url": backends[0][0].url}, headers=header)
        assert reply.status_code == 403 and reply.json()["error"] == "forbidden", header


def test_without_a_token_only_loopback_clients_may_write() -> None:
    settings = AdminSettings(trust_loopback=True)
    headers = [(b"host", b"localhost"), (b"content-type", b"application/json")]
    authorize(settings, headers, ("127.0.0.1", 5000))
    authorize(settings, headers, ("::1", 5000))
    for client in (("10.0.0.7", 5000), ("192.168.1.2", 1), None):
        with pytest.raises(RegistrationError) as refused:
            authorize(settings, headers, client)
        assert refused.value.status == 403
    with pytest.raises(RegistrationError) as refused:
        authorize(AdminSettings(), headers, ("127.0.0.1", 5000))
    assert refused.value.status == 403, "no token and no loopback trust: no writes"


def test_allow_list(backends: Any) -> None:
    admin = AdminSettings(trust_loopback=True, allowed_upstreams=("10.0.0.0/8", "*.svc.local", "localhost"))
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=admin)
    with serve(gateway_app(gateway)) as g:
        refused = httpx.post(g.url + "/_prequal/register", json={"url": backends[0][0].url})
        assert refused.status_code == 403 and refused.json() == {
            "error": "forbidden_upstream",
            "detail": "the host '127.0.0.1' is not in the allow-list",
            "field": "url",
        }
        for ok in ("http://10.1.2.3:80", "http://api.svc.local:8080", "http://localhost:8001"):
            assert httpx.post(g.url + "/_prequal/register", json={"url": ok}).status_code == 201, ok


# --- health, metrics, status page ------------------------------------------------------------------


def test_healthz_and_readyz(backends: Any) -> None:
    gateway = Gateway(
        pools=[UpstreamPool("/api"), UpstreamPool("/b", upstreams=[backends[1][0].url])],
        admin=AdminSettings(trust_loopback=True),
    )
    with serve(gateway_app(gateway)) as g:
        assert httpx.get(g.url + "/_prequal/healthz").json() == {"status": "ok"}
        # /api is filled by registration, so not required; /b's static member is healthy.
        ready = httpx.get(g.url + "/_prequal/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert {name: p["required"] for name, p in ready.json()["pools"].items()} == {"/api": False, "/b": True}
        httpx.post(g.url + "/_prequal/register", json={"url": backends[0][0].url, "pool": "/api"})
        assert httpx.get(g.url + "/_prequal/readyz").json()["pools"]["/api"]["ready"] is True


def test_metrics_are_exposed(backends: Any) -> None:
    gateway = Gateway(
        pools=[UpstreamPool("/api", upstreams=[backends[0][0].url, backends[1][0].url])],
        admin=AdminSettings(trust_loopback=True),
    )
    with serve(gateway_app(gateway)) as g:
        for _ in range(20):
            httpx.get(g.url + "/api/x")
        httpx.post(g.url + "/_prequal/register", json={"url": "file:///x"})
        expected = (
            'prequal_requests_total{code_class="2xx",pool="/api"} 20.0',
            'prequal_request_duration_seconds_count{pool="/api"} 20.0',
            'prequal_in_flight{pool="/api"} 0.0',
            'prequal_backends{pool="/api",state="healthy"} 2.0',
            'prequal_registry_events_total{event="rejected"} 1.0',
            "prequal_registry_stale_seconds 0.0",
        )
        text = ""

        def all_exposed() -> bool:
            nonlocal text
            text = httpx.get(g.url + "/_prequal/metrics").text
            return all(line in text for line in expected)

        # Polled: the gauges are sampled once a second. On a timeout the loop below names the line.
        with contextlib.suppress(AssertionError):
            wait_for(all_exposed, timeout_s=10.0, what="the expected metrics")
    for line in expected:
        assert line in text, line
    for name in (
        "prequal_upstream_requests_total",
        "prequal_upstream_latency_seconds_bucket",
        "prequal_selections_total",
        "prequal_probes_total",
        "prequal_probe_duration_seconds_bucket",
        "prequal_probe_pool_size",
    ):
        assert f"\n{name}{{" in text, name
    assert "/api/x" not in text and "127.0.0.1:" not in text.replace(backends[0][0].url, "").replace(
        backends[1][0].url, ""
    ), "no raw paths or client addresses in labels"


def test_status_page_is_served(one_pool: tuple[str, Gateway, list[Any]]) -> None:
    url, _, _ = one_pool
    page = httpx.get(url + "/_prequal/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_fastapi_router() -> None:
    fastapi = pytest.importorskip("fastapi")
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    app = fastapi.FastAPI()
    app.include_router(gateway.admin_router(), prefix="/_prequal")
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    backend_app, _ = make_backend("fa")
    with serve(backend_app) as backend, serve(app) as g:
        assert httpx.post(g.url + "/_prequal/register", json={"url": backend.url}).status_code == 201
        assert httpx.get(g.url + "/api/x").json()["backend"] == "fa"
        assert httpx.get(g.url + "/_prequal/healthz").status_code == 200
    assert free_port() > 0

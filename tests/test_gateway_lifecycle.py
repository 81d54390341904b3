"""Client disconnects, WebSockets, lifespan, transports and probe targets, through real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from prequal_middleware import AdminSettings, Gateway, HttpxTransport, PrequalMiddleware, UpstreamPool
from prequal_middleware.gateway.websocket import open_websockets
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.http1 import H1Transport
from tests.apps import BackendState, make_backend
from tests.helpers import wait_for
from tests.servers import ServerThread, serve


def probe_rif(server: ServerThread) -> int:
    return int(httpx.get(server.url + "/_prequal/probe").headers["x-prequal-rif"])


def host_app(gateway: Gateway) -> Any:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host")

    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[ServerThread, BackendState]]:
    app, state = make_backend("a")
    with serve(app) as server:
        yield server, state


@pytest.fixture(scope="module")
def gateway_url(backend: tuple[ServerThread, BackendState]) -> Iterator[tuple[str, Gateway]]:
    server, _ = backend
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])])
    with serve(host_app(gateway), proxy_headers=False) as g:
        yield g.url, gateway


# --- client disconnects ----------------------------------------------------------------------------


def test_disconnect_while_waiting_cancels_upstream(
    backend: tuple[ServerThread, BackendState], gateway_url: tuple[str, Gateway]
) -> None:
    server, state = backend
    url, gateway = gateway_url
    port = int(url.rsplit(":", 1)[1])
    cancelled_before = state.cancelled
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /api/hold HTTP/1.1\r\nHost: gw\r\n\r\n")
    wait_for(lambda: state.holding == 1, what="the backend to hold the request")
    assert probe_rif(server) == 1
    sock.close()
    wait_for(lambda: state.cancelled == cancelled_before + 1, what="the upstream request to be cancelled")
    wait_for(lambda: probe_rif(server) == 0, what="the backend's RIF to return to 0")
    wait_for(lambda: gateway.pools["/api"].in_flight == 0, what="the gateway's in-flight count to return to 0")
    assert gateway.snapshot()["pools"]["/api"]["clients"][0].backends[0].in_flight == 0


def test_disconnect_mid_response_cancels_upstream(
    backend: tuple[ServerThread, BackendState], gateway_url: tuple[str, Gateway]
) -> None:
    server, _ = backend
    url, gateway = gateway_url
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /api/stream?pause=20 HTTP/1.1\r\nHost: gw\r\n\r\n")
    sock.settimeout(5)
    received = b""
    while b"first chunk" not in received:
        received += sock.recv(4096)
    assert probe_rif(server) == 1, "the stream is still going"
    sock.close()
    wait_for(lambda: probe_rif(server) == 0, what="the backend's RIF to return to 0")
    wait_for(lambda: gateway.pools["/api"].in_flight == 0, what="the gateway's in-flight count to return to 0")


def test_disconnect_mid_upload_cancels_upstream(
    backend: tuple[ServerThread, BackendState], gateway_url: tuple[str, Gateway]
) -> None:
    server, _ = backend
    url, gateway = gateway_url
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
    wait_for(lambda: gateway.pools["/api"].in_flight == 1, what="the upload to start upstream")
    sock.close()
    wait_for(lambda: gateway.pools["/api"].in_flight == 0, what="the gateway's in-flight count to return to 0")
    wait_for(lambda: probe_rif(server) == 0, what="the backend's RIF to return to 0")


# --- WebSockets ----------------------------------------------------------------------------------


def test_websocket_echo_through_the_gateway(gateway_url: tuple[str, Gateway]) -> None:
    url, _ = gateway_url
    with ws_connect(url.replace("http", "ws") + "/api/ws", subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat", "the backend's chosen subprotocol reaches the client"
        ws.send("hello")
        assert ws.recv(timeout=5) == "a:hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, "the backend's close code passes"


def test_websocket_client_close_reaches_the_backend(
    backend: tuple[ServerThread, BackendState], gateway_url: tuple[str, Gateway]
) -> None:
    url, gateway = gateway_url
    with ws_connect(url.replace("http", "ws") + "/api/ws") as ws:
        ws.send("ping")
        assert ws.recv(timeout=5) == "a:ping"
        # An open socket counts against max_websockets, not as a request in flight (it would hold an HTTP slot).
        assert gateway.pools["/api"].in_flight == 0
        assert open_websockets(gateway.pools["/api"]) == 1, "an open WebSocket counts against max_websockets"
    wait_for(lambda: open_websockets(gateway.pools["/api"]) == 0, what="the relay to end")


def test_websockets_off_go_to_the_host_app(backend: tuple[ServerThread, BackendState]) -> None:
    server, _ = backend
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url], websockets=False)])
    with serve(host_app(gateway)) as g, pytest.raises(Exception, match="403|rejected"):
        with ws_connect(g.url.replace("http", "ws") + "/api/ws"):
            pass


# --- lifespan -------------------------------------------------------------------------------------


def test_lifespan_starts_and_stops_the_gateway(backend: tuple[ServerThread, BackendState]) -> None:
    server, _ = backend
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])])
    assert not gateway.running
    with serve(host_app(gateway)) as g:
        assert gateway.running
        assert httpx.get(g.url + "/api/x").json()["backend"] == "a"
        scheduler = gateway._scheduler
        assert scheduler is not None and scheduler._tasks, "idle probing and health checks run"
    assert not gateway.running
    assert not scheduler._tasks, "no task left behind"
    assert connections_closed(gateway._transport)


def test_the_default_transport_is_h1(backend: tuple[ServerThread, BackendState]) -> None:
    server, _ = backend
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])])
    with serve(host_app(gateway)) as g:
        assert httpx.get(g.url + "/api/x").json()["backend"] == "a"
        # The suite's switch (tests/conftest.py) may put aiohttp underneath.
        switched = os.environ.get("PREQUAL_TEST_TRANSPORT") == "aiohttp"
        assert type(gateway._transport) is (AiohttpTransport if switched else H1Transport)


def connections_closed(transport: object) -> bool:
    """Whether the gateway's default transport (H1, or aiohttp under the suite's switch) holds nothing open."""
    if isinstance(transport, H1Transport):
        return transport._pool.closed and not transport._pool.connections and transport._websockets is None
    if isinstance(transport, AiohttpTransport):
        return transport._session is None
    raise AssertionError(f"not a default transport: {transport!r}")


@pytest.mark.parametrize("unsupported", ["raises", "returns"])
def test_app_without_lifespan_support_still_starts_the_gateway(
    backend: tuple[ServerThread, BackendState], unsupported: str
) -> None:
    server, _ = backend

    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # both are ways ASGI allows an app to say "no lifespan here"
            if unsupported == "raises":
                raise RuntimeError("lifespan is not supported here")
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])])
    with serve(PrequalMiddleware(bare, gateway=gateway), lifespan="on") as g:
        assert gateway.running
        assert httpx.get(g.url + "/api/x").status_code == 200
        assert httpx.get(g.url + "/other").status_code == 204
    assert not gateway.running


async def test_not_running_gateway_answers_503(backend: tuple[ServerThread, BackendState]) -> None:
    server, _ = backend
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])])
    transport = httpx.ASGITransport(app=host_app(gateway))  # runs no lifespan
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.get("/api/x")
        assert response.status_code == 503 and response.json()["error"] == "gateway_not_running"
        async with gateway:  # managing the lifespan yourself
            assert (await client.get("/api/x")).json()["backend"] == "a"
        assert not gateway.running


# --- transports and probes -------------------------------------------------------------------------


def test_httpx_transport(backend: tuple[ServerThread, BackendState]) -> None:
    server, _ = backend
    transport = HttpxTransport(httpx.AsyncClient(headers={"x-client-default": "1"}), close_client=True)
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[server.url])], transport=transport)
    with serve(host_app(gateway), proxy_headers=False) as g:
        echo = httpx.post(g.url + "/api/q%2F?a=1&a=2", content=b"body").json()
        assert (echo["raw_path"], echo["query"], echo["body_len"]) == ("/q%2F", "a=1&a=2", 4)
        names = {k for k, _ in echo["headers"]}
        assert "x-client-default" not in names, "the client's default headers are not sent"
        response = httpx.get(g.url + "/api/cookies")
        assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert len(transport.client.cookies.jar) == 0, "the jar keeps nothing"
        refused = httpx.get(g.url + "/api/status/503")
        assert refused.status_code == 503 and "x-prequal-pool" not in refused.headers


def test_probes_reach_only_live_members() -> None:
    app_a, state_a = make_backend("a")
    app_b, state_b = make_backend("b")
    with serve(app_a) as a, serve(app_b) as b:
        gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
        app = Starlette(routes=[Mount("/_prequal", gateway.admin_app())])
        app.add_middleware(PrequalMiddleware, gateway=gateway)
        with serve(app) as g, httpx.Client(base_url=g.url) as client:
            for server in (a, b):
                assert client.post("/_prequal/register", json={"url": server.url}).status_code == 201
            for _ in range(20):
                client.get("/api/x")
            wait_for(lambda: state_a.probes_seen > 0 and state_b.probes_seen > 0, what="both backends probed")
            assert client.post("/_prequal/unregister", json={"url": b.url}).status_code == 200
            # Probes sent before the unregistration may still land: wait until none is in flight.
            pool = gateway.pools["/api"]
            wait_for(lambda: pool.probes_in_flight == 0, timeout_s=10.0, what="the probes in flight to land")
            b_before = state_b.probes_seen
            backends = {client.get("/api/x").json()["backend"] for _ in range(30)}
            time.sleep(1.0)  # and idle probing goes on
            assert backends == {"a"}
            assert state_b.probes_seen == b_before, "a member that left gets no more probes"
            assert probe_rif(a) == 0, "probes are never counted as requests in flight"


def test_concurrency_limits(backend: tuple[ServerThread, BackendState]) -> None:
    server, _ = backend
    gateway = Gateway(
        pools=[
            UpstreamPool("/pool", upstreams=[server.url], max_in_flight=2, retry_after_s=3),
            UpstreamPool("/each", upstreams=[server.url], max_in_flight_per_backend=1),
        ]
    )

    async def burst(url: str, path: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return list(await asyncio.gather(*(client.get(path) for _ in range(5))))

    with serve(host_app(gateway)) as g:
        responses = asyncio.run(burst(g.url, "/pool/sleep?s=0.5"))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 503, 503, 503]
        overloaded = next(r for r in responses if r.status_code == 503)
        assert overloaded.json()["error"] == "pool_overloaded" and overloaded.headers["retry-after"] == "3"
        responses = asyncio.run(burst(g.url, "/each/sleep?s=0.5"))
        assert sorted(r.status_code for r in responses) == [200, 503, 503, 503, 503]
        assert next(r for r in responses if r.status_code == 503).json()["error"] == "no_backend"

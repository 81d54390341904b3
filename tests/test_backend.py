"""LoadReportingMiddleware on a real uvicorn server: RIF counting, latency samples, the probe endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from prequal_middleware.admin.routes import admin_routes
from prequal_middleware.backend.load_reporting import DEFAULT_EXCLUDED_PATHS, LoadReportingMiddleware
from prequal_middleware.config import AdminSettings, HealthSettings, ProbeSettings
from prequal_middleware.core.load_tracker import LoadTracker
from tests.servers import ServerThread

PROBE = "/_prequal/probe"
WAIT_S = 5.0


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[ServerThread]:
    """``tests.servers.serve`` with TCP_NODELAY on the listening socket.

    The helper's socket is made without ``IPPROTO_TCP``, so asyncio does not set TCP_NODELAY on the
    connections it accepts; uvicorn writes a response's head and body separately, and on a keep-alive
    connection the body then waits ~40 ms for the client's delayed ACK. Accepted sockets inherit it.
    """
    server = ServerThread(app, **config)
    server.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Gate:
    """An asyncio.Event on the server's loop that handlers wait on and the test opens from its own."""

    def __init__(self) -> None:
        self.entered = 0
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def wait(self) -> None:
        if self._event is None:
            self._event, self._loop = asyncio.Event(), asyncio.get_running_loop()
        self.entered += 1
        await self._event.wait()

    def open(self) -> None:
        assert self._loop is not None and self._event is not None
        self._loop.call_soon_threadsafe(self._event.set)


class Recorder:
    """Innermost ASGI layer: records what reaches the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class GiveUpOnDisconnect:
    """An ASGI endpoint that notices its client left before it answered, and returns without a response."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def build(gate: Gate, **settings: Any) -> tuple[LoadReportingMiddleware, Recorder]:
    async def hold(request: Request) -> Response:
        await gate.wait()
        return PlainTextResponse("released")

    async def sleep_then(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params["s"]))
        status = int(request.query_params.get("status", "200"))
        return PlainTextResponse("done", status_code=status)

    async def boom(request: Request) -> Response:
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first;"
            await gate.wait()
            yield b"last"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def endless(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 16
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def app_probe_post(request: Request) -> Response:
        return PlainTextResponse("the app")

    async def health(request: Request) -> Response:
        # A slow health check while the gate is shut (a busy event loop, a check that touches a database).
        await gate.wait()
        return PlainTextResponse("ok")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_text(f"echo:{text}")

    routes = [
        Route("/hold", hold),
        Route("/sleep", sleep_then),
        Route("/boom", boom),
        Route("/stream", stream),
        Route("/endless", endless),
        Route(PROBE, app_probe_post, methods=["POST"]),
        Route("/abandon", GiveUpOnDisconnect()),
        Route("/healthz", health),
        Route("/ping", health),
        WebSocketRoute("/ws", echo),
    ]
    recorder = Recorder(Starlette(routes=routes))
    return LoadReportingMiddleware(recorder, **settings), recorder


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def stack(gate: Gate) -> tuple[LoadReportingMiddleware, Recorder]:
    return build(gate)


@pytest.fixture
def server(stack: tuple[LoadReportingMiddleware, Recorder]) -> Iterator[ServerThread]:
    with serve(stack[0]) as running:
        yield running


@pytest.fixture
async def http(server: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        yield client


async def probe(http: httpx.AsyncClient) -> tuple[int, int]:
    response = await http.get(PROBE)
    assert response.status_code == 200
    rif, latency_us = int(response.headers["x-prequal-rif"]), int(response.headers["x-prequal-latency-us"])
    body = response.json()
    assert body["rif"] == rif
    assert round(body["latency_s"] * 1e6) == latency_us
    return rif, latency_us


async def test_rif_counts_requests_in_flight_and_returns_to_zero(http: httpx.AsyncClient, gate: Gate) -> None:
    held = [asyncio.create_task(http.get("/hold")) for _ in range(5)]
    await until(lambda: gate.entered == 5, "5 requests in the handler")
    assert await probe(http) == (5, 0)
    gate.open()
    responses = await asyncio.gather(*held)
    assert [r.text for r in responses] == ["released"] * 5
    rif, latency_us = await probe(http)
    assert rif == 0
    assert latency_us > 0, "5 successes are fresh samples"


async def test_probes_are_not_counted_and_never_reach_the_app(
    http: httpx.AsyncClient, stack: tuple[LoadReportingMiddleware, Recorder]
) -> None:
    middleware, recorder = stack
    for _ in range(30):
        assert await probe(http) == (0, 0)
    assert recorder.seen == []
    assert middleware.tracker.rif == 0
    assert middleware.tracker.estimate(time.monotonic()) == 0.0, "probes are never latency samples"


async def test_probe_wire_format(http: httpx.AsyncClient) -> None:
    response = await http.get(PROBE)
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-prequal-rif"] == "0"
    assert response.headers["x-prequal-latency-us"] == "0"
    assert response.text == '{"rif": 0, "latency_s": 0.0}'
    assert int(response.headers["content-length"]) == len(response.content)


async def test_head_probe_has_the_headers_and_no_body(http: httpx.AsyncClient) -> None:
    get = await http.get(PROBE)
    head = await http.head(PROBE)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["x-prequal-rif"] == "0"
    assert head.headers["x-prequal-latency-us"] == "0"
    assert head.headers["content-length"] == get.headers["content-length"]


async def test_query_string_is_ignored_on_the_probe_path(
    http: httpx.AsyncClient, stack: tuple[LoadReportingMiddleware, Recorder]
) -> None:
    response = await http.get(PROBE, params={"from": "gateway-1"})
    assert response.json() == {"rif": 0, "latency_s": 0.0}
    assert stack[1].seen == []


async def test_other_methods_on_the_probe_path_go_to_the_app(
    http: httpx.AsyncClient, stack: tuple[LoadReportingMiddleware, Recorder]
) -> None:
    response = await http.post(PROBE)
    assert response.text == "the app"
    assert stack[1].seen == [("POST", PROBE)]
    assert stack[0].tracker.rif == 0


async def test_a_streamed_response_counts_until_its_last_chunk(http: httpx.AsyncClient, gate: Gate) -> None:
    async with http.stream("GET", "/stream") as response:
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"first;"
        assert (await probe(http))[0] == 1
        gate.open()
        assert b"".join([chunk async for chunk in chunks]) == b"last"
    assert (await probe(http))[0] == 0


async def test_client_gone_mid_response_is_counted_out(
    server: ServerThread, http: httpx.AsyncClient, stack: tuple[LoadReportingMiddleware, Recorder]
) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: test\r\n\r\n")
    assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")
    assert await reader.read(1)  # the body has started
    assert (await probe(http))[0] == 1
    writer.close()
    await writer.wait_closed()
    await until(lambda: stack[0].tracker.rif == 0, "RIF back to 0")
    assert await probe(http) == (0, 0), "an incomplete response is not a latency sample"


async def test_client_gone_before_the_response_is_counted_out(
    server: ServerThread, http: httpx.AsyncClient, stack: tuple[LoadReportingMiddleware, Recorder]
) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /abandon HTTP/1.1\r\nHost: test\r\n\r\n")
    await until(lambda: ("GET", "/abandon") in stack[1].seen, "the request to reach the app")
    assert (await probe(http))[0] == 1
    writer.close()
    await writer.wait_closed()
    await until(lambda: stack[0].tracker.rif == 0, "RIF back to 0")
    assert await probe(http) == (0, 0)


async def test_errors_are_counted_out_and_not_sampled(http: httpx.AsyncClient) -> None:
    # uvicorn closes the connection after an app exception: do not leave it for httpx to reuse.
    assert (await http.get("/boom", headers={"connection": "close"})).status_code == 500
    assert (await http.get("/sleep", params={"s": 0.05, "status": 500})).status_code == 500
    assert (await http.get("/sleep", params={"s": 0.05, "status": 429})).status_code == 429
    assert await probe(http) == (0, 0)


async def test_a_success_after_a_delay_is_the_latency_estimate(http: httpx.AsyncClient) -> None:
    assert (await http.get("/sleep", params={"s": 0.1, "status": 500})).status_code == 500
    assert (await http.get("/sleep", params={"s": 0.1})).status_code == 200
    rif, latency_us = await probe(http)
    assert rif == 0
    assert 100_000 <= latency_us < 300_000
    assert (await http.get("/sleep", params={"s": 0.1, "status": 404})).status_code == 404
    assert 100_000 <= (await probe(http))[1] < 300_000, "a 4xx is a served request, so a sample"


async def test_websocket_passes_through_uncounted(
    server: ServerThread, http: httpx.AsyncClient, stack: tuple[LoadReportingMiddleware, Recorder]
) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=WAIT_S) == "echo:hi"
        assert stack[0].tracker.rif == 0
        assert (await probe(http))[0] == 0


async def test_slow_health_checks_are_not_load(http: httpx.AsyncClient, gate: Gate) -> None:
    # The gateway's own checks (HealthSettings.path, /healthz by default) are not client load.
    checks = [asyncio.create_task(http.get("/healthz")) for _ in range(5)]
    await until(lambda: gate.entered == 5, "5 health checks in the handler")
    assert await probe(http) == (0, 0), "health checks in flight are not RIF"
    await asyncio.sleep(0.1)
    gate.open()
    assert [r.text for r in await asyncio.gather(*checks)] == ["ok"] * 5
    assert await probe(http) == (0, 0), "a 100 ms health check is not a latency sample"
    assert (await http.get("/sleep", params={"s": 0.05})).status_code == 200
    rif, latency_us = await probe(http)
    assert rif == 0
    assert 50_000 <= latency_us < 250_000, "a client request still is one"


async def test_quick_health_checks_do_not_pull_the_latency_estimate_to_zero(
    http: httpx.AsyncClient, gate: Gate
) -> None:
    first = asyncio.create_task(http.get("/healthz"))
    await until(lambda: gate.entered == 1, "a health check in the handler")
    gate.open()  # from here on health checks are quick
    assert (await first).text == "ok"
    assert (await http.get("/sleep", params={"s": 0.1})).status_code == 200
    for _ in range(5):
        assert (await http.get("/healthz")).text == "ok"
    rif, latency_us = await probe(http)
    assert rif == 0
    assert 100_000 <= latency_us < 300_000, "the median is still the one client request's latency"


async def test_custom_excluded_paths_replace_the_defaults(gate: Gate) -> None:
    middleware, recorder = build(gate, excluded_paths={"/ping"})
    assert middleware.excluded_paths == frozenset({"/ping"})
    with serve(middleware) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as http:
            ping = asyncio.create_task(http.get("/ping"))
            await until(lambda: gate.entered == 1, "the ping in the handler")
            assert (await probe(http))[0] == 0
            health = asyncio.create_task(http.get("/healthz"))
            await until(lambda: gate.entered == 2, "the health check in the handler")
            assert (await probe(http))[0] == 1, "/healthz is not in the custom set: it counts"
            gate.open()
            await asyncio.gather(ping, health)
    assert recorder.seen == [("GET", "/ping"), ("GET", "/healthz")], "excluded paths still reach the app"


async def test_no_excluded_paths_makes_health_checks_count_again(gate: Gate) -> None:
    middleware, _ = build(gate, excluded_paths=())
    with serve(middleware) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as http:
            checks = [asyncio.create_task(http.get("/healthz")) for _ in range(3)]
            await until(lambda: gate.entered == 3, "3 health checks in the handler")
            assert await probe(http) == (3, 0)
            await asyncio.sleep(0.1)
            gate.open()
            await asyncio.gather(*checks)
            rif, latency_us = await probe(http)
            assert rif == 0
            assert latency_us >= 100_000


async def test_excluded_paths_are_relative_to_a_mount() -> None:
    inner = Recorder(PlainTextResponse("inner"))
    middleware = LoadReportingMiddleware(inner)
    app = Starlette(routes=[Mount("/svc", app=middleware)])
    with serve(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/svc/healthz")).text == "inner"
            assert middleware.tracker.estimate(time.monotonic()) == 0.0
            assert (await http.get("/svc/other")).text == "inner"
            assert middleware.tracker.estimate(time.monotonic()) > 0.0


def test_default_excluded_paths_cover_the_gateways_own_requests() -> None:
    # Kept in step with the gateway: its default health check and its admin routes at /_prequal.
    middleware = LoadReportingMiddleware(PlainTextResponse("app"))
    assert HealthSettings().path in middleware.excluded_paths
    assert ProbeSettings().path == PROBE
    assert PROBE in middleware.excluded_paths
    fake_gateway: Any = SimpleNamespace(admin=AdminSettings(), allow_list=None)
    admin_paths = {f"/_prequal{route.path}" for route in admin_routes(fake_gateway) if isinstance(route, Route)}
    assert admin_paths <= middleware.excluded_paths
    assert LoadReportingMiddleware(PlainTextResponse("app"), probe_path="/load").excluded_paths == (
        DEFAULT_EXCLUDED_PATHS | {"/load"}
    )
    with pytest.raises(TypeError):
        LoadReportingMiddleware(PlainTextResponse("app"), excluded_paths="/healthz")


def test_lifespan_passes_through() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(lifespan=lifespan)
    app.add_middleware(LoadReportingMiddleware)
    with serve(app, lifespan="on"):
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]


async def test_probe_path_is_relative_to_a_mount() -> None:
    inner = Recorder(PlainTextResponse("inner"))
    app = Starlette(routes=[Mount("/svc", app=LoadReportingMiddleware(inner))])
    with serve(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.get(f"/svc{PROBE}")
            assert response.headers["x-prequal-rif"] == "0"
            assert (await http.get("/svc/other")).text == "inner"
    assert inner.seen == [("GET", "/svc/other")]


async def test_add_middleware_and_a_custom_probe_path() -> None:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(LoadReportingMiddleware, probe_path="/load")
    with serve(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/")).text == "hello"
            assert (await http.get("/load")).headers["x-prequal-rif"] == "0"
            assert (await http.get(PROBE)).status_code == 404


async def test_cancellation_counts_out_without_a_sample() -> None:
    # The one thing a server cannot show on demand: the app's task cancelled mid-request.
    started = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        await asyncio.sleep(60)

    now = [10.0]
    middleware = LoadReportingMiddleware(app, tracker=LoadTracker(), clock=lambda: now[0])
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "root_path": ""}
    task = asyncio.create_task(middleware(scope, _never_receive, _discard))
    await started.wait()
    assert middleware.tracker.rif == 1
    now[0] = 10.5
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert middleware.tracker.report(now[0]) == (0, 0.0)


async def test_finishes_once_on_the_last_chunk_before_background_work() -> None:
    sent: list[Message] = []
    after_final: list[int] = []
    now = [0.0]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        now[0] = 0.25
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        after_final.append(middleware.tracker.rif)
        now[0] = 5.0  # background work after the response: not latency, not RIF
        await asyncio.sleep(0)

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = LoadReportingMiddleware(app, clock=lambda: now[0])
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "root_path": ""}
    await middleware(scope, _never_receive, send)
    assert after_final == [0]
    assert len(sent) == 3
    assert middleware.tracker.report(0.3) == (0, 0.25)


async def _never_receive() -> Message:
    await asyncio.sleep(60)
    return {"type": "http.disconnect"}


async def _discard(message: Message) -> None:
    pass


async def test_every_counted_response_carries_the_report_of_the_others_in_flight(
    http: httpx.AsyncClient, gate: Gate
) -> None:
    assert (await http.get("/sleep", params={"s": 0.05})).status_code == 200
    alone = await http.get("/sleep", params={"s": 0.05})
    assert alone.headers["x-prequal-rif"] == "0", "the request answered is not counted in its own report"
    assert 50_000 <= int(alone.headers["x-prequal-latency-us"]) < 300_000, "the estimate at RIF 0"
    held = [asyncio.create_task(http.get("/hold")) for _ in range(3)]
    await until(lambda: gate.entered == 3, "3 requests in the handler")
    counted = await http.get("/sleep", params={"s": 0})
    assert counted.headers["x-prequal-rif"] == "3"
    assert counted.headers.get_list("x-prequal-rif") == ["3"]
    gate.open()
    await asyncio.gather(*held)
    beside = await http.get("/healthz")  # excluded from load: no report
    assert "x-prequal-rif" not in beside.headers
    errored = await http.get("/sleep", params={"s": 0, "status": 503})
    assert errored.headers["x-prequal-rif"] == "0", "errors carry the report too"


async def test_reports_on_responses_can_be_turned_off(gate: Gate) -> None:
    middleware, _ = build(gate, report_on_responses=False)
    with serve(middleware) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            response = await client.get("/sleep", params={"s": 0})
            assert response.status_code == 200
            assert "x-prequal-rif" not in response.headers
            assert "x-prequal-latency-us" not in response.headers
            assert (await client.get(PROBE)).headers["x-prequal-rif"] == "0", "probes are still answered"

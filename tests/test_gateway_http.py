"""The gateway end to end: a real uvicorn gateway in front of real backends, over loopback sockets."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from prequal_middleware import Gateway, PrequalMiddleware, RequestLimits, RetrySettings, Timeouts, UpstreamPool
from tests.apps import BackendState, make_backend, random_bytes
from tests.helpers import probe_rif, wait_for
from tests.servers import ServerThread, free_port, serve


@dataclass
class Fleet:
    gateway: Gateway
    url: str
    port: int
    a: ServerThread
    b: ServerThread
    c: ServerThread
    plain: ServerThread
    state_a: BackendState
    state_b: BackendState
    dead: str


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    app_a, state_a = make_backend("a")
    app_b, state_b = make_backend("b")
    app_c, _ = make_backend("c")
    app_plain, _ = make_backend("plain", instrumented=False)
    app_slow, _ = make_backend("slow")
    # /slow has a backend of its own: the 504 test leaves a 10 s request sleeping there, which must
    # not count in a's RIF or hold up the teardown (graceful shutdown gives it 1 s).
    with (
        serve(app_a) as a,
        serve(app_b) as b,
        serve(app_c) as c,
        serve(app_plain) as plain,
        serve(app_slow, timeout_graceful_shutdown=1) as slow,
    ):
        dead = f"http://127.0.0.1:{free_port()}"
        gateway = Gateway(
            pools=[
                UpstreamPool("/api", upstreams=[a.url, b.url]),
                UpstreamPool("/api/v2", upstreams=[c.url]),
                UpstreamPool("/raw", upstreams=[a.url], strip_prefix=False, policy="round_robin"),
                UpstreamPool("/host", upstreams=[a.url], preserve_host=True),
                UpstreamPool("/empty"),
                UpstreamPool("/dead", upstreams=[dead], retry=RetrySettings(attempts=1)),
                UpstreamPool("/mixed", upstreams=[dead, b.url], policy="round_robin"),
                UpstreamPool("/slow", upstreams=[slow.url], timeouts=Timeouts(response_headers_s=0.3)),
                UpstreamPool("/idle", upstreams=[a.url], timeouts=Timeouts(read_idle_s=0.3)),
                UpstreamPool("/plain", upstreams=[plain.url]),
                UpstreamPool("/nows", upstreams=[a.url], websockets=False),
                UpstreamPool(
                    "/limited",
                    upstreams=[a.url],
                    limits=RequestLimits(max_headers=20, max_header_bytes=2048, max_body_bytes=1000),
                ),
            ]
        )

        async def hello(request: Request) -> PlainTextResponse:
            return PlainTextResponse("hello from the host app")

        host = Starlette(routes=[Route("/hello", hello), Route("/apix", hello)])
        host.add_middleware(PrequalMiddleware, gateway=gateway)
        with serve(host, server_header=False, date_header=False, proxy_headers=False) as g:
            yield Fleet(gateway, g.url, g.port, a, b, c, plain, state_a, state_b, dead)


@pytest.fixture
def client(fleet: Fleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=10.0) as c:
        yield c


def raw_http(port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (the request should say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def headers_of(echo: dict[str, object]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in echo["headers"]]  # type: ignore[misc, union-attr]


# --- routing -------------------------------------------------------------------------------------


def test_host_app_routes_pass_through(client: httpx.Client) -> None:
    assert client.get("/hello").text == "hello from the host app"
    assert client.get("/nope").status_code == 404, "unmatched paths reach the host app (its 404)"


def test_prefix_matches_on_a_segment_boundary(client: httpx.Client) -> None:
    assert client.get("/apix").text == "hello from the host app", "/apix is not under /api"
    assert client.get("/api").json()["raw_path"] == "/"
    assert client.get("/api/").json()["raw_path"] == "/"


def test_longest_prefix_wins(client: httpx.Client) -> None:
    assert client.get("/api/v2/items").json()["backend"] == "c"
    assert client.get("/api/v2").json()["backend"] == "c"
    assert client.get("/api/v20").json()["backend"] in {"a", "b"}, "/api/v20 is under /api, not /api/v2"


def test_strip_prefix_or_not(client: httpx.Client) -> None:
    assert client.get("/api/users/7").json()["raw_path"] == "/users/7"
    assert client.get("/raw/users/7").json()["raw_path"] == "/raw/users/7"


def test_concurrent_requests_spread_over_the_pool(fleet: Fleet) -> None:
    # Sequential requests to an idle pool may all go to the faster backend: that is Prequal's rule
    # (the cold probe with the lowest latency wins). Requests in flight together must spread.
    # Clients built first and a barrier: the 12 requests start together and, each 1 s long, overlap.
    clients = [httpx.Client(base_url=fleet.url, timeout=10.0) for _ in range(12)]
    start = threading.Barrier(len(clients), timeout=10.0)

    def one(c: httpx.Client) -> str:
        start.wait()
        return c.get("/api/sleep", params={"s": "1.0"}).text

    try:
        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            answers = Counter(pool.map(one, clients))
    finally:
        for c in clients:
            c.close()
    assert set(answers) == {"slept a", "slept b"}, answers
    assert min(answers.values()) >= 3, f"12 requests in flight together were not balanced: {answers}"


# --- bytes and headers -----------------------------------------------------------------------------


def test_path_and_query_are_byte_exact(client: httpx.Client) -> None:
    echo = client.get(httpx.URL("/api/a%2Fb/%7Ec?x=1&x=2&y=%2F&z=a+b&empty=")).json()
    assert echo["raw_path"] == "/a%2Fb/%7Ec"
    assert echo["query"] == "x=1&x=2&y=%2F&z=a+b&empty="


def test_large_bodies_both_ways_are_byte_exact(client: httpx.Client) -> None:
    upload = random_bytes(5 * 1024 * 1024, seed=3)
    echo = client.post("/api/upload", content=upload).json()
    assert echo["body_len"] == len(upload)
    assert echo["body_sha256"] == hashlib.sha256(upload).hexdigest()
    download = client.get(f"/api/download/{5 * 1024 * 1024}")
    assert download.content == random_bytes(5 * 1024 * 1024, seed=5 * 1024 * 1024)


def test_chunked_upload(client: httpx.Client) -> None:
    parts = [random_bytes(100_000, seed=i) for i in range(5)]
    echo = client.post("/api/chunked", content=iter(parts)).json()
    assert ("transfer-encoding", "chunked") in headers_of(echo), "no length declared: streamed chunked"
    assert echo["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_gzip_passes_untouched(client: httpx.Client) -> None:
    with client.stream("GET", "/api/gzip", headers={"accept-encoding": "gzip"}) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert raw == gzip.compress(b"hello gzip " * 100, mtime=0), "the backend's bytes, not re-encoded"


def test_nothing_is_invented_upstream(fleet: Fleet) -> None:
    reply = raw_http(fleet.port, b"GET /api/bare HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n")
    body = reply.split(b"\r\n\r\n", 1)[1]
    import json

    headers = json.loads(body)["headers"]
    names = {k for k, _ in headers}
    # x-request-id: made by the gateway when the client sent none (gateway.request_id), for the logs.
    assert names == {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id"}, names
    via = next(v for k, v in headers if k == "via")
    assert via.startswith("1.1 prequal-"), "RFC 9110 section 7.6.3: a pseudonym, nothing about the host"


def test_forwarded_headers(client: httpx.Client, fleet: Fleet) -> None:
    echo = client.get("/api/fwd", headers={"x-forwarded-for": "203.0.113.9", "host": "public.example"}).json()
    headers = dict(headers_of(echo))
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1", "appended, never replaced"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "public.example"
    assert headers["host"] in {f"127.0.0.1:{fleet.a.port}", f"127.0.0.1:{fleet.b.port}"}, "the backend's Host"


def test_preserve_host(client: httpx.Client) -> None:
    echo = client.get("/host/x", headers={"host": "public.example"}).json()
    assert dict(headers_of(echo))["host"] == "public.example"


def test_duplicate_headers_are_kept(client: httpx.Client) -> None:
    echo = client.get("/api/dup", headers=[("x-dup", "1"), ("x-dup", "2")]).json()
    assert [v for k, v in headers_of(echo) if k == "x-dup"] == ["1", "2"]
    response = client.get("/api/cookies")
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_hop_by_hop_headers_are_dropped_both_ways(fleet: Fleet, client: httpx.Client) -> None:
    request = (
        b"GET /api/hop-in HTTP/1.1\r\nHost: gw\r\nConnection: close, x-secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Kept: yes\r\n\r\n"
    )
    import json

    echo = json.loads(raw_http(fleet.port, request).split(b"\r\n\r\n", 1)[1])
    names = {k for k, _ in echo["headers"]}
    assert "x-kept" in names
    assert not names & {"connection", "x-secret", "keep-alive", "te", "proxy-authorization"}, names
    response = client.get("/api/hop")
    assert response.headers.get("x-public") == "ok"
    assert "x-private" not in response.headers, "named in the backend's Connection header"
    assert "keep-alive" not in response.headers


def test_request_smuggling_shapes_are_refused(fleet: Fleet) -> None:
    for request in (
        b"POST /api/s HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    ):
        reply = raw_http(fleet.port, request)
        assert reply.startswith(b"HTTP/1.1 400"), reply[:60]
    # Content-Length and Transfer-Encoding together: 400, and the connection is closed (what follows the
    # body on it could be a smuggled request). raw_http reads until the server closes.
    smuggle = (
        b"POST /api/s HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    reply = raw_http(fleet.port, smuggle)
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1") == 1, reply


# --- responses ---------------------------------------------------------------------------------------


def test_redirects_are_not_followed_and_location_is_rewritten(client: httpx.Client) -> None:
    response = client.get("/api/redirect", headers={"host": "public.example"})
    assert response.status_code == 302
    # A relative reference under the prefix: the client's Host (forgeable) never goes into it.
    assert response.headers["location"] == "/api/target?x=1"
    response = client.get("/raw/redirect", headers={"host": "public.example"})
    assert response.headers["location"] == "/target?x=1", "strip_prefix=False: no prefix"


def test_streaming_first_byte_arrives_before_the_end(client: httpx.Client) -> None:
    started = time.monotonic()
    with client.stream("GET", "/api/stream?pause=3.0") as response:
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = b"".join(chunks)
        done_at = time.monotonic() - started
    assert first.startswith(b"first chunk")
    assert first_at < 2.0, f"first chunk after {first_at:.2f} s: buffered?"  # buffered: >= 3 s
    assert done_at >= 2.95 and rest.endswith(b"second chunk\n")


def test_upstream_status_passes_through(client: httpx.Client) -> None:
    response = client.get("/api/status/418")
    assert response.status_code == 418
    assert "x-prequal-pool" not in response.headers, "only gateway-made errors carry the pool header"


# --- errors ---------------------------------------------------------------------------------------


def assert_gateway_error(response: httpx.Response, status: int, error: str, pool: str) -> None:
    assert response.status_code == status
    assert response.headers["x-prequal-pool"] == pool
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == error and body["pool"] == pool
    assert "Traceback" not in response.text and "Error" not in body["detail"]


def test_empty_pool_is_503_with_retry_after(client: httpx.Client) -> None:
    response = client.get("/empty/x")
    assert_gateway_error(response, 503, "no_backend", "/empty")
    assert response.headers["retry-after"] == "1"


def test_unreachable_backend_is_502(client: httpx.Client) -> None:
    assert_gateway_error(client.get("/dead/x"), 502, "upstream_unreachable", "/dead")


def test_timeout_is_504(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.get("/slow/sleep?s=10")
    elapsed = time.monotonic() - started
    assert_gateway_error(response, 504, "upstream_timeout", "/slow")
    assert 0.25 < elapsed < 5.0, f"504 after {elapsed:.2f} s for a 0.3 s timeout (the backend answers at 10 s)"


def test_a_body_that_stalls_is_cut_at_the_idle_timeout(client: httpx.Client) -> None:
    started = time.monotonic()
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", "/idle/stream?pause=3") as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    elapsed = time.monotonic() - started
    assert received == b"first chunk\n", "what arrived before the stall was passed on"
    assert 0.25 < elapsed < 2.5, f"cut after {elapsed:.2f} s for a 0.3 s idle timeout (the stall is 3 s)"


def test_refused_connection_is_retried_on_another_backend(client: httpx.Client) -> None:
    statuses = [client.post("/mixed/x", content=b"payload").status_code for _ in range(20)]
    assert statuses == [200] * 20, "POST too: nothing was sent to the refusing backend"


# --- load reporting and probes -----------------------------------------------------------------------


def test_uninstrumented_backend_falls_back_to_the_local_view(client: httpx.Client, fleet: Fleet) -> None:
    for _ in range(10):
        assert client.get("/plain/x").json()["backend"] == "plain"
        time.sleep(0.01)
    modes = {b.id: b.probe_mode for b in fleet.gateway.snapshot()["pools"]["/plain"]["clients"][0].backends}
    assert modes == {fleet.plain.url: "local"}


def test_instrumented_backends_are_probed(client: httpx.Client, fleet: Fleet) -> None:
    for _ in range(30):
        client.get("/api/p")
    snapshot = fleet.gateway.snapshot()["pools"]["/api"]["clients"][0]
    assert {b.probe_mode for b in snapshot.backends} == {"probe"}
    assert all(b.rif is not None for b in snapshot.backends), "each backend answered probes"
    assert snapshot.selections["cold"] + snapshot.selections["hot"] > 0, "HCL was used, not only the fallback"


def test_probes_never_count_in_rif(fleet: Fleet) -> None:
    time.sleep(1.2)  # idle probing goes on with no traffic; only a health check may be in flight
    for server in (fleet.a, fleet.b):
        readings = [int(httpx.get(server.url + "/_prequal/probe").headers["x-prequal-rif"]) for _ in range(20)]
        assert min(readings) == 0 and max(readings) <= 1, readings


# --- limits ---------------------------------------------------------------------------------------


def test_request_limits(client: httpx.Client, fleet: Fleet) -> None:
    assert client.post("/limited/ok", content=b"x" * 1000).json()["body_len"] == 1000
    many = client.get("/limited/x", headers=[(f"x-h{i}", "1") for i in range(25)])
    assert_gateway_error(many, 431, "headers_too_large", "/limited")
    big = client.get("/limited/x", headers={"x-big": "y" * 3000})
    assert_gateway_error(big, 431, "headers_too_large", "/limited")
    declared = client.post("/limited/x", content=b"x" * 1001)
    assert_gateway_error(declared, 413, "body_too_large", "/limited")
    streamed = client.post("/limited/x", content=iter([b"x" * 600, b"x" * 600]))
    assert_gateway_error(streamed, 413, "body_too_large", "/limited")
    wait_for(lambda: probe_rif(fleet.a.url) == 0, what="the cut-off upload to end at the backend")


def test_oversized_upstream_response_headers_are_a_502(client: httpx.Client) -> None:
    # aiohttp's default limit on one response header line is 8190 bytes.
    response = client.get("/api/huge-header")
    assert response.status_code == 502 and response.json()["error"] == "upstream_error"


def test_the_backends_load_report_is_the_gateways_not_the_clients(fleet: Fleet, client: httpx.Client) -> None:
    direct = httpx.get(fleet.a.url + "/echo")
    assert "x-prequal-rif" in direct.headers, "the backend piggybacks its report on every response"
    via = client.get("/api/echo")
    assert via.status_code == 200
    assert "x-prequal-rif" not in via.headers and "x-prequal-latency-us" not in via.headers

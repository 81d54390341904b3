"""``prequal_middleware.testing`` through the real entry point: a user's Starlette app wrapped in
``PrequalMiddleware``, its ``Gateway`` on a ``MockTransport`` and a ``FakeClock``, served by a real uvicorn
on loopback (which runs the lifespan, so the gateway starts and stops as in production), and the README's
example, which drives the app in-process with ``httpx.ASGITransport``."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from prequal_middleware import (
    Gateway,
    HealthSettings,
    LoadReportingMiddleware,
    OutlierSettings,
    PrequalMiddleware,
    Timeouts,
    UpstreamConnectError,
    UpstreamPool,
)
from prequal_middleware.testing import CannedResponse, FakeClock, MockTransport
from tests.servers import serve

A, B, C = "http://a.invalid", "http://b.invalid", "http://c.invalid"
NO_HEALTH_CHECKS = HealthSettings(path=None)


def backend(name: str) -> Starlette:
    """A backend as a user writes one: it says who it is and what it got, and reports its load."""

    async def echo(request: Request) -> Response:
        return JSONResponse(
            {
                "backend": name,
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "host": request.headers.get("host"),
                "body": (await request.body()).decode(),
            }
        )

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    app.add_middleware(LoadReportingMiddleware)
    return app


def user_app(gateway: Gateway) -> Starlette:
    async def home(request: Request) -> Response:
        return PlainTextResponse("the host app")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


def test_requests_reach_the_in_process_backends_and_are_recorded() -> None:
    transport = MockTransport({A: backend("a"), B: backend("b")})
    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[A, B], policy="round_robin")], transport=transport)
    with serve(user_app(gateway)) as server, httpx.Client(base_url=server.url) as client:
        answers = [client.get(f"/api/users/{i}?q=x%20y").json() for i in range(4)]
        posted = client.post("/api/orders", content=b"two widgets")
        assert client.get("/").text == "the host app"

    assert Counter(a["backend"] for a in answers) == {"a": 2, "b": 2}, "round robin over both backends"
    assert answers[0]["path"].startswith("/users/") and answers[0]["query"] == "q=x%20y", "prefix stripped, query kept"
    assert answers[0]["host"] in ("a.invalid", "b.invalid"), "the backend's own Host"
    assert posted.status_code == 200 and posted.json()["body"] == "two widgets"
    assert "x-prequal-rif" not in posted.headers, "the gateway strips the backend's load report"

    sent = [r for r in transport.requests if r.target != "/healthz"]
    assert [(r.method, r.target) for r in sent] == [("GET", f"/users/{i}?q=x%20y") for i in range(4)] + [
        ("POST", "/orders")
    ]
    assert sent[-1].body == b"two widgets"
    assert sent[-1].header("X-Forwarded-For") == "127.0.0.1", "the gateway's headers are what the double saw"
    assert {r.backend for r in sent} == {A, B}
    assert len(transport.sent_to(A)) + len(transport.sent_to(B)) == len(transport.requests)


def test_canned_answers_failures_and_unknown_backends() -> None:
    transport = MockTransport({A: CannedResponse(503, [(b"content-type", b"text/plain")], b"busy")})
    pools = [
        UpstreamPool("/canned", upstreams=[A], health=NO_HEALTH_CHECKS),
        UpstreamPool("/down", upstreams=[B], health=NO_HEALTH_CHECKS),
        UpstreamPool("/unknown", upstreams=[C], health=NO_HEALTH_CHECKS),
    ]
    transport.backends[B] = UpstreamConnectError("refused")
    with (
        serve(user_app(Gateway(pools=pools, transport=transport))) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        canned = client.get("/canned/x")
        down = client.get("/down/x")
        unknown = client.get("/unknown/x")
    assert (canned.status_code, canned.text, canned.headers["content-type"]) == (503, "busy", "text/plain")
    assert down.status_code == 502 and down.headers["content-type"].startswith("application/json")
    assert unknown.status_code == 502
    assert [r.backend for r in transport.requests] == [A, B, C], "failures are recorded too"


def test_a_slow_or_crashing_app_is_a_timeout_or_a_broken_exchange() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(30)
        return PlainTextResponse("late")

    async def crash(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("backend bug")  # before any answer: the exchange broke

    async def crash_in_starlette(request: Request) -> Response:
        raise RuntimeError("backend bug")  # Starlette answers 500 first, as it would under uvicorn

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk {i};".encode()

        return StreamingResponse(chunks())

    quick = Timeouts(response_headers_s=0.2)
    transport = MockTransport(
        {
            A: Starlette(routes=[Route("/", slow)]),
            B: crash,
            "http://d.invalid": Starlette(routes=[Route("/", crash_in_starlette)]),
            C: Starlette(routes=[Route("/", stream)]),
        }
    )
    pools = [
        UpstreamPool(f"/{name}", upstreams=[url], timeouts=quick, health=NO_HEALTH_CHECKS)
        for name, url in (("slow", A), ("crash", B), ("stream", C), ("crash500", "http://d.invalid"))
    ]
    with (
        serve(user_app(Gateway(pools=pools, transport=transport))) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert client.get("/slow/").status_code == 504
        assert client.get("/crash/").status_code == 502
        assert client.get("/crash500/").status_code == 500
        streamed = client.get("/stream/")
    assert streamed.status_code == 200 and streamed.text == "chunk 0;chunk 1;chunk 2;"


def test_the_fake_clock_drives_ejection_and_return() -> None:
    # b refuses connections: after 2 failures in a row it is ejected for 10 s of *gateway* time, so it
    # gets nothing while the fake clock stands still, however long the test runs, and traffic again
    # once the test moves the clock past the ejection.
    clock = FakeClock()
    transport = MockTransport({A: backend("a"), B: UpstreamConnectError("refused"), C: backend("c")})
    outliers = OutlierSettings(consecutive_failures=2, base_ejection_s=10.0, max_ejection_s=10.0)
    pool = UpstreamPool("/api", upstreams=[A, B, C], policy="round_robin", outliers=outliers, health=NO_HEALTH_CHECKS)
    gateway = Gateway(pools=[pool], transport=transport, clock=clock)
    with serve(user_app(gateway)) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(6):
            assert client.get("/api/x").status_code == 200, "a refused connection is retried on another backend"
        failed = len(transport.sent_to(B))
        assert failed == 2, "b was tried until it was ejected"

        transport.backends[B] = backend("b")  # b is back, but still ejected
        clock.advance(9.9)
        assert {client.get("/api/x").json()["backend"] for _ in range(6)} == {"a", "c"}
        assert len(transport.sent_to(B)) == failed

        clock.advance(0.2)
        assert "b" in {client.get("/api/x").json()["backend"] for _ in range(6)}, "the ejection ended"


def test_fake_clock() -> None:
    clock = FakeClock(5.0)
    assert clock() == 5.0
    clock.advance(0.25)
    assert clock() == 5.25
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    assert FakeClock()() == 1000.0


async def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Testing your app\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    script = tmp_path / "test_readme_example.py"
    script.write_text(code, encoding="utf-8")
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, str(script), "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_") and callable(value)]
    assert tests, "the README example defines a test"
    for test in tests:
        await test()

"""ProbeClient against real servers on loopback: parsing, keep-alive, timeouts, failures, stale connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.transports.probe import (
    ProbeClient,
    ProbeError,
    ProbeFailed,
    ProbeResult,
    ProbeUnsupported,
)
from tests.servers import ServerThread, free_port

WAIT_S = 5.0


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` on the running loop (its callbacks must run meanwhile) for up to ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {WAIT_S} s waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[ServerThread]:
    """``tests.servers.serve`` with TCP_NODELAY on the listening socket (see tests/test_backend.py)."""
    server = ServerThread(app, **config)
    server.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ClientPorts:
    """Outermost ASGI layer: the client port of every HTTP request, probes included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.ports: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.ports.append(scope["client"][1])
        await self.app(scope, receive, send)


def reporting_app() -> tuple[ClientPorts, LoadReportingMiddleware, asyncio.Event]:
    release = asyncio.Event()  # bound to the server's loop on first use (Python >= 3.10)

    async def hold(request: Request) -> Response:
        await release.wait()
        return PlainTextResponse("released")

    async def sleep(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params["s"]))
        return PlainTextResponse("slept")

    middleware = LoadReportingMiddleware(Starlette(routes=[Route("/hold", hold), Route("/sleep", sleep)]))
    return ClientPorts(middleware), middleware, release


@pytest.fixture
async def client() -> AsyncIterator[ProbeClient]:
    probe_client = ProbeClient(timeout_s=1.0)
    yield probe_client
    await probe_client.aclose()


@contextlib.asynccontextmanager
async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A plain asyncio server on loopback running ``handle`` per connection; yields its URL."""
    handlers: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append((task, writer))
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            await handle(reader, writer)
        writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task, _ in handlers:
            task.cancel()
        await asyncio.gather(*(task for task, _ in handlers))
        await server.wait_closed()


def answer(headers: bytes, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n" + body


LOAD = b"x-prequal-rif: 7\r\nx-prequal-latency-us: 1500\r\n"
GOOD = answer(LOAD + b"content-length: 2\r\n", b"{}")


async def test_parses_rif_and_latency(client: ProbeClient) -> None:
    ports, middleware, release = reporting_app()
    with serve(ports) as server:
        assert await client.probe(server.url) == ProbeResult(rif=0, latency_s=0.0)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as http:
            started = time.monotonic()
            assert (await http.get("/sleep", params={"s": 0.05})).status_code == 200
            round_trip = time.monotonic() - started
            result = await client.probe(server.url)
            assert result.rif == 0
            # The backend's own measure of the request: at least its sleep, at most the client's round trip
            # (not a fixed ceiling: a loaded machine stretches both; a wrong unit or start is far above).
            assert 0.05 <= result.latency_s <= round_trip
            assert result.latency_s == round(middleware.tracker.estimate(time.monotonic()) * 1e6) / 1e6

            held = [asyncio.create_task(http.get("/hold")) for _ in range(3)]
            deadline = time.monotonic() + WAIT_S
            while middleware.tracker.rif < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert (await client.probe(server.url)).rif == 3
            assert server.loop is not None
            server.loop.call_soon_threadsafe(release.set)
            await asyncio.gather(*held)
        assert (await client.probe(server.url)).rif == 0


async def test_keep_alive_reuses_one_connection(client: ProbeClient) -> None:
    ports, _, _ = reporting_app()
    with serve(ports) as server:
        results = [await client.probe(server.url) for _ in range(20)]
        assert results == [ProbeResult(0, 0.0)] * 20
        assert len(ports.ports) == 20
        assert len(set(ports.ports)) == 1, "serial probes share one keep-alive connection"
        assert len(client._open) == 1


async def test_concurrent_probes_keep_at_most_max_idle() -> None:
    ports, _, _ = reporting_app()
    client = ProbeClient(timeout_s=WAIT_S, max_idle_per_backend=2)
    try:
        with serve(ports) as server:
            results = await asyncio.gather(*(client.probe(server.url) for _ in range(6)))
            assert [r.rif for r in results] == [0] * 6
            idle = client._backends[server.url].idle
            assert len(idle) == 2
            assert set(client._open) == set(idle), "connections past the idle cap are closed"
            await client.probe(server.url)
            assert len(set(ports.ports)) == 6, "the seventh probe reused an idle connection"
    finally:
        await client.aclose()


async def test_base_path_prefixes_the_probe_path(client: ProbeClient) -> None:
    ports, _, _ = reporting_app()
    with serve(Starlette(routes=[Mount("/svc", app=ports)])) as server:
        assert await client.probe(f"{server.url}/svc/") == ProbeResult(0, 0.0)
        assert await client.probe(f"{server.url}/svc") == ProbeResult(0, 0.0)
        assert len(ports.ports) == 2


@pytest.mark.parametrize(
    ("path", "methods", "status"),
    [("/elsewhere", ["GET"], "404"), ("/_prequal/probe", ["POST"], "405"), ("/{any:path}", ["GET"], "200")],
    ids=["404", "405", "catch-all-200"],
)
async def test_backend_without_the_middleware_is_unsupported(
    client: ProbeClient, path: str, methods: list[str], status: str
) -> None:
    async def other(request: Request) -> Response:
        return PlainTextResponse("not a probe")

    with serve(Starlette(routes=[Route(path, other, methods=methods)])) as server:
        with pytest.raises(ProbeUnsupported, match=f"{server.url}: {status}"):
            await client.probe(server.url)
        assert client._open == set(), "a connection that failed a probe is not kept"


async def test_connection_refused_fails(client: ProbeClient) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ProbeFailed, match="connect failed"):
        await client.probe(url)
    assert client._open == set()


async def test_a_silent_server_times_out_on_time() -> None:
    requests: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(WAIT_S)

    client = ProbeClient(timeout_s=0.1)
    try:
        async with raw_server(silent) as url:
            started = time.monotonic()
            with pytest.raises(ProbeFailed, match="no answer within 100 ms"):
                await client.probe(url)
            elapsed = time.monotonic() - started
            # At the deadline, not when the silent server gives up (WAIT_S): the ceiling allows a loaded machine.
            assert 0.1 <= elapsed < WAIT_S / 2
            assert requests == [f"GET /_prequal/probe HTTP/1.1\r\nHost: {url[7:]}\r\n\r\n".encode()]
            assert client._open == set() and client._backends[url].idle == [], "a timed-out connection is closed"
            task = asyncio.current_task()
            assert task is not None
            if hasattr(task, "cancelling"):  # Python >= 3.11 counts cancellations
                assert task.cancelling() == 0, "the timeout's cancellation is taken back"
    finally:
        await client.aclose()


async def test_a_caller_cancellation_stays_a_cancellation(client: ProbeClient) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(WAIT_S)

    async with raw_server(silent) as url:
        task = asyncio.create_task(client.probe(url))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert client._open == set()


async def test_idle_connections_closed_by_the_server_are_replaced(client: ProbeClient) -> None:
    ports, _, _ = reporting_app()
    with serve(ports, timeout_keep_alive=0.1) as server:
        assert (await client.probe(server.url)).rif == 0
        # Polled: the server closes it after 0.1 s idle, later on a loaded machine; kept forever, it times out.
        await eventually(lambda: client._backends[server.url].idle == [], "connection_lost to drop it from idle")
        assert (await client.probe(server.url)).rif == 0
        assert len(set(ports.ports)) == 2


async def test_a_reused_connection_lost_before_answering_is_retried_once(client: ProbeClient) -> None:
    connections: list[int] = []

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers a first probe with keep-alive, then closes on the next request: the race of a server
        # closing an idle connection just as the client sends on it.
        connections.append(len(connections))
        await reader.readuntil(b"\r\n\r\n")
        writer.write(GOOD)
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with raw_server(one_answer_per_connection) as url:
        assert await client.probe(url) == ProbeResult(7, 0.0015)
        assert await client.probe(url) == ProbeResult(7, 0.0015)
        assert len(connections) == 2


async def test_a_fresh_connection_lost_before_answering_fails(client: ProbeClient) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with raw_server(hang_up) as url:
        with pytest.raises(ProbeFailed, match="connection closed"):
            await client.probe(url)


@pytest.mark.parametrize(
    ("response", "error", "match"),
    [
        (b"HELLO\r\n\r\n", ProbeFailed, "malformed"),
        (answer(b"content-length: 0\r\n"), ProbeUnsupported, "200 without x-prequal-rif"),
        (answer(b"x-prequal-rif: many\r\ncontent-length: 0\r\n"), ProbeFailed, "invalid"),
        (answer(b"x-prequal-rif: -1\r\ncontent-length: 0\r\n"), ProbeFailed, "invalid"),
        (answer(b"x-prequal-rif: 1\r\nx-prequal-latency-us: 1.5\r\ncontent-length: 0\r\n"), ProbeFailed, "invalid"),
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", ProbeFailed, "unexpected status 503"),
        (b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n", ProbeUnsupported, "405"),
    ],
)
async def test_bad_answers_fail_and_close(
    client: ProbeClient, response: bytes, error: type[ProbeError], match: str
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await asyncio.sleep(WAIT_S)

    async with raw_server(reply) as url:
        with pytest.raises(error, match=match):
            await client.probe(url)
        assert client._open == set()


@pytest.mark.parametrize(
    ("response", "kept"),
    [
        (GOOD, True),
        (answer(LOAD + b"transfer-encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"), True),
        (answer(LOAD + b"content-length: 2\r\nconnection: close\r\n", b"{}"), False),
        (answer(LOAD, b"{} until EOF"), False),
    ],
    ids=["content-length", "chunked", "connection-close", "until-eof"],
)
async def test_body_framing_decides_reuse(client: ProbeClient, response: bytes, kept: bool) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await asyncio.sleep(WAIT_S)

    async with raw_server(reply) as url:
        assert await client.probe(url) == ProbeResult(7, 0.0015)
        assert len(client._backends[url].idle) == int(kept)
        assert len(client._open) == int(kept)


async def test_a_body_split_across_packets_is_consumed_before_reuse(client: ProbeClient) -> None:
    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            for i in range(0, len(GOOD), 7):
                writer.write(GOOD[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0.002)

    async with raw_server(dribble) as url:
        for _ in range(3):
            assert await client.probe(url) == ProbeResult(7, 0.0015)
        assert len(client._open) == 1


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "http://", "http://127.0.0.1:99999", "127.0.0.1:8000"])
async def test_invalid_urls_fail_clearly(client: ProbeClient, url: str) -> None:
    with pytest.raises(ProbeFailed, match="(?i)url|port"):
        await client.probe(url)


async def test_https_to_a_plain_http_server_fails(client: ProbeClient) -> None:
    ports, _, _ = reporting_app()
    with serve(ports) as server:
        with pytest.raises(ProbeFailed, match="connect failed"):
            await client.probe(server.url.replace("http://", "https://"))


async def test_aclose_closes_everything_and_then_refuses() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(WAIT_S)

    client = ProbeClient(timeout_s=WAIT_S)
    ports, _, _ = reporting_app()
    with serve(ports) as server:
        async with raw_server(silent) as silent_url:
            await asyncio.gather(*(client.probe(server.url) for _ in range(3)))
            in_flight = asyncio.create_task(client.probe(silent_url))
            await asyncio.sleep(0.05)
            connections = list(client._open)
            assert len(connections) == 4
            await client.aclose()
            with pytest.raises(ProbeFailed, match="the probe client is closed"):
                await in_flight
            assert client.closed
            assert client._open == set()
            assert client._backends[server.url].idle == []
            for conn in connections:
                assert conn.transport is not None and conn.transport.is_closing()
                assert conn.transport.get_extra_info("socket").fileno() == -1, "the socket itself is closed"
            with pytest.raises(ProbeFailed, match="closed"):
                await client.probe(server.url)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="path"):
        ProbeClient(path="probe")
    with pytest.raises(ValueError, match="timeout_s"):
        ProbeClient(timeout_s=0)
    with pytest.raises(ValueError, match="max_idle_per_backend"):
        ProbeClient(max_idle_per_backend=-1)


async def test_forget_drops_a_backend(client: ProbeClient) -> None:
    ports, _, _ = reporting_app()
    with serve(ports) as server:
        await client.probe(server.url)
        client.forget(server.url)
        await asyncio.sleep(0)
        assert server.url not in client._backends
        assert client._open == set()
        assert (await client.probe(server.url)).rif == 0


class Outcomes:
    """A ``ProbeClient.send`` callback that records every call and wakes a waiter on the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[ProbeResult | None, ProbeError | None]] = []
        self.event = asyncio.Event()

    def __call__(self, result: ProbeResult | None, error: ProbeError | None) -> None:
        self.calls.append((result, error))
        self.event.set()

    async def first(self) -> tuple[ProbeResult | None, ProbeError | None]:
        await asyncio.wait_for(self.event.wait(), WAIT_S)
        return self.calls[0]


async def test_send_on_a_kept_alive_connection_runs_no_task(client: ProbeClient) -> None:
    ports, middleware, release = reporting_app()
    with serve(ports) as server:
        await client.probe(server.url)  # opens the connection the next probe reuses
        tasks_before = asyncio.all_tasks()
        outcomes = Outcomes()
        handle = client.send(server.url, outcomes)
        assert handle is not None and not handle.done
        assert asyncio.all_tasks() == tasks_before, "a probe on an idle connection is callbacks only"
        assert await outcomes.first() == (ProbeResult(0, 0.0), None)
        await asyncio.sleep(0.05)
        assert len(outcomes.calls) == 1, "called back exactly once"
        assert handle.done
        assert len(set(ports.ports)) == 1, "the same connection served both probes"


async def test_send_opens_a_connection_when_none_is_idle(client: ProbeClient) -> None:
    ports, _, _ = reporting_app()
    with serve(ports) as server:
        outcomes = [Outcomes() for _ in range(3)]
        for o in outcomes:
            client.send(server.url, o)
        for o in outcomes:
            assert await o.first() == (ProbeResult(0, 0.0), None)
        assert len(set(ports.ports)) == 3, "concurrent probes each had a connection of their own"
        assert len(client._backends[server.url].idle) == 3


async def test_send_reports_a_refused_url_before_returning(client: ProbeClient) -> None:
    outcomes = Outcomes()
    assert client.send("ftp://example.invalid", outcomes) is None
    assert len(outcomes.calls) == 1
    result, error = outcomes.calls[0]
    assert result is None and isinstance(error, ProbeFailed) and "not an http:// or https:// URL" in str(error)


async def test_send_times_out_once_and_closes_the_connection() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(WAIT_S)

    client = ProbeClient(timeout_s=0.1)
    try:
        async with raw_server(silent) as url:
            outcomes = Outcomes()
            started = time.monotonic()
            client.send(url, outcomes)
            result, error = await outcomes.first()
            # At the deadline, not when the silent server gives up (WAIT_S): the ceiling allows a loaded machine.
            assert 0.1 <= time.monotonic() - started < WAIT_S / 2
            assert result is None and isinstance(error, ProbeFailed) and "no answer within 100 ms" in str(error)
            await asyncio.sleep(0.05)
            assert len(outcomes.calls) == 1
            assert client._open == set() and not client._connecting
    finally:
        await client.aclose()


async def test_a_cancelled_send_is_never_reported_and_frees_its_connection(client: ProbeClient) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(WAIT_S)

    async with raw_server(silent) as url:
        outcomes = Outcomes()
        handle = client.send(url, outcomes)
        assert handle is not None
        await asyncio.sleep(0.05)
        assert len(client._open) == 1
        handle.cancel()
        await asyncio.sleep(0.05)
        assert outcomes.calls == [] and client._open == set()


async def test_a_failing_callback_is_logged_and_the_connection_kept(
    client: ProbeClient, caplog: pytest.LogCaptureFixture
) -> None:
    ports, _, _ = reporting_app()
    calls: list[ProbeResult | None] = []

    def broken(result: ProbeResult | None, error: ProbeError | None) -> None:
        calls.append(result)
        raise RuntimeError("bug in the caller")

    with serve(ports) as server:
        client.send(server.url, broken)
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls == [ProbeResult(0, 0.0)]
        assert "probe callback failed" in caplog.text
        assert (await client.probe(server.url)).rif == 0
        assert len(set(ports.ports)) == 1, "the connection survived the caller's bug"


async def test_aclose_reports_a_probe_still_connecting_at_once() -> None:
    # The connect task has not taken a step yet when aclose() cancels it: the probe must still be
    # reported as closed before aclose() returns, not at its deadline much later.
    ports, _, _ = reporting_app()
    client = ProbeClient(timeout_s=WAIT_S)
    with serve(ports) as server:
        outcomes = Outcomes()
        assert client.send(server.url, outcomes) is not None
        assert len(client._connecting) == 1
        await client.aclose()
        assert len(outcomes.calls) == 1
        result, error = outcomes.calls[0]
        assert result is None and isinstance(error, ProbeFailed) and "the probe client is closed" in str(error)
        await asyncio.sleep(0.05)
        assert len(outcomes.calls) == 1, "reported once"
        assert not client._connecting and client._open == set()

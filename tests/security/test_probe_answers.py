"""Hostile probe answers (issue 12, item 7a): a backend's answer to a probe is untrusted bytes.

The probe client either pools a value in range, parsed from a plain decimal field, or reports a failed
probe; it never raises, never buffers without bound, and never hands the policy a value that breaks
selection. Fuzzed against a real ``ProbeClient`` over loopback and a real ``PrequalPolicy``, then
through a real gateway where one of three backends poisons its probe answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from prequal_middleware import Gateway, HealthSettings, UpstreamPool
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.core import Member, PrequalPolicy, PrequalSettings
from prequal_middleware.exceptions import ProbeError, ProbeFailed
from prequal_middleware.transports.probe import ProbeClient, ProbeResult
from tests.helpers import gateway_app
from tests.reliability.rawservers import LoopThread
from tests.servers import serve

WAIT_S = 5.0
# The bounds the probe client documents (stated here too, so that this file also runs against older code).
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 4 * 1024
MAX_RIF = 1_000_000
MAX_LATENCY_US = 600_000_000
RIF = b"x-prequal-rif"
LATENCY = b"x-prequal-latency-us"


# --- a backend that answers every request with the same crafted bytes ---------------------------------


@dataclass
class Crafted:
    """What the raw server writes per request: ``chunks`` one write each, then maybe a close."""

    chunks: list[bytes] = field(default_factory=list)
    close: bool = False


@contextlib.asynccontextmanager
async def crafted_server(reply: Crafted) -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                for chunk in reply.chunks:
                    writer.write(chunk)
                    await writer.drain()
                if reply.close:
                    break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", writers
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


# --- the strategy: status line, fields, values, framing, segmentation ----------------------------------

POISONS = [
    b"+5",
    b" 5 ",
    b"5 5",
    b"5_0",
    "\u0663".encode(),  # ARABIC-INDIC DIGIT THREE: int("٣") == 3
    "\uff15".encode(),  # FULLWIDTH DIGIT FIVE
    b"-0",
    b"-1",
    b"0x10",
    b"1e3",
    b"nan",
    b"inf",
    b"-inf",
    b"1.5",
    b"",
    b"\t7\t",
    b"0" * 20 + b"1",
    b"9" * 400,  # an int that float() refuses: OverflowError in the hot/cold threshold
    b"9" * 5000,  # past Python's int-from-string limit
    str(MAX_RIF + 1).encode(),
    str(MAX_LATENCY_US + 1).encode(),
    b"\x00",
    b"5\x00",
    b"5\r\nx-prequal-rif: 6",
]
VALUES = st.one_of(
    st.integers(0, MAX_RIF).map(lambda n: str(n).encode()),
    st.sampled_from(POISONS),
    st.sampled_from(POISONS),
    st.integers(-(10**30), 10**30).map(lambda n: str(n).encode()),
    st.binary(max_size=12),
)
NAMES = st.one_of(
    st.sampled_from([RIF, LATENCY, b"X-Prequal-RIF", b"X-PREQUAL-LATENCY-US", b"x-other", b"connection"]),
    st.binary(min_size=1, max_size=8),
)
STATUS_LINES = st.one_of(
    st.just(b"HTTP/1.1 200 OK"),  # most answers get past the status, so that the fields are what is tested
    st.just(b"HTTP/1.1 200 OK"),
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 ",
            b"HTTP/1.0 200 OK",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
            b"HTTP/1.1 103 Early\r\nx-prequal-rif: 9\r\n\r\nHTTP/1.1 200 OK",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 503 X",
            b"HTTP/1.1 999 X",
            b"HTTP/1.1 -200 X",
            b"HTTP/2 200",
            b"ICY 200 OK",
        ]
    ),
    st.binary(max_size=20),
)
FRAMINGS = st.one_of(
    st.sampled_from(["length", "chunked", "none"]),
    st.sampled_from(["length", "chunked", "none", "short", "oversized-body", "oversized-head", "endless"]),
)


@st.composite
def answers(draw: st.DrawFn) -> tuple[Crafted, bytes]:
    status = draw(STATUS_LINES)
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=4))
    fields.append((RIF, draw(VALUES)))
    if draw(st.integers(0, 3)) == 0:
        fields.append((draw(st.sampled_from([RIF, b"X-Prequal-Rif"])), draw(VALUES)))
    if draw(st.booleans()):
        fields.append((LATENCY, draw(VALUES)))
    draw(st.randoms(use_true_random=False)).shuffle(fields)
    body = draw(st.binary(max_size=64))
    framing = draw(FRAMINGS)
    if framing == "length":
        fields.append((b"content-length", str(len(body)).encode()))
    elif framing == "short":
        fields.append((b"content-length", str(len(body) + 5).encode()))
    elif framing == "chunked":
        fields.append((b"transfer-encoding", b"chunked"))
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif framing == "oversized-body":
        body = b"x" * (MAX_BODY_BYTES + 1)
        fields.append((b"content-length", str(len(body)).encode()))
    elif framing == "oversized-head":
        fields.append((b"x-padding", b"p" * MAX_HEAD_BYTES))
        fields.append((b"content-length", b"0"))
        body = b""
    elif framing == "endless":
        fields.append((b"transfer-encoding", b"chunked"))
        body = b"10\r\n" + b"y" * 16 + b"\r\n"
    head = status + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in fields) + b"\r\n"
    trailing = draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\nx-prequal-rif: 1\r\ncontent-length: 0\r\n\r\n"]))
    payload = head + body + trailing
    if framing == "endless":
        payload = head + body * 400  # 8 KiB of an unending chunked body, then more of it per request
    cuts = sorted(set(draw(st.lists(st.integers(0, len(payload)), max_size=4))))
    chunks = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True) if payload[a:b]]
    return Crafted(chunks, close=draw(st.booleans())), payload


def plain_values(payload: bytes, name: bytes) -> list[bytes]:
    """The values of ``name`` fields anywhere in ``payload`` that are plain decimal integers."""
    found = []
    for line in payload.split(b"\n"):
        key, sep, value = line.rstrip(b"\r").partition(b":")
        value = value.strip(b" \t")
        if sep and key.lower() == name and re.fullmatch(rb"[0-9]{1,12}", value):
            found.append(value)
    return found


# --- the fuzz test -------------------------------------------------------------------------------------


class Harness:
    """One event loop for every example: a crafted server, and per example a fresh client and policy."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        self.reply = Crafted()
        self._server: contextlib.AbstractAsyncContextManager[tuple[str, list[asyncio.StreamWriter]]] | None = None
        self.url = ""

    def start(self) -> None:
        self._server = crafted_server(self.reply)
        self.url = self.loop.run_until_complete(self._server.__aenter__())[0]

    def close(self) -> None:
        assert self._server is not None
        self.loop.run_until_complete(self._server.__aexit__(None, None, None))
        self.loop.close()

    async def run(self, reply: Crafted) -> list[tuple[ProbeResult | None, ProbeError | None]]:
        self.reply.chunks, self.reply.close = reply.chunks, reply.close
        client = ProbeClient(timeout_s=0.1)
        # The Prequal client of a pool of two: the crafted backend and a well-behaved one at RIF 0.
        policy = PrequalPolicy(PrequalSettings(), rng=random.Random(7))
        now = self.loop.time()
        policy.set_members([Member(self.url), Member("http://good")], now)
        policy.on_probe("http://good", now, 0, 0.001)
        outcomes: list[tuple[ProbeResult | None, ProbeError | None]] = []
        try:
            for _ in range(2):  # the backend answers every probe the same way: twice in the RIF history
                done = asyncio.Event()

                def report(result: ProbeResult | None, error: ProbeError | None, done: asyncio.Event = done) -> None:
                    outcomes.append((result, error))
                    if result is not None:
                        policy.on_probe(self.url, self.loop.time(), result.rif, result.latency_s)
                    else:
                        policy.on_probe_failure(self.url, self.loop.time())
                    done.set()

                client.send(self.url, report)
                await asyncio.wait_for(done.wait(), WAIT_S)
            now = self.loop.time()
            for _ in range(4):
                assert policy.select(now) is not None, "the pool keeps choosing"
            policy.snapshot(now)
        finally:
            await client.aclose()
        return outcomes


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    h.start()
    yield h
    h.close()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(answer=answers())
def test_any_probe_answer_pools_a_plain_value_in_range_or_fails(
    harness: Harness, answer: tuple[Crafted, bytes]
) -> None:
    reply, payload = answer
    harness.loop_errors.clear()
    outcomes = harness.loop.run_until_complete(harness.run(reply))
    assert len(outcomes) == 2, "each probe reported exactly once"
    for result, error in outcomes:
        assert (result is None) != (error is None)
        if error is not None:
            assert isinstance(error, ProbeError)
            continue
        assert result is not None
        assert type(result.rif) is int and 0 <= result.rif <= MAX_RIF, result
        assert 0.0 <= result.latency_s <= MAX_LATENCY_US / 1e6, result
        assert str(result.rif).encode() in [v.lstrip(b"0") or b"0" for v in plain_values(payload, RIF)], (
            f"{result} pooled from {payload[:300]!r}"
        )
        latency_us = round(result.latency_s * 1e6)
        if latency_us:
            plain = [v.lstrip(b"0") for v in plain_values(payload, LATENCY)]
            assert str(latency_us).encode() in plain, f"{result} pooled from {payload[:300]!r}"
    assert harness.loop_errors == [], "nothing raised out of the client's callbacks"


# --- each rule on its own -------------------------------------------------------------------------------


def head(*fields: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + b"content-length: 0\r\n\r\n"


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (head(b"x-prequal-rif: 1", b"x-prequal-rif: 2"), "given twice"),
        (head(b"x-prequal-rif: 1", b"x-prequal-latency-us: 5", b"X-Prequal-Latency-US: 6"), "given twice"),
        (head(b"x-prequal-rif: +5"), "invalid load headers"),
        (head(b"x-prequal-rif: 5_0"), "invalid load headers"),
        (head(b"x-prequal-rif: 5 0"), "invalid load headers"),
        (head("x-prequal-rif: \u0663".encode()), "invalid load headers"),
        (head(b"x-prequal-rif: " + b"9" * 400), "invalid load headers"),
        (head(b"x-prequal-rif: 1000001"), "invalid load headers"),
        (head(b"x-prequal-rif: 1", b"x-prequal-latency-us: 600000001"), "invalid load headers"),
        (head(b"x-prequal-rif: 1", b"x-prequal-latency-us: " + b"9" * 400), "invalid load headers"),
        (head(b"x-prequal-rif: 1", b"x-pad: " + b"p" * MAX_HEAD_BYTES), "head larger than"),
        (
            b"HTTP/1.1 200 OK\r\nx-prequal-rif: 1\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
            + b"b" * (MAX_BODY_BYTES + 1),
            "body larger than",
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_HEAD_BYTES // 20) + head(b"x-prequal-rif: 1"), "head larger than"),
        (head(b"x-prequal-rif: 1") + head(b"x-prequal-rif: 2"), "bytes after the response"),
    ],
)
async def test_each_bad_answer_is_a_failed_probe_and_closes_its_connection(payload: bytes, match: str) -> None:
    client = ProbeClient(timeout_s=WAIT_S)
    try:
        async with crafted_server(Crafted([payload])) as (url, _):
            with pytest.raises(ProbeFailed, match=match):
                await client.probe(url)
            await asyncio.sleep(0)
            assert client._open == set() and client._backends[url].idle == []
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("value", "rif"), [(b"0", 0), (b"  7\t", 7), (b"000042", 42), (str(MAX_RIF).encode(), MAX_RIF)]
)
async def test_plain_values_in_range_are_pooled(value: bytes, rif: int) -> None:
    client = ProbeClient(timeout_s=WAIT_S)
    payload = head(b"x-prequal-rif: " + value, b"x-prequal-latency-us: %d" % MAX_LATENCY_US)
    try:
        async with crafted_server(Crafted([payload])) as (url, _):
            assert await client.probe(url) == ProbeResult(rif, MAX_LATENCY_US / 1e6)
    finally:
        await client.aclose()


@pytest.mark.parametrize("what", ["endless-head", "endless-body"])
async def test_an_endless_answer_fails_within_the_timeout_without_buffering_it(what: str) -> None:
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        if what == "endless-head":
            start = b"HTTP/1.1 200 OK\r\nx-prequal-rif: 1\r\nx-endless: "
        else:
            start = b"HTTP/1.1 200 OK\r\nx-prequal-rif: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(start)
        with contextlib.suppress(ConnectionError):
            while True:
                piece = b"a" * 65536 if what == "endless-head" else b"10000\r\n" + b"a" * 65536 + b"\r\n"
                writer.write(piece)
                sent += len(piece)
                await writer.drain()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    client = ProbeClient(timeout_s=2.0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started = asyncio.get_running_loop().time()
        with pytest.raises(ProbeFailed, match="larger than"):
            await client.probe(url)
        assert asyncio.get_running_loop().time() - started < 1.0, "failed at the bound, not at the timeout"
        await asyncio.sleep(0.2)
        assert client._open == set()
        assert sent < 4 * 1024 * 1024, "the connection was closed, so the backend stopped writing"
    finally:
        await client.aclose()
        server.close()


# --- through a real gateway: one of three backends poisons its probe answers --------------------------

POISONED_ANSWERS = [
    head(b"x-prequal-rif: " + b"9" * 400),  # float() of it overflows: selection raised, requests got 500
    head(b"x-prequal-rif: 1", b"x-prequal-rif: " + b"9" * 400),
    head(b"x-prequal-rif: +0", b"x-prequal-latency-us: -0"),
    head(b"x-prequal-rif: 0", b"x-prequal-latency-us: " + b"9" * 400),
    head(b"x-prequal-rif: 0", b"x-pad: " + b"p" * 20000),
    head(b"x-prequal-rif: 0") + head(b"x-prequal-rif: 0"),
    head(b"x-prequal-rif: 0"),  # now and then a valid answer, so that it is also chosen
]


class PoisonedBackend:
    """Serves requests with 200 and answers probes with ``POISONED_ANSWERS`` in turn."""

    def __init__(self) -> None:
        self.loop = LoopThread().start()
        self.probes = 0
        self.requests = 0
        self.server: asyncio.Server | None = None

    def start(self) -> str:
        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self.server = self.loop.call(listen())
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()

        with contextlib.suppress(TimeoutError):
            self.loop.call(close(), timeout_s=2.0)
        self.loop.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                if request.startswith(b"GET /_prequal/probe "):
                    writer.write(POISONED_ANSWERS[self.probes % len(POISONED_ANSWERS)])
                    self.probes += 1
                else:
                    self.requests += 1
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned")
                await writer.drain()
        writer.close()


def named_app(name: str) -> Any:
    async def hello(request: Request) -> Response:
        return PlainTextResponse(name)

    return LoadReportingMiddleware(Starlette(routes=[Route("/{path:path}", hello)]))


def test_one_poisoned_backend_cannot_fail_the_pool() -> None:
    poisoned = PoisonedBackend()
    try:
        poisoned_url = poisoned.start()
        with serve(named_app("a")) as a, serve(named_app("b")) as b:
            pool = UpstreamPool(
                "/api",
                upstreams=[a.url, b.url, poisoned_url],
                # The paper's settings (Q_RIF 0.84): with one backend in three, its RIFs are the top third
                # of the history, so the quantile lands on them. A pool of two does it at the default 0.6.
                prequal=PrequalSettings.paper(),
                health=HealthSettings(path=None),
            )
            gateway = Gateway(pools=[pool])
            with serve(gateway_app(gateway)) as gw, httpx.Client(base_url=gw.url, timeout=WAIT_S) as http:
                bodies: dict[str, int] = {}
                statuses: dict[int | str, int] = {}
                for i in range(300):
                    try:
                        reply = http.get(f"/api/{i}")
                    except httpx.TransportError as exc:  # the old code's 500 came with a closed connection
                        statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                        continue
                    statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                    bodies[reply.text] = bodies.get(reply.text, 0) + 1
                assert statuses == {200: 300}, (statuses, bodies)
                assert poisoned.probes > 20, "the poisoned backend was probed all along"
                assert bodies.get("poisoned", 0) > 0, f"the poisoned backend still serves requests: {bodies}"
                metrics = http.get("/_prequal/metrics").text
                failed = re.search(r'prequal_probes_total\{pool="/api",result="failed"\} (\S+)', metrics)
                assert failed is not None and float(failed.group(1)) > 0, "its bad answers count as failed probes"
                described = http.get("/_prequal/backends")
                assert described.status_code == 200
    finally:
        poisoned.stop()

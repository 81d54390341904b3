"""The access log and request ids through a real gateway (uvicorn) in front of real backends: one line
per proxied request in JSON or plain, every field as it happened; hostile paths cannot break a line or
forge a field; request ids made, kept, or replaced, and sent upstream on every attempt."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import socket
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from prequal_middleware import Gateway, PrequalMiddleware, UpstreamPool
from prequal_middleware.config import AccessLogSettings, HealthSettings, RetrySettings
from prequal_middleware.gateway.access_log import escape
from prequal_middleware.gateway.request_id import new_request_id
from prequal_middleware.transports.base import UpstreamRequest
from tests.apps import make_backend
from tests.helpers import gateway_app, wait_for
from tests.logcapture import Lines, captured
from tests.reliability.rawservers import LoopThread, RawRequest, RawServer, reset, response
from tests.servers import free_port, serve

LOGGER = "prequal_middleware.access"
PLAIN = re.compile(
    r'(?P<client>\S+) (?P<kind>\S+) "(?P<method>\S+) (?P<path>(?:[^"\\]|\\.)*)" (?P<status>\d+) '
    r"pool=(?P<pool>\S+) backend=(?P<backend>\S+) attempts=(?P<attempts>\d+) upstream_ms=(?P<upstream_ms>\S+) "
    r"total_ms=(?P<total_ms>\S+) bytes_in=(?P<bytes_in>\d+) bytes_out=(?P<bytes_out>\d+) "
    r"request_id=(?P<request_id>\S+)"
)
HEX32 = re.compile(r"[0-9a-f]{32}")


def _pool(upstreams: list[str], attempts: int = 2, **hooks: Any) -> UpstreamPool:
    return UpstreamPool(
        "/api",
        upstreams=upstreams,
        policy="round_robin",
        health=HealthSettings(path=None),
        retry=RetrySettings(attempts=attempts),
        **hooks,
    )


def _lines(lines: Lines, count: int) -> list[str]:
    wait_for(lambda: len(lines.messages) >= count, what=f"{count} access log lines")
    return lines.messages


def _raw_get(port: int, target: bytes, headers: bytes = b"") -> tuple[bytes, int]:
    """A GET with a target no client library would send; returns the reply and our local port."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + headers + b"\r\n")
        local = s.getsockname()[1]
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply, local


def test_json_lines_say_what_each_request_did_field_by_field() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # a connect error, retried on the live backend
    app, _ = make_backend("a")
    upload = b"u" * 1000
    with serve(app) as backend, captured(LOGGER) as lines:
        tries: dict[str, int] = {}  # attempts per request id, as the request hook saw them

        def count(request: UpstreamRequest) -> None:
            rid = dict(request.headers)[b"x-request-id"].decode()
            tries[rid] = tries.get(rid, 0) + 1

        pool = _pool([dead, backend.url], on_request=count)
        gateway = Gateway([pool], access_log=AccessLogSettings(format="json"))
        with serve(gateway_app(gateway)) as g, httpx.Client() as client:
            replies = [
                client.post(g.url + "/api/echo?q=1", content=upload, headers={"x-request-id": f"client-{i}"})
                for i in range(4)
            ]
            found = _lines(lines, 4)
    assert [r.status_code for r in replies] == [200] * 4
    records = [json.loads(line) for line in found]
    assert [list(r) for r in records] == [
        [
            "client",
            "kind",
            "method",
            "path",
            "status",
            "pool",
            "backend",
            "attempts",
            "upstream_ms",
            "total_ms",
            "bytes_in",
            "bytes_out",
            "request_id",
        ]
    ] * 4, "the documented fields, in order"
    for i, (record, reply) in enumerate(zip(records, replies, strict=True)):
        assert re.fullmatch(r"127\.0\.0\.1:\d+", record["client"])
        assert (record["kind"], record["method"], record["path"], record["status"]) == (
            "http",
            "POST",
            "/api/echo?q=1",
            200,
        )
        assert (record["pool"], record["backend"]) == ("/api", backend.url), "the last attempt's backend"
        assert record["bytes_in"] == len(upload)
        assert record["bytes_out"] == len(reply.content)
        assert record["request_id"] == f"client-{i}" == reply.headers["x-request-id"]
        assert 0 < record["upstream_ms"] <= record["total_ms"] < 5000
    assert {r["request_id"]: r["attempts"] for r in records} == tries
    assert 2 in tries.values(), "some request met the dead backend first"


def test_plain_lines_in_the_documented_order_and_gateway_errors_too() -> None:
    app, _ = make_backend("a")
    with serve(app) as backend, captured(LOGGER) as lines:
        gateway = Gateway([_pool([backend.url])], access_log=AccessLogSettings(format="plain"))
        with serve(gateway_app(gateway)) as g:
            reply, port = _raw_get(g.port, b"/api/download/300")
            big = "x" * 200_000  # 431: refused by the gateway before any attempt
            refused = httpx.get(g.url + "/api/x", headers={"x-big": big})
            found = _lines(lines, 2)
    assert refused.status_code == 431
    first = PLAIN.fullmatch(found[0])
    assert first is not None, found[0]
    assert first["client"] == f"127.0.0.1:{port}"
    assert (first["kind"], first["method"], first["path"], first["status"]) == (
        "http",
        "GET",
        "/api/download/300",
        "200",
    )
    assert (first["pool"], first["backend"], first["attempts"]) == ("/api", backend.url, "1")
    assert (first["bytes_in"], first["bytes_out"]) == ("0", "300")
    assert HEX32.fullmatch(first["request_id"]), "made by the gateway: the client sent none"
    assert first["request_id"].encode() in reply, "and returned to the client"
    assert 0 < float(first["upstream_ms"]) <= float(first["total_ms"])
    second = PLAIN.fullmatch(found[1])
    assert second is not None, found[1]
    assert (second["status"], second["backend"], second["attempts"], second["upstream_ms"]) == ("431", "-", "0", "0.0")
    assert second["request_id"] == refused.headers["x-request-id"], "a gateway-made error carries the id too"
    assert int(second["bytes_out"]) == len(refused.content) > 0


@pytest.mark.parametrize("fmt", ["json", "plain"])
def test_a_hostile_path_cannot_forge_a_field(fmt: str) -> None:
    app, _ = make_backend("a")
    with serve(app) as backend, captured(LOGGER) as lines:
        gateway = Gateway([_pool([backend.url])], access_log=AccessLogSettings(format=fmt))
        with serve(gateway_app(gateway)) as g:
            _raw_get(g.port, b'/api/x"_200_pool=forged\\"')
            found = _lines(lines, 1)
    assert len(found) == 1 and "\n" not in found[0] and "\r" not in found[0]
    if fmt == "json":
        record = json.loads(found[0])
        path, pool = record["path"], record["pool"]
    else:
        match = PLAIN.fullmatch(found[0])
        assert match is not None, found[0]
        path, pool = match["path"], match["pool"]
    assert path == '/api/x\\"_200_pool=forged\\\\\\"'
    assert pool == "/api"


async def test_control_characters_from_a_lax_server_are_escaped() -> None:
    """uvicorn refuses CR, LF and other controls in a target; a laxer ASGI server may not. The line stays one."""
    app, _ = make_backend("a")
    with serve(app) as backend, captured(LOGGER) as lines:
        gateway = Gateway([_pool([backend.url])], access_log=AccessLogSettings(format="plain", max_path_chars=64))
        middleware = PrequalMiddleware(_not_found, gateway=gateway)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        forged = b'/api/x\r\n127.0.0.1:1 http "GET /admin" 200 pool=/api\x00\x1b[31m\xff' + b"y" * 500
        scope = {
            "type": "http",
            "method": "GET",
            "path": forged.decode("latin-1"),
            "raw_path": forged,
            "query_string": b"a=\n",
            "headers": [(b"host", b"gw")],
            "client": ("127.0.0.1", 5000),
            "scheme": "http",
            "http_version": "1.1",
        }
        async with gateway:
            await middleware(scope, receive, send)
        found = _lines(lines, 1)
    assert len(found) == 1
    line = found[0]
    assert all(c >= " " and c != "\x7f" and c.isascii() for c in line), repr(line)
    match = PLAIN.fullmatch(line)
    assert match is not None, line
    assert match["path"].startswith('/api/x\\x0d\\x0a127.0.0.1:1 http \\"GET /admin\\" 200 pool=/api\\x00')
    assert match["path"].endswith("..."), "bounded"
    assert len(match["path"]) <= 64 + 3
    assert match["client"] == "127.0.0.1:5000"


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_escape_bounds_and_escapes() -> None:
    assert escape('a"b\\c\r\n\x00\x7f\xff', 100) == 'a\\"b\\\\c\\x0d\\x0a\\x00\\x7f\\xff'
    assert escape("a b", 100, bare=True) == "a\\x20b"
    assert escape("a b", 100) == "a b"
    assert escape("\u2028", 100) == "\\u2028"
    assert escape("z" * 50, 16) == "z" * 16 + "..."


def test_websocket_lines_count_messages_and_carry_the_request_id() -> None:
    app, _ = make_backend("a")
    with serve(app) as backend, captured(LOGGER) as lines:
        gateway = Gateway([_pool([backend.url])], access_log=AccessLogSettings(format="json"))
        with serve(gateway_app(gateway)) as g:
            with ws_connect(f"ws://127.0.0.1:{g.port}/api/ws", additional_headers={"x-request-id": "ws-1"}) as ws:
                assert ws.response is not None and ws.response.headers["x-request-id"] == "ws-1"
                ws.send("hello")  # 5 bytes in; "a:hello", 7 bytes out
                assert ws.recv() == "a:hello"
            found = _lines(lines, 1)
    record = json.loads(found[0])
    assert (record["kind"], record["method"], record["path"], record["status"]) == ("websocket", "GET", "/api/ws", 101)
    assert (record["backend"], record["attempts"], record["request_id"]) == (backend.url, 1, "ws-1")
    assert (record["bytes_in"], record["bytes_out"]) == (5, 7)
    assert 0 < record["upstream_ms"] <= record["total_ms"]


def test_no_access_log_unless_asked() -> None:
    app, _ = make_backend("a")
    with serve(app) as backend, captured(LOGGER, logging.DEBUG) as lines:
        gateway = Gateway([_pool([backend.url])])
        with serve(gateway_app(gateway)) as g:
            assert httpx.get(g.url + "/api/x").status_code == 200
    assert lines.messages == []
    assert gateway.observe.access_log is None and not gateway.observe.records


# --- request ids ---------------------------------------------------------------------------------


def _ids_seen(reply: httpx.Response) -> list[str]:
    return [v for k, v in reply.json()["headers"] if k == "x-request-id"]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (None, False),
        ("abc-123_XYZ.~!", True),
        ("x" * 128, True),
        ("x" * 129, False),  # too long
        ("has space", False),
        ("caf\u00e9", False),  # not ASCII
    ],
)
def test_request_id_made_kept_or_replaced(sent: str | None, kept: bool) -> None:
    app, _ = make_backend("a")
    with serve(app) as backend:
        gateway = Gateway([_pool([backend.url])])
        with serve(gateway_app(gateway)) as g:
            headers = {} if sent is None else {"x-request-id": sent.encode("utf-8")}
            reply = httpx.get(g.url + "/api/x", headers=headers)
    returned = reply.headers["x-request-id"]
    assert _ids_seen(reply) == [returned], "exactly one id upstream, the one the client gets back"
    if kept:
        assert returned == sent
    else:
        assert HEX32.fullmatch(returned)


def test_two_request_ids_are_replaced_and_the_header_name_is_configurable() -> None:
    app, _ = make_backend("a")
    with serve(app) as backend:
        gateway = Gateway([_pool([backend.url])], request_id_header="X-Correlation-ID")
        with serve(gateway_app(gateway)) as g:
            reply = httpx.get(g.url + "/api/x", headers=[("x-correlation-id", "one"), ("x-correlation-id", "two")])
            off = Gateway([_pool([backend.url])], request_id_header=None)
            with serve(gateway_app(off)) as g2:
                plain = httpx.get(g2.url + "/api/x")
    seen = [v for k, v in reply.json()["headers"] if k == "x-correlation-id"]
    assert seen == [reply.headers["x-correlation-id"]] and HEX32.fullmatch(seen[0])
    assert "x-request-id" not in plain.headers and _ids_seen(plain) == []


class _FirstResets(RawServer):
    """Records every request; the first request any of them gets is answered with a reset."""

    def __init__(self, loop: LoopThread, shared: list[RawRequest]) -> None:
        super().__init__(loop)
        self.shared = shared

    async def handle(self, request: RawRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if request.path.startswith(b"/_prequal"):
            writer.write(response(404, b"no probes"))
            return True
        self.shared.append(request)
        if len(self.shared) == 1:
            reset(writer)
            return False
        writer.write(response(200, b"ok"))
        return True


def test_the_request_id_goes_upstream_on_every_attempt() -> None:
    loop = LoopThread().start()
    seen: list[RawRequest] = []
    one, two = _FirstResets(loop, seen).start(), _FirstResets(loop, seen).start()
    try:
        with captured(LOGGER) as lines:
            gateway = Gateway([_pool([one.url, two.url])], access_log=AccessLogSettings(format="json"))
            with serve(gateway_app(gateway)) as g:
                reply = httpx.get(g.url + "/api/retry")
                found = _lines(lines, 1)
    finally:
        one.stop()
        two.stop()
        loop.stop()
    assert reply.status_code == 200
    assert len(seen) == 2, "the reset attempt, then the retry"
    ids = [r.header_values(b"x-request-id") for r in seen]
    rid = reply.headers["x-request-id"].encode()
    assert ids == [[rid], [rid]]
    assert json.loads(found[0])["attempts"] == 2
    assert json.loads(found[0])["request_id"] == rid.decode()


def test_made_request_ids_differ_in_a_forked_worker_and_ignore_the_global_random() -> None:
    """Made ids are unique per process even when workers are forked from one parent (gunicorn's
    preload), and an app's ``random.seed`` does not make them repeat."""
    random.seed(7)
    first = new_request_id()
    random.seed(7)
    assert new_request_id() != first
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent, then exit at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert HEX32.fullmatch(child_id)
    assert child_id != new_request_id(), "the child reseeded after the fork"

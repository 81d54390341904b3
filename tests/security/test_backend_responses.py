"""Hostile backend responses, through real gateway processes (issue 12, hostile backends, item 9).

Every combination of uvicorn's HTTP parsers (httptools, h11) and the gateway's upstream transports
(aiohttp, h1) runs as its own process in front of one ``Hostile`` backend (``hostile_backends``), and
a raw client checks what reaches it:

- a status outside 200-599 as the final answer (a 101 to a request that asked for no upgrade, a 600,
  a 099) or an interim 1xx other than 100/103 is a 502 and a failure of the backend, never relayed (a
  101 relayed behind a front proxy with the usual WebSocket recipe opens a raw tunnel);
- a response that no request asked for, arriving on an idle keep-alive connection, never reaches the
  next client (before: aiohttp queued it and served it, ``Set-Cookie`` included, to the next request);
- header fields after the head (trailers, a second response in the same segment) are never merged
  into it (before: H1Transport added them, so a client could see two ``Content-Length``);
- a 204/304 reaches the client without a body and without ``Content-Length``/``Transfer-Encoding``;
- an early final answer (413 while the client still uploads) reaches the client at once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.procs import HttpProc, gateway_proc
from tests.reliability.rawclient import RawResponse, exchange, parse
from tests.reliability.rawservers import LoopThread
from tests.reliability.support import metric, pools_env
from tests.security.hostile_backends import Hostile

SERVERS = ("httptools", "h11")
TRANSPORTS = ("aiohttp", "h1")
COMBINATIONS = [(h, t) for h in SERVERS for t in TRANSPORTS]


@dataclass
class Setup:
    backend: Hostile
    gateways: dict[tuple[str, str], HttpProc]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    log_dir = tmp_path_factory.mktemp("hostile-backends")
    loop = LoopThread().start()
    backend = Hostile(loop).start()
    pool = {"upstreams": [backend.url], "health": {"path": None}}
    gateways = {
        (http, transport): gateway_proc(
            f"gw-{http}-{transport}", log_dir, pools_env({"/api": pool}, PREQUAL_TRANSPORT=transport), http=http
        )
        for http, transport in COMBINATIONS
    }
    try:
        for proc in gateways.values():
            proc.start()
        for proc in gateways.values():
            proc.wait_http(proc.url + "/_prequal/healthz")
        yield Setup(backend, gateways)
    finally:
        for proc in gateways.values():
            proc.stop()
        backend.stop()
        loop.stop()


def get(proc: HttpProc, target: bytes) -> RawResponse:
    """``GET /api<target>``: the backend sees ``target``."""
    payload = b"GET /api" + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    responses, _ = exchange(proc.port, payload)
    assert len(responses) == 1, (target, responses)
    return responses[0]


def failures(proc: HttpProc) -> float:
    return metric(proc.url, "prequal_upstream_requests_total", outcome="failure")


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_a_status_outside_200_599_or_an_unexpected_1xx_is_a_502_and_a_failure(
    setup: Setup, http: str, transport: str
) -> None:
    proc = setup.gateways[(http, transport)]
    for target in (b"/status/101", b"/status/600", b"/status/999", b"/status/099", b"/interim/101", b"/interim/102"):
        before = failures(proc)
        answer = get(proc, target)
        assert answer.status == 502, (target, answer)
        assert b"upstream_error" in answer.body and b"tunnel" not in answer.body, (target, answer.body)
        assert answer.header(b"upgrade") is None, target
        assert failures(proc) == before + 1, f"{target!r}: not counted as the backend's failure"
    for target in (b"/interim/100", b"/interim/103"):
        answer = get(proc, target)
        assert (answer.status, answer.body) == (200, b"final"), target


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_a_response_nobody_asked_for_never_reaches_the_next_client(setup: Setup, http: str, transport: str) -> None:
    proc = setup.gateways[(http, transport)]
    for stray in (b"/stray", b"/pipelined"):
        for attempt in range(3):
            answer = get(proc, stray)
            assert (answer.status, answer.body) == (200, b"mine"), stray
            assert answer.header(b"set-cookie") is None, stray
            time.sleep(Hostile.stray_delay_s * 3)  # the stray response is on the gateway's idle connection now
            target = b"/next/%d" % attempt
            answer = get(proc, target)
            assert (answer.status, answer.body) == (200, b"ok " + target), f"{stray!r}: the next client got {answer}"
            assert answer.header(b"set-cookie") is None, stray


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_trailer_fields_are_never_merged_into_the_head(setup: Setup, http: str, transport: str) -> None:
    proc = setup.gateways[(http, transport)]
    for target in (b"/trailers", b"/trailers-length") * 2:
        payload = b"GET /api" + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        responses, _ = exchange(proc.port, payload)
        if target == b"/trailers-length" and (not responses or responses[0].status == 502):
            # llhttp refuses a Content-Length trailer: a 502 if it came with the head, else the response
            # is cut after its head went out.
            pass
        else:
            assert [(r.status, r.body) for r in responses] == [(200, b"hello")], (target, responses)
            names = [k for k, _ in responses[0].headers]
            assert b"set-cookie" not in names and b"x-trailer" not in names, (target, names)
            assert names.count(b"content-length") <= 1, (target, names)
        assert get(proc, b"/after-trailers").body == b"ok /after-trailers"


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_204_and_304_reach_the_client_without_a_body_or_its_framing(setup: Setup, http: str, transport: str) -> None:
    proc = setup.gateways[(http, transport)]
    for target in (b"/no-body/204", b"/no-body/304", b"/no-body-chunked/204", b"/no-body-chunked/304"):
        # Two requests on one client connection: a body or a length on the first would desync the second.
        payload = b"GET /api" + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
        payload += b"GET /api/then HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
        data = b""
        try:
            sock.sendall(payload)
            while chunk := sock.recv(65536):
                data += chunk
        finally:
            sock.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        if status == 502:
            # aiohttp's parser refuses the bytes after a bodiless response when they come in the same
            # segment as its head: the exchange fails before anything went to the client.
            assert transport == "aiohttp" and b"upstream_error" in rest, (target, data)
            rest = rest.partition(b"}")[2]
        else:
            assert status == int(target[-3:]), (target, data)
            # Nothing after the head: the next bytes are the next response's, not a body.
            assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower(), (target, head)
        responses, left = parse(rest)
        assert [(r.status, r.body) for r in responses] == [(200, b"ok /then")] and left == b"", (target, data)


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_an_early_final_answer_reaches_a_client_still_uploading(setup: Setup, http: str, transport: str) -> None:
    proc = setup.gateways[(http, transport)]
    first = 128 * 1024  # past what the gateway buffers before it picks a backend: the rest is streamed
    length = first + 400
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    sock.settimeout(0.2)
    data = b""
    try:
        sock.sendall(b"POST /api/early-413 HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % length)
        sock.sendall(b"x" * first)
        started = time.monotonic()
        sent = first
        while time.monotonic() - started < 4.0 and not parse(data)[0]:
            if sent < length and time.monotonic() - started > (sent - first + 100) / 100 * 3:
                sock.sendall(b"x" * 100)  # 100 bytes every 3 s: 12 s more
                sent += 100
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
        waited = time.monotonic() - started
    finally:
        sock.close()
    responses, _ = parse(data)
    assert [r.status for r in responses] == [413], data
    assert waited < 2.0, f"the 413 took {waited:.1f} s to reach the client"

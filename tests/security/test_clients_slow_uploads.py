"""Slow uploads cannot take a backend out (issue 12, item 3).

A client that declares a large body and sends it a byte at a time used to hold one of the backend's
connections (and one of its ``max_in_flight_per_backend`` slots) for as long as it liked: a handful of
them and every other request got 503. Now up to ``limits.buffer_body_bytes`` of a body is read before a
backend is chosen, so a dribbler holds nothing upstream; and a body must keep to ``body_timeout_s`` plus
a second per ``body_min_rate_bytes_per_s`` bytes, buffered or streamed, or it gets 408 ``body_timeout``
and the upstream attempt it was feeding is cancelled, not counted against the backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.reliability.procs import HttpProc
from tests.reliability.rawclient import exchange
from tests.reliability.rawservers import LoopThread
from tests.reliability.support import pool_state
from tests.security.hostile_clients import COMBINATIONS, Dribbler, HostileBackend, gateway_procs, request

Gateways = dict[tuple[str, str], HttpProc]
BODY_TIMEOUT_S = 2.0
MIN_RATE = 100_000  # bytes/s: 100 KiB sent fast buys a second


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileBackend, Gateways]]:
    log_dir: Path = tmp_path_factory.mktemp("slow-uploads")
    loop = LoopThread().start()
    backend = HostileBackend(loop).start()
    pools = {
        "/api": {
            "upstreams": [backend.url],
            "health": {"path": None},
            "max_in_flight_per_backend": 2,
            "limits": {"body_timeout_s": BODY_TIMEOUT_S, "body_min_rate_bytes_per_s": MIN_RATE},
        }
    }
    try:
        with gateway_procs("uploads", log_dir, pools) as gateways:
            yield backend, gateways
    finally:
        backend.stop()
        loop.stop()


def upload_head(length: int) -> bytes:
    return b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % length


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_dribbled_uploads_do_not_take_the_backend_out(
    setup: tuple[HostileBackend, Gateways], http: str, transport: str
) -> None:
    _, gateways = setup
    proc = gateways[(http, transport)]
    dribblers = [Dribbler(proc.port, upload_head(1_000_000), 1_000_000, interval_s=0.1).start() for _ in range(4)]
    try:
        time.sleep(0.5)  # four slow uploads under way: twice the backend's max_in_flight_per_backend
        for _ in range(3):
            started = time.monotonic()
            responses = request(proc.port, b"/api/plain")
            assert [r.status for r in responses] == [200], [r.body for r in responses]
            assert time.monotonic() - started < 1.0, "a normal request waited on the slow uploads"
        wait_for(lambda: all(d.status for d in dribblers), BODY_TIMEOUT_S + 3, "the slow uploads to be cut")
    finally:
        for d in dribblers:
            d.stop()
    for d in dribblers:
        assert d.status == 408, d.status
        error = json.loads(d.body)
        assert error["error"] == "body_timeout" and "body_min_rate_bytes_per_s" in error["detail"], error
        assert d.answered_after is not None and d.answered_after < BODY_TIMEOUT_S + 2


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_a_streamed_upload_that_stalls_is_cut_and_not_the_backends_fault(
    setup: tuple[HostileBackend, Gateways], http: str, transport: str
) -> None:
    backend, gateways = setup
    proc = gateways[(http, transport)]
    before = len(backend.requests)
    # 100 KiB at once (beyond the 64 KiB buffer: streamed to the backend), then a byte at a time.
    dribbler = Dribbler(proc.port, upload_head(1_000_000), 1_000_000, interval_s=0.1)
    dribbler.start(prefix=b"x" * 100_000)
    try:
        wait_for(lambda: bool(dribbler.status), BODY_TIMEOUT_S + 4, "the stalled upload to be cut")
    finally:
        dribbler.stop()
    assert dribbler.status == 408, dribbler.status
    assert json.loads(dribbler.body)["error"] == "body_timeout"
    assert len(backend.requests) == before, "the backend never got a whole request"
    members = pool_state(proc.url)["members"]
    assert [(m["state"], m["consecutive_failures"], m["in_flight"]) for m in members] == [("healthy", 0, 0)], members


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_a_small_body_reaches_the_backend_whole(
    setup: tuple[HostileBackend, Gateways], http: str, transport: str
) -> None:
    backend, gateways = setup
    proc = gateways[(http, transport)]
    before = len(backend.requests)
    for headers, body in (
        (b"Content-Length: 11\r\n", b"hello world"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ):
        payload = b"POST /api/echo HTTP/1.1\r\nHost: gw\r\n" + headers + b"Connection: close\r\n\r\n" + body
        responses, _ = exchange(proc.port, payload)
        assert [r.status for r in responses] == [200]
    assert [r.body for r in backend.requests[before:]] == [b"hello world"] * 2

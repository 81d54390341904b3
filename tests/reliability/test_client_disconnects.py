"""Case 4: clients that disconnect mid-request (waiting for the answer, or mid-upload) and mid-response.

The upstream request must be cancelled: the backend sees the disconnect (its own count), its RIF as
its probe reports it returns to 0, and so does the gateway's ``prequal_in_flight`` gauge. Ten clients
leave at once per round, by FIN (close) and by RST (a crashed client).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import httpx

from prequal_middleware.gateway.scheduler import GAUGE_INTERVAL_S
from tests.reliability.procs import HttpProc, backend_proc, gateway_proc, running
from tests.reliability.report import Report
from tests.reliability.support import metric, ms, pool_state, pools_env, seconds_until

CLIENTS = 10
SETTLE_BOUND_S = 1.0
# prequal_in_flight is sampled once a second (scheduler.GAUGE_INTERVAL_S): it may lag the live count by that.
GAUGE_BOUND_S = SETTLE_BOUND_S + GAUGE_INTERVAL_S


def probe_rif(backend: HttpProc) -> int:
    return int(httpx.get(backend.url + "/_prequal/probe", timeout=2).headers["x-prequal-rif"])


def backend_stats(backend: HttpProc) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(backend.url + "/_control/stats", timeout=2).json()
    return stats


def open_client(port: int, request: bytes, read_first: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    if read_first:
        received = b""
        while b"chunk 0" not in received:
            data = sock.recv(4096)
            assert data, "the stream ended before its first chunk"
            received += data
    return sock


def leave(sock: socket.socket, how: str) -> None:
    if how == "RST":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


MODES: dict[str, tuple[bytes, bool]] = {
    "waiting for the response": (b"GET /api/hold HTTP/1.1\r\nHost: gw\r\n\r\n", False),
    "mid-upload (100 kB of a 10 MB body)": (
        b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 10000000\r\n\r\n" + b"u" * 100_000,
        False,
    ),
    "mid-response (an endless stream)": (b"GET /api/stream?chunks=0&ms=20 HTTP/1.1\r\nHost: gw\r\n\r\n", True),
}


def test_client_disconnects_cancel_upstream(log_dir: Path, report: Report) -> None:
    backend = backend_proc("b0", log_dir)
    gateway = gateway_proc("gateway", log_dir, pools_env({"/api": [backend.url]}))
    rows: list[tuple[str, str, float, float, float, int, int]] = []
    with running(backend), running(gateway, ready_path="/_prequal/healthz"):
        for mode, (request, read_first) in MODES.items():
            for how in ("FIN", "RST"):
                before = backend_stats(backend)
                socks = [open_client(gateway.port, request, read_first) for _ in range(CLIENTS)]
                seconds_until(
                    lambda: (
                        probe_rif(backend) == CLIENTS
                        and pool_state(gateway.url)["in_flight"] == CLIENTS
                        and metric(gateway.url, "prequal_in_flight", pool="/api") == CLIENTS
                    ),
                    10,
                    f"{CLIENTS} requests in flight ({mode})",
                )
                left_at = time.monotonic()
                for sock in socks:
                    leave(sock, how)
                rif_s = seconds_until(lambda: probe_rif(backend) == 0, 10, "the backend's RIF to return to 0")
                seconds_until(lambda: pool_state(gateway.url)["in_flight"] == 0, 10, "the gateway's in-flight count")
                live_s = time.monotonic() - left_at
                seconds_until(lambda: metric(gateway.url, "prequal_in_flight", pool="/api") == 0, 10, "the gauge")
                gauge_s = time.monotonic() - left_at
                after = backend_stats(backend)
                cancelled = after["cancelled"] - before["cancelled"]
                rows.append((mode, how, rif_s, live_s, gauge_s, cancelled, after["requests"] - before["requests"]))
        assert httpx.get(gateway.url + "/api/echo").status_code == 200, "the gateway still serves"

    worst_live = max(max(r[2], r[3]) for r in rows)
    worst_gauge = max(r[4] for r in rows)
    report.record(
        4,
        f"{CLIENTS} clients leave at once, by FIN and by RST, per mode",
        load=f"{len(rows)} rounds of {CLIENTS} concurrent requests through a gateway process to a backend process",
        happened="; ".join(
            f"{mode}/{how}: backend RIF 0 after {ms(rif_s)}, gateway in-flight 0 after {ms(live_s)}, "
            f"prequal_in_flight 0 after {ms(gauge_s)}"
            + (f", {cancelled}/{CLIENTS} seen as cancelled by the backend" if mode.startswith("waiting") else "")
            for mode, how, rif_s, live_s, gauge_s, cancelled, _ in rows
        ),
        figure=(
            f"backend RIF and gateway in-flight back to 0 within {ms(worst_live)} (bound < {ms(SETTLE_BOUND_S)}); "
            f"the sampled gauge within {ms(worst_gauge)} (bound < {ms(GAUGE_BOUND_S)})"
        ),
    )
    for mode, how, rif_s, live_s, gauge_s, cancelled, requests in rows:
        assert requests == CLIENTS, (mode, how, requests)
        if mode.startswith("waiting"):
            assert cancelled == CLIENTS, (mode, how, cancelled)
        assert max(rif_s, live_s) < SETTLE_BOUND_S, (mode, how, rif_s, live_s)
        assert gauge_s < GAUGE_BOUND_S, (mode, how, gauge_s)

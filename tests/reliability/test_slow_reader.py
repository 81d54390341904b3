"""Case 5: a slow reader downloads a large body: the gateway process's memory stays bounded.

The backend can produce the body far faster than the client reads it; a gateway that buffered instead
of applying backpressure would hold most of it. The gateway runs as a process of its own and its RSS
is sampled from /proc every 50 ms during the download (and its peak, ``VmHWM``, read at the end).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import httpx

from tests.reliability.backend_app import pattern_digest
from tests.reliability.procs import backend_proc, gateway_proc, proc_status, rss_kib, running
from tests.reliability.report import Report
from tests.reliability.support import pools_env

SIZE = 200 * 2**20
READ_RATE = 25 * 2**20  # bytes per second
RSS_BOUND_MIB = 30.0
MiB = 2**20
WARM_UP = 50 * MiB


def slow_download(port: int, path: str, rate: float) -> tuple[int, str, float]:
    """GET ``path`` over a raw socket, reading at most ``rate`` bytes/s; (body bytes, sha1, seconds)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # keep the kernel from absorbing much
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            assert data, "no response head"
            head += data
        head, _, body = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        digest = hashlib.sha1(body)
        received = len(body)
        started = time.monotonic()
        while True:
            data = sock.recv(16384)
            if not data:
                break
            received += len(data)
            digest.update(data)
            ahead = received / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        return received, digest.hexdigest(), time.monotonic() - started
    finally:
        sock.close()


def test_slow_reader_large_body(log_dir: Path, report: Report) -> None:
    backend = backend_proc("b0", log_dir)
    gateway = gateway_proc("gateway", log_dir, pools_env({"/api": [backend.url]}))
    samples: list[int] = []
    with running(backend), running(gateway, ready_path="/_prequal/healthz"):
        # Warm up the code paths and buffers a download uses, and measure a fast reader's rate.
        fast = time.monotonic()
        assert len(httpx.get(gateway.url + f"/api/bytes?n={WARM_UP}", timeout=30).content) == WARM_UP
        fast_rate = WARM_UP / (time.monotonic() - fast)
        baseline = rss_kib(gateway.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss_kib(gateway.pid))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            received, sha1, seconds = slow_download(gateway.port, f"/api/bytes?n={SIZE}", READ_RATE)
        finally:
            stop.set()
            sampler.join(5)
        peak_hwm = proc_status(gateway.pid)["VmHWM"]

    growth_mib = (max(samples) - baseline) / 1024
    report.record(
        5,
        f"{SIZE // MiB} MB download through a gateway process, client reading at {READ_RATE // MiB} MB/s "
        f"(a fast reader got {fast_rate / MiB:.0f} MB/s)",
        load=f"1 slow reader, {seconds:.1f} s",
        happened=(
            f"body complete and intact ({received // MiB} MB, SHA-1 matches); gateway RSS {baseline / 1024:.1f} MiB "
            f"before, at most {max(samples) / 1024:.1f} MiB over {len(samples)} samples; peak RSS (VmHWM) "
            f"{peak_hwm / 1024:.1f} MiB"
        ),
        figure=f"RSS growth {growth_mib:.1f} MiB (bound < {RSS_BOUND_MIB:g} MiB)",
    )
    assert received == SIZE and sha1 == pattern_digest(SIZE)
    assert seconds > 0.8 * SIZE / READ_RATE, "the read was not throttled"
    assert growth_mib < RSS_BOUND_MIB

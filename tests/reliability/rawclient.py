"""A raw HTTP/1.1 client: exact bytes out, every response on the connection parsed back."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


def exchange(port: int, payload: bytes, *, idle_s: float = 0.5, total_s: float = 5.0) -> tuple[list[RawResponse], bool]:
    """Send ``payload``; read until the server closes, or ``idle_s`` passes with nothing new after a
    complete response. Returns the responses and whether the server closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=total_s)
    data = b""
    closed = False
    try:
        sock.sendall(payload)
        deadline = time.monotonic() + total_s
        sock.settimeout(idle_s)
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if parse(data)[1] == b"" and data:
                    break  # complete responses and nothing more coming
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    finally:
        sock.close()
    return parse(data)[0], closed


def parse(data: bytes) -> tuple[list[RawResponse], bytes]:
    """Complete responses in ``data`` and the unparsed rest."""
    out: list[RawResponse] = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        length = next((int(v) for k, v in headers if k == b"content-length"), None)
        chunked = any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers)
        if 100 <= status < 200:
            body = b""  # an interim response: no body
        elif chunked:
            body = b""
            while True:
                size_line, sep, after = rest.partition(b"\r\n")
                if not sep:
                    return out, data
                size = int(size_line.split(b";")[0], 16)
                if len(after) < size + 2:
                    return out, data
                body += after[:size]
                rest = after[size + 2 :]
                if size == 0:
                    break
        elif length is not None:
            if len(rest) < length:
                return out, data
            body, rest = rest[:length], rest[length:]
        else:
            body, rest = rest, b""
        out.append(RawResponse(status, headers, body))
        data = rest
    return out, data

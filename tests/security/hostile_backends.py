"""A raw HTTP/1.1 backend that answers with crafted bytes, for the hostile-backend tests.

``Hostile`` runs on a ``LoopThread`` (``tests.reliability.rawservers``) and misbehaves as the path says:

- ``/status/<n>``: a final answer with status ``n`` (``101`` with ``Upgrade: websocket``, ``600``, ``099``...);
- ``/interim/<n>``: an interim ``n`` answer, then a ``200``;
- ``/stray``: a ``200``, then a moment later a second complete response (with a ``Set-Cookie``) on the same
  keep-alive connection, which no request asked for;
- ``/pipelined``: the same, but both responses in one write (one TCP segment on loopback);
- ``/trailers``: a chunked ``200`` with ``Set-Cookie`` and ``X-Trailer`` trailer fields; ``/trailers-length``:
  one whose trailer section holds ``Content-Length: 5`` (llhttp refuses that one outright);
- ``/no-body/<n>``: a ``204``/``304`` that carries ``Content-Length: 10`` and 10 bytes; ``/no-body-chunked/<n>``:
  the same with a chunked body;
- ``/early-413``: a ``413`` 0.3 s after the head arrived, while the body is still being uploaded (the
  body is read and dropped after);
- ``/hold``: the answer only after ``hold_s``;
- anything else: ``200`` with ``ok <target>`` as body.

Probes get a 404 (the gateway then uses its own view). ``open_connections`` counts the sockets open now.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.reliability.rawservers import PROBE_PATH, LoopThread, RawServer, response

STRAY = response(200, b"stray", [(b"set-cookie", b"session=stolen")])


class Hostile(RawServer):
    """See the module docstring."""

    hold_s = 3.0
    stray_delay_s = 0.1

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self.open_connections = 0
        self.targets: list[bytes] = []
        self.early_answered_at: list[float] = []

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while await self._one(reader, writer):
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; return whether to keep the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head[:-4].split(b"\r\n")
        target = lines[0].split(b" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        path = target.split(b"?", 1)[0]
        self.targets.append(target)
        if path == b"/early-413":
            await asyncio.sleep(0.3)  # the gateway has sent what it had and waits for more of the client's body
            writer.write(response(413, b"too large", [(b"connection", b"close")]))
            await writer.drain()
            self.early_answered_at.append(asyncio.get_running_loop().time())
            while await reader.read(65536):
                pass  # read and drop the rest, as servers do before closing (lingering close)
            return False
        await _read_body(reader, headers)
        if path == PROBE_PATH:
            writer.write(response(404, b"no probes here"))
        elif path.startswith(b"/status/"):
            status = int(path.rpartition(b"/")[2])
            extra = [(b"upgrade", b"websocket"), (b"connection", b"upgrade")] if status == 101 else []
            writer.write(b"HTTP/1.1 %03d X\r\n" % status + b"".join(k + b": " + v + b"\r\n" for k, v in extra))
            writer.write(b"content-length: 6\r\n\r\ntunnel")
        elif path.startswith(b"/interim/"):
            status = int(path.rpartition(b"/")[2])
            writer.write(b"HTTP/1.1 %03d X\r\n\r\n" % status + response(200, b"final"))
        elif path == b"/stray":
            writer.write(response(200, b"mine"))
            await writer.drain()
            await asyncio.sleep(self.stray_delay_s)
            writer.write(STRAY)
        elif path == b"/pipelined":
            writer.write(response(200, b"mine") + STRAY)
        elif path == b"/trailers":
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: set-cookie, x-trailer\r\n\r\n"
                b"5\r\nhello\r\n0\r\nset-cookie: trailer=1\r\nx-trailer: 1\r\n\r\n"
            )
        elif path == b"/trailers-length":
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\ncontent-length: 5\r\nset-cookie: trailer=1\r\n\r\n"
            )
        elif path.startswith(b"/no-body/"):
            status = int(path.rpartition(b"/")[2])
            writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 10\r\n\r\n0123456789" % status)
        elif path.startswith(b"/no-body-chunked/"):
            status = int(path.rpartition(b"/")[2])
            writer.write(b"HTTP/1.1 %d X\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % status)
        elif path == b"/hold":
            await asyncio.sleep(self.hold_s)
            writer.write(response(200, b"held"))
        else:
            writer.write(response(200, b"ok " + target))
        return True


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> None:
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            await reader.readexactly(size + 2)
    length = headers.get(b"content-length")
    if length:
        await reader.readexactly(int(length))

"""The access log: one line per proxied request (HTTP and WebSocket), JSON or plain.

Off unless ``Gateway(access_log=AccessLogSettings(...))``. A line is written once, when the request
ends (``Forwarder.http``, ``forward_websocket``), at INFO through the stdlib logger the settings name.

Fields, in this order (the plain format's order; JSON uses the same keys)::

    client      the client's address and port ("-" when the server does not say)
    kind        "http" or "websocket"
    method      the request method ("GET" for a WebSocket handshake)
    path        the target as the client sent it, query included, escaped and bounded
    status      the status the client got (101 for an accepted WebSocket; 0: cancelled before any)
    pool        the pool's name
    backend     the last attempt's backend ("-" when none was chosen)
    attempts    upstream attempts made (0 when none was)
    upstream_ms the last attempt's time to the response's headers (the handshake for a WebSocket)
    total_ms    from arrival to the end of the response (the socket's close for a WebSocket)
    bytes_in    request body bytes read from the client (message bytes for a WebSocket)
    bytes_out   response body bytes sent to the client (message bytes for a WebSocket)
    request_id  the request's id ("-" when request ids are off)

Plain::

    127.0.0.1:50412 http "GET /api/users?id=7" 200 pool=/api backend=http://10.0.0.5:8000 attempts=1
    upstream_ms=1.804 total_ms=2.311 bytes_in=0 bytes_out=512 request_id=4f1c...   (one line)

Hostile clients craft paths and headers to forge log lines: every text field is escaped the same way
in both formats (control characters, DEL, ``"``, ``\\`` and bytes above 0x7e as ``\\xNN``; spaces
too in the fields the plain format leaves unquoted), so a value never ends a line or a field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from prequal_middleware.config import AccessLogSettings


def _table(escape_space: bool) -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0x100))}
    table[ord('"')] = '\\"'
    table[ord("\\")] = "\\\\"
    if escape_space:
        table[0x20] = "\\x20"
    return table


_QUOTED = _table(escape_space=False)  # the path, inside quotes in the plain format
_BARE = _table(escape_space=True)


def escape(text: str, limit: int, *, bare: bool = False) -> str:
    """``text`` safe for one log field: escaped, and cut to ``limit`` characters (then ``...``)."""
    cut = len(text) > limit
    out = text[:limit].translate(_BARE if bare else _QUOTED)
    if not out.isascii():  # beyond latin-1 (a server's own strings): never raw in the log
        out = out.encode("ascii", "backslashreplace").decode("ascii")
    if cut or len(out) > limit:
        out = out[:limit] + "..."
    return out


class AccessRecord:
    """What one proxied request did, filled in on its way and written when it ends."""

    __slots__ = (
        "scope",
        "kind",
        "pool",
        "status",
        "backend",
        "reason",
        "attempts",
        "upstream_s",
        "total_s",
        "bytes_in",
        "bytes_out",
        "request_id",
        "span",
    )

    def __init__(self, scope: dict[str, Any], kind: str, pool: str, request_id: str | None) -> None:
        self.scope = scope
        self.kind = kind
        self.pool = pool
        self.status = 0
        self.backend: str | None = None
        self.reason: str | None = None
        self.attempts = 0
        self.upstream_s = 0.0
        self.total_s = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.request_id = request_id
        self.span: Any = None  # the OpenTelemetry span, when tracing

    def counting(self, send: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        """``send`` that counts the response's body bytes; returns ``send``'s own awaitable (no extra await)."""

        def counted(message: dict[str, Any]) -> Any:
            body = message.get("body")
            if body:
                self.bytes_out += len(body)
            elif message["type"] == "websocket.send":
                data = message.get("bytes")
                if data is None:
                    data = (message.get("text") or "").encode("utf-8")
                self.bytes_out += len(data)
            return send(message)

        return counted


class AccessLog:
    """Writes access records as lines (``AccessLogSettings``)."""

    def __init__(self, settings: AccessLogSettings) -> None:
        self.settings = settings
        self.logger = logging.getLogger(settings.logger)
        self._format = self._json if settings.format == "json" else self._plain

    def write(self, record: AccessRecord) -> None:
        """Log one record at INFO (nothing is built when the logger would drop it)."""
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(self._format(record))

    def fields(self, record: AccessRecord) -> dict[str, Any]:
        """The record's fields, escaped, in the documented order."""
        scope = record.scope
        limit = self.settings.max_path_chars
        client = scope.get("client")
        if client:
            host = str(client[0])
            address = f"[{host}]:{client[1]}" if ":" in host else f"{host}:{client[1]}"
        else:
            address = "-"
        raw = scope.get("raw_path")
        target = raw.decode("latin-1") if isinstance(raw, bytes) else str(scope.get("path", ""))
        query = scope.get("query_string")
        if query:
            target += "?" + query.decode("latin-1")
        return {
            "client": escape(address, 64, bare=True),
            "kind": record.kind,
            "method": escape(str(scope.get("method", "GET")), 32, bare=True),
            "path": escape(target, limit),
            "status": record.status,
            "pool": escape(record.pool, 256, bare=True),
            "backend": escape(record.backend, 512, bare=True) if record.backend is not None else "-",
            "attempts": record.attempts,
            "upstream_ms": round(record.upstream_s * 1000.0, 3),
            "total_ms": round(record.total_s * 1000.0, 3),
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "request_id": escape(record.request_id, 256, bare=True) if record.request_id is not None else "-",
        }

    def _json(self, record: AccessRecord) -> str:
        return json.dumps(self.fields(record), separators=(",", ":"))

    def _plain(self, record: AccessRecord) -> str:
        f = self.fields(record)
        return (
            f'{f["client"]} {f["kind"]} "{f["method"]} {f["path"]}" {f["status"]} pool={f["pool"]} '
            f"backend={f['backend']} attempts={f['attempts']} upstream_ms={f['upstream_ms']} "
            f"total_ms={f['total_ms']} bytes_in={f['bytes_in']} bytes_out={f['bytes_out']} "
            f"request_id={f['request_id']}"
        )

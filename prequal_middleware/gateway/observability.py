"""What the data plane reports besides metrics: access log, request ids, tracing, event logs.

One object handed to the forwarder and the WebSocket relay, so the request path asks one attribute
whether anything is on (``records``: an ``AccessRecord`` is built only then).
"""

from __future__ import annotations

import logging
from typing import Any

from prequal_middleware.gateway.access_log import AccessLog, AccessRecord
from prequal_middleware.gateway.events import GatewayEvents
from prequal_middleware.gateway.request_id import request_id_of, with_request_id
from prequal_middleware.gateway.tracing import Tracing

logger = logging.getLogger("prequal_middleware.gateway.observability")


class Observability:
    """The data plane's reporters.

    Parameters:
        access_log: writes a line per proxied request; None: off.
        tracing: a span per proxied request; None: off.
        request_id: the request id header's name in lower case; None: no request ids.
        events: event logs (ejections seen after a failed attempt); None: none.
    """

    __slots__ = ("access_log", "tracing", "request_id", "events", "records")

    def __init__(
        self,
        access_log: AccessLog | None = None,
        tracing: Tracing | None = None,
        request_id: bytes | None = None,
        events: GatewayEvents | None = None,
    ) -> None:
        self.access_log = access_log
        self.tracing = tracing
        self.request_id = request_id
        self.events = events
        self.records = access_log is not None or tracing is not None

    def begin(
        self, scope: Any, send: Any, kind: str, pool: str, method: str, prefix: str
    ) -> tuple[Any, str | None, AccessRecord | None]:
        """A proxied request (``kind`` "http" or "websocket") starts: its request id (kept or made, and
        put on the answer through the ``send`` returned), and its record and span when either is on."""
        request_id: str | None = None
        if self.request_id is not None:
            request_id = request_id_of(scope["headers"], self.request_id)
            send = with_request_id(send, self.request_id, request_id)
        record: AccessRecord | None = None
        if self.records:
            record = AccessRecord(scope, kind, pool, request_id)
            send = record.counting(send)
            if self.tracing is not None:
                self.tracing.start(record, method, prefix)
        return send, request_id, record

    def finish(self, record: AccessRecord) -> None:
        """The request ended: end its span and write its access log line. Never raises: a logging
        handler's or exporter's bug must not turn into the client's error after the response went out."""
        try:
            if self.tracing is not None:
                self.tracing.finish(record)
            if self.access_log is not None:
                self.access_log.write(record)
        except Exception:
            logger.exception("pool %s: recording the request failed", record.pool)

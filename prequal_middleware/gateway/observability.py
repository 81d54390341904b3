"""What the data plane reports besides metrics: access log, request ids, tracing, event logs.

One object handed to the forwarder and the WebSocket relay, so the request path asks one attribute
whether anything is on (``records``: an ``AccessRecord`` is built only then).
"""

from __future__ import annotations

from prequal_middleware.gateway.access_log import AccessLog
from prequal_middleware.gateway.events import GatewayEvents
from prequal_middleware.gateway.tracing import Tracing


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

"""OpenTelemetry: a span per proxied request and ``traceparent`` upstream (the ``otel`` extra, off by default).

``Gateway(tracing=True)`` uses the global tracer provider and propagator (what the OpenTelemetry SDK's
setup configures); ``Gateway(tracing=provider)`` a provider of your own. ``opentelemetry`` is imported
only then.

The span is the gateway's view of the request: kind SERVER, a child of the client's ``traceparent``
(the gateway is where the trace enters); or kind CLIENT under the span already current when an ASGI
instrumentation wrapped the app and made the SERVER span itself. Its context goes upstream on every
attempt through the global propagator (the client's ``traceparent`` is replaced, so the backend's span
is the gateway's child). Named ``"{method} {route}"``; attributes ``http.request.method``,
``http.route``, ``http.response.status_code``, ``prequal.pool``, ``prequal.backend`` (the last
attempt's), ``prequal.selection_reason`` (``cold``, ``hot``, ``fallback``, ``panic`` or ``policy``),
``prequal.attempts`` and ``prequal.request_id``. A 5xx sets the span's status to error.
"""

from __future__ import annotations

from typing import Any

from prequal_middleware.gateway.access_log import AccessRecord

RawHeaders = list[tuple[bytes, bytes]]


class Tracing:
    """Starts, fills and ends the spans of proxied requests.

    Parameters:
        provider: a ``TracerProvider``; ``None`` for the global one.
    """

    def __init__(self, provider: Any = None) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Gateway(tracing=...) needs OpenTelemetry: pip install 'prequal-middleware[otel]'"
            ) from exc
        from prequal_middleware import __version__

        self._trace = trace
        self._propagate = propagate
        provider = provider if provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer("prequal_middleware", __version__)
        self._error = trace.Status(trace.StatusCode.ERROR)

    def start(self, record: AccessRecord, method: str, route: str) -> None:
        """Open the request's span (kept on ``record``)."""
        trace = self._trace
        if trace.get_current_span().get_span_context().is_valid:
            context = None  # an instrumentation's SERVER span is current: ours is its child
            kind = trace.SpanKind.CLIENT
        else:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in record.scope["headers"]}
            context = self._propagate.extract(carrier)
            kind = trace.SpanKind.SERVER
        attributes = {"http.request.method": method, "http.route": route, "prequal.pool": record.pool}
        if record.request_id is not None:
            attributes["prequal.request_id"] = record.request_id
        record.span = self._tracer.start_span(f"{method} {route}", context=context, kind=kind, attributes=attributes)

    def inject(self, record: AccessRecord, headers: RawHeaders) -> None:
        """Put the span's context (``traceparent``, ``tracestate``, ...) in the upstream headers, in place
        of the client's."""
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(record.span))
        if carrier:
            names = {k.lower().encode("latin-1") for k in carrier}
            headers[:] = [(k, v) for k, v in headers if k not in names]
            headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())

    def finish(self, record: AccessRecord) -> None:
        """Set what the request did on its span and end it."""
        span = record.span
        if span is None:
            return
        if record.status:
            span.set_attribute("http.response.status_code", record.status)
            if record.status >= 500:
                span.set_status(self._error)
        if record.backend is not None:
            span.set_attribute("prequal.backend", record.backend)
        if record.reason is not None:
            span.set_attribute("prequal.selection_reason", record.reason)
        span.set_attribute("prequal.attempts", record.attempts)
        span.end()

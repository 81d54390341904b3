"""OpenTelemetry through a real gateway: a span per proxied request with its attributes, and the
``traceparent`` the backend receives is the gateway span's (the client's trace continued)."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from websockets.sync.client import connect as ws_connect

from prequal_middleware import Gateway, UpstreamPool
from prequal_middleware.config import HealthSettings, RetrySettings
from tests.apps import make_backend
from tests.helpers import gateway_app, wait_for
from tests.servers import free_port, serve

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"


def _traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_a_span_per_request_and_traceparent_upstream() -> None:
    provider, exporter = _traced()
    dead = f"http://127.0.0.1:{free_port()}"
    app, _ = make_backend("a")
    with serve(app) as backend:
        pool = UpstreamPool(
            "/api",
            upstreams=[dead, backend.url],
            policy="round_robin",
            health=HealthSettings(path=None),
            retry=RetrySettings(attempts=2),
        )
        gateway = Gateway([pool], tracing=provider)
        with serve(gateway_app(gateway)) as g, httpx.Client() as client:
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
            replies = [client.get(g.url + "/api/x", headers={"traceparent": traceparent}) for _ in range(3)]
            wait_for(lambda: len(exporter.get_finished_spans()) == 3, what="3 spans")
    spans = exporter.get_finished_spans()
    for reply, span in zip(replies, spans, strict=True):
        assert reply.status_code == 200
        assert span.name == "GET /api"
        assert span.kind is SpanKind.SERVER
        ctx = span.get_span_context()
        assert format(ctx.trace_id, "032x") == CLIENT_TRACE, "the client's trace continued"
        assert span.parent is not None and format(span.parent.span_id, "016x") == CLIENT_PARENT
        attrs = dict(span.attributes or {})
        assert attrs["http.request.method"] == "GET"
        assert attrs["http.route"] == "/api"
        assert attrs["prequal.pool"] == "/api"
        assert attrs["http.response.status_code"] == 200
        assert attrs["prequal.backend"] == backend.url
        assert attrs["prequal.selection_reason"] == "policy"
        assert attrs["prequal.request_id"] == reply.headers["x-request-id"]
        seen = [v for k, v in reply.json()["headers"] if k == "traceparent"]
        assert seen == [f"00-{CLIENT_TRACE}-{format(ctx.span_id, '016x')}-01"], "the gateway's span, once"
    assert {span.attributes["prequal.attempts"] for span in spans if span.attributes} >= {2}


def test_a_5xx_is_an_error_span_and_a_websocket_has_one_too() -> None:
    provider, exporter = _traced()
    app, _ = make_backend("a")
    with serve(app) as backend:
        pool = UpstreamPool("/api", upstreams=[backend.url], health=HealthSettings(path=None))
        gateway = Gateway([pool], tracing=provider)
        with serve(gateway_app(gateway)) as g:
            assert httpx.get(g.url + "/api/status/503").status_code == 503
            with ws_connect(f"ws://127.0.0.1:{g.port}/api/ws") as ws:
                ws.send("x")
                ws.recv()
            wait_for(lambda: len(exporter.get_finished_spans()) == 2, what="2 spans")
    failed, socket_span = exporter.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["http.response.status_code"] == 503
    assert socket_span.attributes is not None
    assert socket_span.attributes["http.response.status_code"] == 101
    assert socket_span.attributes["prequal.backend"] == backend.url
    assert socket_span.parent is None, "no traceparent from the client: a new trace"

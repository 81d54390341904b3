"""``GET /metrics`` of a real gateway: ``prequal_build_info`` and no ``*_created`` series."""

from __future__ import annotations

import platform

import httpx
from prometheus_client import CollectorRegistry, Counter, generate_latest

import prequal_middleware
from prequal_middleware import Gateway, PrequalMetrics, UpstreamPool
from tests.apps import make_backend
from tests.helpers import gateway_app
from tests.servers import serve


def test_build_info_and_no_created_series() -> None:
    backend_app, _ = make_backend("m")
    with serve(backend_app) as backend:
        gateway = Gateway(pools=[UpstreamPool("/api", upstreams=[backend.url])])
        with serve(gateway_app(gateway)) as g:
            for _ in range(5):
                assert httpx.get(g.url + "/api/x").status_code == 200
            text = httpx.get(g.url + "/_prequal/metrics").text
    info = [line for line in text.splitlines() if line.startswith("prequal_build_info{")]
    assert info == [
        f'prequal_build_info{{python="{platform.python_version()}",transport="H1Transport",'
        f'version="{prequal_middleware.__version__}"}} 1.0'
    ]
    # Counters and histograms were used (so prometheus_client would have made *_created for them) ...
    assert 'prequal_requests_total{code_class="2xx",pool="/api"} 5.0' in text
    assert 'prequal_request_duration_seconds_count{pool="/api"} 5.0' in text
    # ... and none is exposed.
    assert [line for line in text.splitlines() if "_created" in line] == []


def test_other_registries_keep_their_created_series() -> None:
    # Leaving _created out of our exposition must not be process-global (disable_created_metrics() is).
    PrequalMetrics().render()
    theirs = CollectorRegistry()
    Counter("their_things", "a user's own counter", registry=theirs).inc()
    assert "their_things_created" in generate_latest(theirs).decode()

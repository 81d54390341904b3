"""Hooks through a real gateway: each may be sync or async; ``on_response`` sees the backend, the attempt,
the latency and the outcome; a hook that raises gives the client a JSON 502 ``hook_error``, counted as
such and never as the backend's failure."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from prequal_middleware import Gateway, UpstreamPool
from prequal_middleware.config import HealthSettings, RetrySettings
from prequal_middleware.transports.base import UpstreamRequest, UpstreamResponse
from tests.apps import make_backend
from tests.helpers import gateway_app
from tests.servers import free_port, serve


def _pool(upstreams: list[str], **hooks: Any) -> UpstreamPool:
    return UpstreamPool(
        "/api",
        upstreams=upstreams,
        policy="round_robin",
        health=HealthSettings(path=None),
        retry=RetrySettings(attempts=2),
        **hooks,
    )


def _metric(gateway_url: str, name: str, **labels: str) -> float:
    text = httpx.get(gateway_url + "/_prequal/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sync_and_async_hooks_all_run() -> None:
    async def rewrite(target: str) -> str:
        await asyncio.sleep(0)
        return "/rewritten" + target

    def on_request(request: UpstreamRequest) -> None:
        request.headers.append((b"x-from-hook", b"sync"))

    async def on_response(response: UpstreamResponse) -> None:
        response.headers.append((b"x-seen", f"async attempt {response.attempt}".encode()))

    app, state = make_backend("b")
    with serve(app) as backend:
        gateway = Gateway([_pool([backend.url], rewrite_path=rewrite, on_request=on_request, on_response=on_response)])
        with serve(gateway_app(gateway)) as g:
            response = httpx.get(g.url + "/api/x?q=1")
    assert response.status_code == 200
    assert response.json()["raw_path"] == "/rewritten/x"
    assert response.json()["query"] == "q=1"
    assert ["x-from-hook", "sync"] in response.json()["headers"]
    assert response.headers["x-seen"] == "async attempt 1"


def test_on_response_sees_the_backend_attempt_latency_and_outcome() -> None:
    seen: list[tuple[str, int, float, str, int]] = []

    def log(response: UpstreamResponse) -> None:
        seen.append((response.backend, response.attempt, response.latency_s, response.outcome, response.status))

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: a connect error, retried on the other
    app, _ = make_backend("alive")
    with serve(app) as backend:
        gateway = Gateway([_pool([dead, backend.url], on_response=log)])
        with serve(gateway_app(gateway)) as g, httpx.Client() as client:
            statuses = [client.get(g.url + "/api/x").status_code for _ in range(4)]
    assert statuses == [200] * 4
    assert {entry[0] for entry in seen} == {backend.url}
    assert {entry[3] for entry in seen} == {"success"}
    assert all(0 < entry[2] < 5 for entry in seen)
    attempts = {entry[1] for entry in seen}
    assert 2 in attempts and attempts <= {1, 2}  # a retry after the dead backend is attempt 2


@pytest.mark.parametrize("hook", ["rewrite_path", "on_request", "on_response", "rewrite_returns_bytes"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_failing_hook_is_a_json_502_not_a_backend_failure(hook: str, flavour: str) -> None:
    def broken(value: Any) -> Any:
        if hook == "rewrite_returns_bytes":
            return b"/bytes"
        raise RuntimeError("secret detail that must not reach the client")

    async def broken_async(value: Any) -> Any:
        return broken(value)

    name = "rewrite_path" if hook == "rewrite_returns_bytes" else hook
    app, state = make_backend("b")
    with serve(app) as backend:
        gateway = Gateway([_pool([backend.url], **{name: broken if flavour == "sync" else broken_async})])
        with serve(gateway_app(gateway)) as g:
            response = httpx.get(g.url + "/api/x")
            errors = _metric(g.url, "prequal_gateway_errors_total", error="hook_error")
            failures = sum(
                _metric(g.url, "prequal_upstream_requests_total", outcome=outcome)
                for outcome in ("connect_error", "timeout", "server_error", "protocol_error")
            )
            successes = _metric(g.url, "prequal_upstream_requests_total", outcome="success")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == "hook_error"
    assert name in response.json()["detail"]
    assert "secret" not in response.text
    assert errors == 1
    assert failures == 0  # never the backend's failure
    # Only on_response runs after the backend answered: then the backend's success is counted.
    assert (state.requests, successes) == ((1, 1) if name == "on_response" else (0, 0))


def test_a_failing_rewrite_refuses_a_websocket_handshake_with_502() -> None:
    def broken(target: str) -> str:
        raise RuntimeError("no")

    app, state = make_backend("b")
    with serve(app) as backend:
        gateway = Gateway([_pool([backend.url], rewrite_path=broken)])
        with serve(gateway_app(gateway)) as g:
            with pytest.raises(InvalidStatus) as refused:
                with ws_connect(g.url.replace("http", "ws") + "/api/ws", open_timeout=5):
                    pass
    assert refused.value.response.status_code == 502
    assert state.requests == 0

"""Upstream URLs are built from parsed parts, never by joining strings (``transport.upstream_origin``).

The member's scheme, host, port and base path come from its URL, parsed once; the request's path and
query come from the target. Whatever a target holds (a client's, or what an operator's path rewrite or
request hook made of it), it cannot change the host a request goes to: the forwarder refuses a target
that is not origin-form with a 500 of its own (the gateway's bug, not the backend's failure), and each
transport builds its URL from the parts, so even a target handed to it directly reaches no other host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from prequal_middleware import Gateway, HealthSettings, UpstreamPool
from prequal_middleware.exceptions import UpstreamError
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import (
    UpstreamOrigin,
    UpstreamRequest,
    sendable_target,
    upstream_origin,
)
from prequal_middleware.transports.http1 import H1Transport
from prequal_middleware.transports.httpx import HttpxTransport
from tests.helpers import gateway_app
from tests.reliability.rawservers import LoopThread, Recorder
from tests.security.test_backend_responses_transports import ALL, FAST, make
from tests.servers import serve


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Recorder, Recorder]]:
    loop = LoopThread().start()
    backend, elsewhere = Recorder(loop).start(), Recorder(loop).start()
    try:
        yield backend, elsewhere
    finally:
        backend.stop()
        elsewhere.stop()
        loop.stop()


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("http://127.0.0.1:8000", UpstreamOrigin("http", "127.0.0.1", 8000, "", "127.0.0.1:8000", "127.0.0.1")),
        ("https://[::1]:8443/base/", UpstreamOrigin("https", "::1", 8443, "/base", "[::1]:8443", "::1")),
        ("http://svc.internal/v1", UpstreamOrigin("http", "svc.internal", 80, "/v1", "svc.internal", "svc.internal")),
        ("https://svc.internal", UpstreamOrigin("https", "svc.internal", 443, "", "svc.internal", "svc.internal")),
    ],
)
def test_a_member_url_is_parsed_once_into_its_parts(url: str, parts: UpstreamOrigin) -> None:
    assert upstream_origin(url) == parts


@pytest.mark.parametrize(
    "url", ["ftp://h:1", "http://user@h:1", "http://h:99999", "http://h:1/b?q=1", "http://h:1#f", "/relative", ""]
)
def test_what_is_not_a_member_url_is_refused(url: str) -> None:
    with pytest.raises(UpstreamError):
        upstream_origin(url)


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("/", True),
        ("/a%2Fb/%40x?q=%23&r=1", True),
        ("//double/slash", True),
        ("@127.0.0.1:9/", False),
        ("http://elsewhere/x", False),
        ("*", False),
        ("", False),
        ("/a#frag", False),
        ("/a b", False),
        ("/a\r\nx-injected: 1", False),
        ("/a\x00", False),
        ("/a\x7f", False),
    ],
)
def test_only_origin_form_targets_are_sendable(target: str, ok: bool) -> None:
    assert sendable_target(target) is ok


@pytest.mark.parametrize("kind", ALL)
async def test_the_base_path_and_target_reach_the_backend_byte_for_byte(
    servers: tuple[Recorder, Recorder], kind: str
) -> None:
    backend, _ = servers
    transport = make(kind)
    try:
        target = "/a%2Fb/%40x;p=1?q=%23&r=%2e%2e&s"
        response = await transport.send(UpstreamRequest("GET", backend.url + "/base", target, []), FAST)
        await response.aclose()
    finally:
        await transport.aclose()
    assert response.status == 200
    assert backend.requests[-1].target == b"/base" + target.encode()


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("shape", ["@{host}/x", "http://{host}/x", "{host}/x"])
async def test_a_target_handed_straight_to_a_transport_names_no_other_host(
    servers: tuple[Recorder, Recorder], kind: str, shape: str
) -> None:
    backend, elsewhere = servers
    seen = len(elsewhere.requests)
    transport = make(kind)
    try:
        target = shape.format(host=elsewhere.url.removeprefix("http://"))
        with contextlib.suppress(UpstreamError):
            response = await transport.send(UpstreamRequest("GET", backend.url, target, []), FAST)
            await response.aclose()
    finally:
        await transport.aclose()
    assert len(elsewhere.requests) == seen, "a request reached a host the target named"


def _transport(kind: str) -> Any:
    if kind == "aiohttp":
        return AiohttpTransport()
    if kind == "h1":
        return H1Transport()
    return HttpxTransport(httpx.AsyncClient(), close_client=True)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("hook", ["rewrite_path", "on_request"])
def test_a_rewrite_that_makes_a_hostile_target_is_a_500_and_reaches_nobody(
    servers: tuple[Recorder, Recorder], kind: str, hook: str
) -> None:
    backend, elsewhere = servers
    host = elsewhere.url.removeprefix("http://").encode()

    def rewrite_path(target: str) -> str:  # a naive operator rewrite: /go<anything> -> <anything>
        return target.removeprefix("/go")

    def on_request(request: UpstreamRequest) -> None:
        request.target = rewrite_path(request.target)

    hooks: dict[str, Any] = {"rewrite_path": rewrite_path} if hook == "rewrite_path" else {"on_request": on_request}
    pool = UpstreamPool("/api", upstreams=[backend.url], health=HealthSettings(path=None), **hooks)
    gateway = Gateway(pools=[pool], transport=_transport(kind))
    seen_backend, seen_elsewhere = len(backend.requests), len(elsewhere.requests)
    with serve(gateway_app(gateway)) as g:
        refused = httpx.get(g.url + "/api/go@" + host.decode() + "/secret")
        fine = httpx.get(g.url + "/api/go/ok")
    assert refused.status_code == 500
    assert refused.json()["error"] == "invalid_upstream_target"
    assert "Error" not in refused.text and "Traceback" not in refused.text
    assert fine.status_code == 200, "an ordinary rewrite still goes through"
    assert len(elsewhere.requests) == seen_elsewhere
    assert [r.target for r in backend.requests[seen_backend:]] == [b"/ok"]

"""Per-pool readiness through ``GET /readyz`` of a real gateway under uvicorn.

A pool filled only by registration is not required by default (its backends register through a ready
gateway: requiring it would keep a readiness-gated Service from ever sending them); a pool with
configured upstreams is; ``required_for_ready`` overrides either way.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from prequal_middleware import AdminSettings, Gateway, HealthSettings, UpstreamPool
from prequal_middleware.envconfig import pools_from_env
from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.gateway.readiness import PoolReadiness, Readiness, pool_requirement
from tests.apps import make_backend
from tests.helpers import gateway_app, wait_for
from tests.servers import free_port, serve

# Fast health checks, so a dead static member turns unhealthy within a second.
FAST_HEALTH = HealthSettings(interval_s=0.1, timeout_s=0.5, fall=1, rise=1)


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(url + "/_prequal/readyz")
    return response.status_code, response.json()


def test_an_empty_registration_pool_does_not_hold_readiness() -> None:
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as g:
        status, body = readyz(g.url)
    assert status == 200, body
    assert body["status"] == "ready" and body["problems"] == []
    assert body["pools"] == {
        "/api": {
            "required": False,
            "why": "its members join by registration",
            "ready": False,
            "members": 0,
            "healthy": 0,
        }
    }
    assert body["registry"] == {"stale_for_s": None, "ready_while_stale_s": 30.0}


def test_a_static_pool_with_dead_members_is_not_ready_and_is_named() -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    backend_app, _ = make_backend("alive")
    with serve(backend_app) as alive:
        gateway = Gateway(
            pools=[
                UpstreamPool("/dead", upstreams=dead, health=FAST_HEALTH),
                UpstreamPool("/alive", upstreams=[alive.url], health=FAST_HEALTH),
                UpstreamPool("/registered"),
            ],
            admin=AdminSettings(trust_loopback=True),
        )
        with serve(gateway_app(gateway)) as g:
            wait_for(
                lambda: readyz(g.url)[1]["pools"]["/dead"]["healthy"] == 0, what="the dead members to be unhealthy"
            )
            status, body = readyz(g.url)
    assert status == 503, body
    assert body["status"] == "not_ready"
    assert body["problems"] == ["pool /dead has no healthy member"]
    pools = body["pools"]
    assert pools["/dead"] == {
        "required": True,
        "why": "it has configured upstreams",
        "ready": False,
        "members": 2,
        "healthy": 0,
    }
    assert (pools["/alive"]["required"], pools["/alive"]["ready"], pools["/alive"]["healthy"]) == (True, True, 1)
    assert (pools["/registered"]["required"], pools["/registered"]["ready"]) == (False, False)


def test_a_required_registration_pool_waits_for_a_healthy_registration() -> None:
    backend_app, _ = make_backend("late")
    gateway = Gateway(
        pools=[UpstreamPool("/api", required_for_ready=True, health=FAST_HEALTH)],
        admin=AdminSettings(trust_loopback=True),
    )
    with serve(backend_app) as backend, serve(gateway_app(gateway)) as g:
        status, body = readyz(g.url)
        assert status == 503 and body["problems"] == ["pool /api has no healthy member"]
        assert body["pools"]["/api"]["required"] is True and body["pools"]["/api"]["why"] == "required_for_ready=True"
        assert httpx.post(g.url + "/_prequal/register", json={"url": backend.url}).status_code == 201
        wait_for(lambda: readyz(g.url)[0] == 200, what="the gateway to be ready once a member is healthy")
        status, body = readyz(g.url)
    assert body["status"] == "ready" and body["problems"] == []
    assert body["pools"]["/api"] | {"why": None} == {
        "required": True,
        "why": None,
        "ready": True,
        "members": 1,
        "healthy": 1,
    }


def test_required_for_ready_false_lets_a_dead_static_pool_through() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = Gateway(pools=[UpstreamPool("/optional", upstreams=[dead], health=FAST_HEALTH, required_for_ready=False)])
    with serve(gateway_app(gateway)) as g:
        wait_for(lambda: readyz(g.url)[1]["pools"]["/optional"]["healthy"] == 0, what="the member to be unhealthy")
        status, body = readyz(g.url)
    assert status == 200, body
    assert body["pools"]["/optional"]["why"] == "required_for_ready=False"


def test_a_stopped_gateway_is_not_ready() -> None:
    gateway = Gateway(pools=[UpstreamPool("/api")])
    assert gateway.readiness_problems() == ["the gateway is not running"]
    assert gateway.readiness().as_json()["status"] == "not_ready"


def test_the_requirement_by_default_and_by_setting() -> None:
    assert pool_requirement(UpstreamPool("/a")) == (False, "its members join by registration")
    assert pool_requirement(UpstreamPool("/a", upstreams=["http://10.0.0.5:8000"])) == (
        True,
        "it has configured upstreams",
    )
    assert pool_requirement(UpstreamPool("/a", upstreams=["http://api.internal:8000"])) == (
        True,
        "it has configured upstreams",
    ), "a name DNS expands counts as configured"
    assert pool_requirement(UpstreamPool("/a", required_for_ready=True))[0] is True
    with pytest.raises(ConfigurationError, match="UpstreamPool.required_for_ready must be None or a bool"):
        UpstreamPool("/a", required_for_ready="yes")  # type: ignore[arg-type]


def test_required_for_ready_from_the_environment() -> None:
    env = {"PREQUAL_POOLS": json.dumps({"/api": {"upstreams": [], "required_for_ready": True}, "/b": []})}
    by_name = {p.name: p for p in pools_from_env(env)}
    assert by_name["/api"].required_for_ready is True
    assert by_name["/b"].required_for_ready is None


def test_the_staleness_rule_is_kept() -> None:
    pools = (PoolReadiness("/api", True, "it has configured upstreams", 1, 1),)
    assert Readiness(True, pools, None, 30.0).ready
    assert Readiness(True, pools, 29.9, 30.0).ready, "a brief outage leaves the gateway ready (fail static)"
    late = Readiness(True, pools, 30.0, 30.0)
    assert late.problems == ["the registry has been unreachable for 30.0 s"]
    assert late.as_json()["registry"] == {"stale_for_s": 30.0, "ready_while_stale_s": 30.0}

"""Routes and pools apart (Envoy's route and cluster): several prefixes served by one pool.

A real uvicorn gateway in front of real backends. The routes ``/v1`` to ``/v4`` all name the
pool ``fleet``: one membership (a registration under ``fleet`` serves them all), one policy state, one
in-flight count; each route keeps its own prefix handling, timeouts, limits and hooks.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from prequal_middleware import (
    AdminSettings,
    ConfigurationError,
    Gateway,
    HealthSettings,
    RequestLimits,
    Route,
    Timeouts,
    UpstreamPool,
)
from prequal_middleware.envconfig import pools_and_routes_from_env
from tests.apps import BackendState, make_backend
from tests.helpers import gateway_app, wait_for
from tests.servers import ServerThread, serve


def rewrite(target: str) -> str:
    return "/rewritten" + target


@dataclass
class Fleet:
    gateway: Gateway
    url: str
    a: ServerThread
    b: ServerThread
    state_a: BackendState
    state_b: BackendState


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    app_a, state_a = make_backend("a")
    app_b, state_b = make_backend("b")
    with serve(app_a) as a, serve(app_b) as b:
        gateway = Gateway(
            pools=[
                # Route-level settings on a pool are the defaults of the routes that name it.
                UpstreamPool(
                    name="fleet", timeouts=Timeouts(response_headers_s=0.3), health=HealthSettings(interval_s=0.1)
                ),
                UpstreamPool(name="pair", upstreams=[a.url, b.url], max_in_flight_per_backend=1),
                UpstreamPool(name="one", upstreams=[a.url], max_in_flight=1),
                UpstreamPool("/short", upstreams=[b.url], strip_prefix=False),  # the short spelling
            ],
            routes=[
                Route("/v1", pool="fleet"),
                Route(
                    "/v2",
                    pool="fleet",
                    strip_prefix=False,
                    limits=RequestLimits(max_body_bytes=10),
                ),
                Route("/v3", pool="fleet", rewrite_path=rewrite, preserve_host=True),
                Route("/v4", pool="fleet", timeouts=Timeouts(response_headers_s=5.0), websockets=False),
                Route("/p1", pool="pair"),
                Route("/p2", pool="pair"),
                Route("/o1", pool="one"),
                Route("/o2", pool="one"),
                Route("/also-short", pool="/short", strip_prefix=True),
            ],
            admin=AdminSettings(trust_loopback=True),
        )
        with serve(gateway_app(gateway), proxy_headers=False) as g:
            reply = httpx.post(g.url + "/_prequal/register", json={"url": a.url, "pool": "fleet"})
            assert reply.status_code == 201, reply.text
            wait_for(lambda: httpx.get(g.url + "/v1/x").status_code == 200, what="the registered member's traffic")
            yield Fleet(gateway, g.url, a, b, state_a, state_b)


@pytest.fixture
def client(fleet: Fleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=10.0) as c:
        yield c


def pool_json(client: httpx.Client, name: str) -> dict[str, object]:
    (pool,) = client.get("/_prequal/backends", params={"pool": name}).json()["pools"]
    assert isinstance(pool, dict)
    return pool


def hold(fleet: Fleet, path: str) -> socket.socket:
    """A request to the backends' ``/hold`` under ``path`` that stays in flight until the socket closes."""
    port = int(fleet.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"GET {path}/hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


# --- one pool, one membership, one state ---------------------------------------------------------


def test_a_registration_under_the_pool_name_serves_every_route(client: httpx.Client, fleet: Fleet) -> None:
    for path in ("/v1/x", "/v2/x", "/v3/x"):
        assert client.get(path).json()["backend"] == "a", f"{path} is served by the pool's registered member"
    described = pool_json(client, "fleet")
    assert (described["name"], described["routes"]) == ("fleet", ["/v1", "/v2", "/v3", "/v4"])
    assert [m["url"] for m in described["members"]] == [fleet.a.url]  # type: ignore[attr-defined]
    assert fleet.gateway.routes["/v1"].pool is fleet.gateway.routes["/v2"].pool is fleet.gateway.pools["fleet"]


def test_a_registration_names_the_pool_not_a_route(client: httpx.Client, fleet: Fleet) -> None:
    reply = client.post("/_prequal/register", json={"url": fleet.b.url, "pool": "/v1"})
    assert reply.status_code == 400
    body = reply.json()
    assert body["field"] == "pool" and "'/v1' is a route of the pool 'fleet'" in body["detail"]
    reply = client.post("/_prequal/register", json={"url": fleet.b.url, "pool": "nope"})
    assert (reply.status_code, reply.json()["field"]) == (400, "pool")
    assert fleet.b.url not in fleet.gateway.pools["fleet"].members, "nothing was half-applied"


def test_one_policy_state_counts_the_selections_of_every_route(client: httpx.Client) -> None:
    before = sum(pool_json(client, "fleet")["selections"].values())  # type: ignore[attr-defined]
    for i in range(6):
        assert client.get(f"/v{1 + i % 2}/x").status_code == 200
    after = sum(pool_json(client, "fleet")["selections"].values())  # type: ignore[attr-defined]
    assert after - before == 6, "/v1 and /v2 traffic goes through one Prequal state"


def test_one_in_flight_count_per_backend_across_routes(client: httpx.Client, fleet: Fleet) -> None:
    # max_in_flight_per_backend=1: a request held through /p1 takes its backend out of /p2's choices.
    held = hold(fleet, "/p1")
    try:
        wait_for(lambda: fleet.state_a.holding + fleet.state_b.holding == 1, what="the held request")
        busy = "a" if fleet.state_a.holding else "b"
        seen = {client.get("/p2/x").json()["backend"] for _ in range(8)}
        assert busy not in seen, f"/p2 chose {busy}, which a /p1 request holds at its limit"
        second = hold(fleet, "/p2")
        try:
            wait_for(lambda: fleet.state_a.holding + fleet.state_b.holding == 2, what="the second held request")
            reply = client.get("/p1/x")
            assert (reply.status_code, reply.json()["error"]) == (503, "no_backend")
        finally:
            second.close()
    finally:
        held.close()
    wait_for(lambda: fleet.state_a.holding + fleet.state_b.holding == 0, what="the holds to end")


def test_the_pool_limit_is_one_count_for_every_route(client: httpx.Client, fleet: Fleet) -> None:
    held = hold(fleet, "/o1")
    try:
        wait_for(lambda: fleet.state_a.holding == 1, what="the held request")
        reply = client.get("/o2/x")
        assert (reply.status_code, reply.json()["error"]) == (503, "pool_overloaded")
        assert reply.headers["x-prequal-pool"] == "one", "errors name the pool, not the route"
        assert reply.json()["pool"] == "one"
    finally:
        held.close()
    wait_for(lambda: fleet.state_a.holding == 0, what="the hold to end")
    assert client.get("/o2/x").status_code == 200


def test_metrics_count_every_route_under_the_pool_name(client: httpx.Client) -> None:
    assert client.get("/v1/x").status_code == 200 and client.get("/v2/x").status_code == 200
    text = client.get("/_prequal/metrics").text
    assert re.search(r'prequal_requests_total\{code_class="2xx",pool="fleet"\} \d', text)
    assert 'pool="/v1"' not in text and 'pool="/v2"' not in text, "the label is the pool's name"


# --- per-route settings ----------------------------------------------------------------------------


def test_prefix_handling_is_per_route(client: httpx.Client) -> None:
    assert client.get("/v1/users?q=1").json()["raw_path"] == "/users"
    assert client.get("/v2/users").json()["raw_path"] == "/v2/users", "/v2 keeps its prefix"
    assert client.get("/v3/users").json()["raw_path"] == "/rewritten/users", "/v3's own rewrite hook"


def test_preserve_host_is_per_route(client: httpx.Client, fleet: Fleet) -> None:
    def host(path: str) -> str:
        echo = client.get(path, headers={"host": "public.example"}).json()
        return str(next(v for k, v in echo["headers"] if k == "host"))

    assert host("/v3/x") == "public.example"
    assert host("/v1/x") == fleet.a.url.removeprefix("http://")


def test_timeouts_are_per_route_and_default_to_the_pools(client: httpx.Client) -> None:
    reply = client.get("/v1/sleep", params={"s": "1"})
    assert (reply.status_code, reply.json()["error"]) == (504, "upstream_timeout"), "/v1 has the pool's 0.3 s"
    assert reply.headers["x-prequal-pool"] == "fleet"
    assert client.get("/v4/sleep", params={"s": "1"}).text == "slept a", "/v4 has its own 5 s"


def test_websockets_are_per_route(fleet: Fleet) -> None:
    ws_url = fleet.url.replace("http", "ws")
    with ws_connect(ws_url + "/v1/ws") as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "a:hi"
    # websockets=False on /v4 (which would reach the same /ws): the host app's, which has no such route.
    with pytest.raises(InvalidStatus):
        ws_connect(ws_url + "/v4/ws", open_timeout=5)


def test_limits_are_per_route(client: httpx.Client) -> None:
    assert client.post("/v2/x", content=b"x" * 100).status_code == 413
    assert client.post("/v1/x", content=b"x" * 100).json()["body_len"] == 100


def test_the_short_form_still_works(client: httpx.Client, fleet: Fleet) -> None:
    assert client.get("/short/x").json()["raw_path"] == "/short/x", "strip_prefix=False, as before"
    assert client.get("/also-short/x").json()["raw_path"] == "/x", "a second route to the short form's pool"
    described = pool_json(client, "/short")
    assert (described["name"], described["prefix"], described["routes"]) == (
        "/short",
        "/short",
        ["/short", "/also-short"],
    )
    pool = UpstreamPool("/api", upstreams=["http://10.0.0.5:8000"])
    assert (pool.name, pool.prefix) == ("/api", "/api")
    gateway = Gateway(pools=[pool])
    assert list(gateway.pools) == ["/api"] and list(gateway.routes) == ["/api"]


# --- validation ------------------------------------------------------------------------------------


def test_a_route_naming_an_unknown_pool() -> None:
    with pytest.raises(ConfigurationError, match=r"Gateway\.routes\[1\]\.pool names no pool: 'nope'"):
        Gateway(pools=[UpstreamPool(name="fleet")], routes=[Route("/v1", pool="fleet"), Route("/v2", pool="nope")])


def test_two_pools_with_one_name() -> None:
    with pytest.raises(ConfigurationError, match=r"Gateway\.pools\[1\]\.name: the pool name '/api' is taken"):
        Gateway(pools=[UpstreamPool("/api"), UpstreamPool(name="/api")], routes=[Route("/x", pool="/api")])
    with pytest.raises(ConfigurationError, match=r"Gateway\.pools\[1\]\.name"):
        Gateway(pools=[UpstreamPool("/a", name="fleet"), UpstreamPool("/b", name="fleet")])


def test_two_routes_with_one_prefix() -> None:
    pools = [UpstreamPool("/api"), UpstreamPool(name="fleet")]
    with pytest.raises(
        ConfigurationError, match=r"Gateway\.routes\[0\]\.prefix: the prefix '/api' is taken by Gateway\.pools\[0\]"
    ):
        Gateway(pools=pools, routes=[Route("/api", pool="fleet")])
    with pytest.raises(
        ConfigurationError, match=r"Gateway\.routes\[1\]\.prefix: the prefix '/v1' is taken by Gateway\.routes\[0\]"
    ):
        Gateway(pools=pools, routes=[Route("/v1", pool="fleet"), Route("/v1", pool="/api")])


def test_a_pool_no_route_reaches() -> None:
    with pytest.raises(ConfigurationError, match=r"Gateway\.pools\[0\]: the pool 'fleet' has no prefix and no route"):
        Gateway(pools=[UpstreamPool(name="fleet")])


def test_settings_are_checked_on_construction() -> None:
    with pytest.raises(ConfigurationError, match="UpstreamPool needs a prefix"):
        UpstreamPool()
    with pytest.raises(ConfigurationError, match=r"UpstreamPool\.name must be"):
        UpstreamPool(name="two words")
    with pytest.raises(ConfigurationError, match=r"Route\.prefix must be"):
        Route("v1", pool="fleet")
    with pytest.raises(ConfigurationError, match=r"Route\.pool must be"):
        Route("/v1", pool="")
    with pytest.raises(ConfigurationError, match=r"Route\.strip_prefix must be"):
        Route("/v1", pool="fleet", strip_prefix="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"Route\.timeouts must be"):
        Route("/v1", pool="fleet", timeouts=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"Gateway\.routes must be a list"):
        Gateway(pools=[UpstreamPool(name="fleet")], routes=Route("/v1", pool="fleet"))  # type: ignore[arg-type]


# --- PREQUAL_POOLS ------------------------------------------------------------------------------


def test_env_old_format_keeps_its_meaning() -> None:
    pools, routes = pools_and_routes_from_env({"PREQUAL_POOLS": '{"/api": ["http://127.0.0.1:8001"], "/s": []}'})
    assert [(p.name, p.prefix) for p in pools] == [("/api", "/api"), ("/s", "/s")]
    assert routes == []


def test_env_routes_share_a_pool() -> None:
    env = {
        "PREQUAL_POOLS": '{"users": {"upstreams": ["http://127.0.0.1:8001"], "policy": "round_robin",'
        ' "routes": ["/v1", {"prefix": "/v2", "strip_prefix": false, "timeouts": {"connect_s": 0.5}}]},'
        ' "/api": {"upstreams": [], "routes": ["/legacy"]}}'
    }
    gateway = Gateway.from_env(env)
    assert list(gateway.pools) == ["users", "/api"]
    assert {p: r.pool.name for p, r in gateway.routes.items()} == {
        "/api": "/api",
        "/v1": "users",
        "/v2": "users",
        "/legacy": "/api",
    }
    v1, v2 = gateway.routes["/v1"], gateway.routes["/v2"]
    assert v1.pool is v2.pool and v1.pool.config.policy == "round_robin"
    assert (v1.strip_prefix, v2.strip_prefix, v2.timeouts.connect_s) == (True, False, 0.5)


def test_env_routes_serve_through_a_real_gateway(fleet: Fleet) -> None:
    env = {"PREQUAL_POOLS": f'{{"users": {{"upstreams": ["{fleet.b.url}"], "routes": ["/v1", "/v2"]}}}}'}
    gateway = Gateway.from_env(env)
    with serve(gateway_app(gateway)) as g:
        echo = httpx.get(g.url + "/v1/x").json()
        assert (echo["backend"], echo["raw_path"]) == ("b", "/x")
        assert httpx.get(g.url + "/v2/y").json()["raw_path"] == "/y"
        assert gateway.pools["users"].clients[0].snapshot(gateway.clock()).selections


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        (
            '{"users": {"upstreams": []}}',
            r"PREQUAL_POOLS\['users'\]: a prefix must be .*; a key that is not one names a pool, which then needs",
        ),
        (
            '{"/v1": [], "users": {"routes": ["/v1"]}}',
            r"PREQUAL_POOLS\['users'\]\.routes\[0\]: the prefix '/v1' is taken by PREQUAL_POOLS\['/v1'\]",
        ),
        (
            '{"users": {"routes": [{"prefix": "/v1", "policy": "random"}]}}',
            r"PREQUAL_POOLS\['users'\]\.routes\[0\] has an unknown setting 'policy'",
        ),
        ('{"users": {"routes": ["v1"]}}', r"PREQUAL_POOLS\['users'\]\.routes\[0\]: Route\.prefix must be"),
        ('{"users": {"routes": "/v1"}}', r"PREQUAL_POOLS\['users'\]\.routes must be a list"),
        ('{"users": {"routes": [{"strip_prefix": false}]}}', r"PREQUAL_POOLS\['users'\]\.routes\[0\] needs a prefix"),
        ('{"two words": {"routes": ["/v1"]}}', r"PREQUAL_POOLS\['two words'\]: UpstreamPool\.name must be"),
    ],
)
def test_env_route_errors_name_the_place(pools: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        pools_and_routes_from_env({"PREQUAL_POOLS": pools})


def test_the_cli_check_names_pools_and_their_routes() -> None:
    from prequal_middleware.cli import check

    env = {"PREQUAL_POOLS": '{"users": {"upstreams": ["http://127.0.0.1:8001"], "routes": ["/v1", "/v2"]}, "/api": []}'}
    assert check(env).startswith("pools users (1 upstreams; routes /v1 /v2), /api (0 upstreams); registry memory")

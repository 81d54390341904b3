"""``gateway.admin_router()`` in a FastAPI app under a real uvicorn: every admin route in ``/openapi.json``
with its models, and the same handlers as ``admin_app()`` (same answers, same refusals)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from prequal_middleware import AdminSettings, Gateway, PrequalMiddleware, UpstreamPool
from tests.helpers import gateway_app
from tests.servers import ServerThread, serve

fastapi = pytest.importorskip("fastapi")

PREFIX = "/_prequal"
ROUTES = {
    "/register": "post",
    "/heartbeat": "post",
    "/unregister": "post",
    "/backends": "get",
    "/healthz": "get",
    "/readyz": "get",
    "/metrics": "get",
    "/": "get",
}


def _router_app(gateway: Gateway) -> Any:
    app = fastapi.FastAPI()
    app.include_router(gateway.admin_router(), prefix=PREFIX)
    app.add_middleware(PrequalMiddleware, gateway=gateway)  # runs the gateway's lifespan
    return app


@pytest.fixture
def router_server() -> Iterator[ServerThread]:
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    with serve(_router_app(gateway)) as server:
        yield server


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]  # type: ignore[no-any-return]
    return schema


def _types(schema: dict[str, Any]) -> set[str]:
    return {schema["type"]} if "type" in schema else {s["type"] for s in schema.get("anyOf", [])}


def test_every_admin_route_is_in_the_openapi_schema(router_server: ServerThread) -> None:
    spec = httpx.get(router_server.url + "/openapi.json").json()
    paths = spec["paths"]
    for path, method in ROUTES.items():
        assert method in paths.get(PREFIX + path, {}), (path, sorted(paths))

    register = paths[PREFIX + "/register"]["post"]
    body = _resolve(spec, register["requestBody"]["content"]["application/json"]["schema"])
    properties = body["properties"]
    assert set(properties) == {"url", "pool", "weight", "metadata", "ttl_s"}
    assert body["required"] == ["url"]
    assert body["additionalProperties"] is False
    assert _types(properties["url"]) == {"string"}
    assert _types(properties["pool"]) == {"string", "null"}
    assert _types(properties["weight"]) == {"number"}
    assert (properties["weight"]["exclusiveMinimum"], properties["weight"]["maximum"]) == (0, 1000)
    assert _types(properties["metadata"]) == {"object", "null"}
    assert _types(properties["ttl_s"]) == {"number", "null"}

    # The answers and the refusals are documented, with their models.
    assert set(register["responses"]) == {"201", "400", "401", "403", "409", "413", "415", "429", "503"}
    record = _resolve(spec, register["responses"]["201"]["content"]["application/json"]["schema"])
    assert set(record["properties"]) == {"pool", "url", "weight", "metadata", "lease_expires_at", "ttl_s"}
    error = _resolve(spec, register["responses"]["400"]["content"]["application/json"]["schema"])
    assert set(error["properties"]) == {"error", "detail", "field"} and error["required"] == ["error", "detail"]
    assert set(paths[PREFIX + "/heartbeat"]["post"]["responses"]) >= {"200", "400", "401", "404", "429"}
    assert set(paths[PREFIX + "/unregister"]["post"]["responses"]) >= {"200", "400", "404", "409"}
    backends = paths[PREFIX + "/backends"]["get"]
    assert [p["name"] for p in backends["parameters"]] == ["pool", "offset", "limit"]
    status = _resolve(spec, backends["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(status["properties"]) == {"state", "registry", "pools"}
    assert "text/plain" in paths[PREFIX + "/metrics"]["get"]["responses"]["200"]["content"]
    # FastAPI validates nothing itself: no 422 that our handlers would never send.
    assert all("422" not in ops[m]["responses"] for ops in paths.values() for m in ops)


def test_registration_through_the_router(router_server: ServerThread) -> None:
    url = router_server.url + PREFIX
    created = httpx.post(url + "/register", json={"url": "http://127.0.0.1:9", "weight": 2, "metadata": {"z": "a"}})
    assert created.status_code == 201, created.text
    assert {k: created.json()[k] for k in ("pool", "url", "weight", "metadata")} == {
        "pool": "/api",
        "url": "http://127.0.0.1:9",
        "weight": 2,
        "metadata": {"z": "a"},
    }
    listed = httpx.get(url + "/backends").json()
    (pool,) = listed["pools"]
    assert [(m["url"], m["source"], m["weight"]) for m in pool["members"]] == [("http://127.0.0.1:9", "registered", 2)]
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(url + "/").headers["content-type"].startswith("text/html")


BAD_BODIES: list[tuple[bytes, dict[str, str]]] = [
    (b'{"url": "http://127.0.0.1:9", "weight": "2"}', {}),
    (b'{"url": "http://127.0.0.1:9", "weight": true}', {}),
    (b'{"url": "http://127.0.0.1:9", "weight": 0}', {}),
    (b'{"url": "http://127.0.0.1:9", "ttl_s": 100000}', {}),
    (b'{"url": "http://127.0.0.1:9", "metadata": [1]}', {}),
    (b'{"url": "http://127.0.0.1:9", "admin": true, "weight": "x"}', {}),
    (b'{"url": 7}', {}),
    (b"{}", {}),
    (b'{"url": "http://169.254.169.254:80"}', {}),
    (b'{"url": "http://127.0.0.1:9", "pool": "/nope"}', {}),
    (b"{not json", {}),
    (b'{"url": "http://127.0.0.1:9"}', {"content-type": "text/plain"}),
    (b"{" + b" " * 20_000 + b"}", {}),
]


def test_bad_bodies_get_the_same_answer_from_both_wrappings(router_server: ServerThread) -> None:
    gateway = Gateway(pools=[UpstreamPool("/api")], admin=AdminSettings(trust_loopback=True))
    with serve(gateway_app(gateway)) as plain:
        for content, headers in BAD_BODIES:
            sent = {"content-type": "application/json", **headers}
            via_router = httpx.post(router_server.url + PREFIX + "/register", content=content, headers=sent)
            via_app = httpx.post(plain.url + PREFIX + "/register", content=content, headers=sent)
            assert via_router.status_code == via_app.status_code, content
            assert 400 <= via_router.status_code < 500, content
            assert via_router.json() == via_app.json(), content
            answer = via_router.json()
            assert set(answer) <= {"error", "detail", "field"}, answer
            # Our words, never pydantic's (its messages, its links, the input echoed back).
            assert "Input should" not in via_router.text and "pydantic" not in via_router.text, answer
    expected = {
        b'{"url": "http://127.0.0.1:9", "weight": "2"}': ("invalid_field", "weight must be a finite number", "weight"),
        b'{"url": "http://127.0.0.1:9", "weight": 0}': ("invalid_field", "weight must be > 0", "weight"),
        b'{"url": "http://127.0.0.1:9", "ttl_s": 100000}': (
            "invalid_field",
            "ttl_s must be in (0, 3600], got 100000",
            "ttl_s",
        ),
        b'{"url": "http://127.0.0.1:9", "admin": true, "weight": "x"}': (
            "unknown_field",
            "unknown field 'admin'",
            "admin",
        ),
        b"{}": ("invalid_field", "url is required", "url"),
    }
    for content, (error, detail, field) in expected.items():
        answer = httpx.post(
            router_server.url + PREFIX + "/register", content=content, headers={"content-type": "application/json"}
        )
        assert answer.json() == {"error": error, "detail": detail, "field": field}
    assert httpx.get(router_server.url + PREFIX + "/backends").json()["pools"][0]["members"] == [], "nothing applied"

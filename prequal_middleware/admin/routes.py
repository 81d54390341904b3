"""The admin routes: registration, health, metrics and the status page, mountable anywhere.

    app.mount("/_prequal", gateway.admin_app())          # Starlette or FastAPI
    app.include_router(gateway.admin_router(), prefix="/_prequal")   # FastAPI, listed in its OpenAPI

| route | what |
|---|---|
| ``POST /register`` | ``{"url", "pool"?, "weight"?, "metadata"?, "ttl_s"?}`` -> 201 with the record and its lease |
| ``POST /heartbeat`` | ``{"url", "pool"?, "ttl_s"?}`` -> 200; 404 for an unknown backend (register again) |
| ``POST /unregister`` | ``{"url", "pool"?}`` -> 200; the backend drains: no new requests, in-flight ones finish |
| ``GET /backends`` | pools, members counted by state, a page of members (``?pool=&offset=&limit=``, 100) |
| ``GET /healthz`` | 200 while the gateway runs |
| ``GET /readyz`` | 200 when each required pool has a healthy member and the registry is fresh, else 503 |
| ``GET /metrics`` | Prometheus exposition |
| ``GET /`` | the status page |

``pool`` names a pool by its name (``UpstreamPool.name``; a pool declared by prefix is named by it),
never a route's prefix: every route to the pool is served by the backends registered under it; an
unknown pool is a 400 naming the field.

One table of routes (``admin_table``), two wrappings of the same handlers: ``admin_app()`` is a plain
Starlette app (no FastAPI import), ``admin_router()`` an ``APIRouter`` of ``APIRoute``s carrying the
request and answer models of ``admin.schemas`` for OpenAPI. Either way the handlers read the body
themselves (auth, rate limit and size cap before any parsing; our error answers, not FastAPI's 422).

The routes only read and change the ``Gateway``'s state. Writes need the bearer token when one is
configured, else a loopback client (see ``registration``); every refusal is a 4xx JSON error naming
the field or the reason, and nothing is half-applied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from prequal_middleware.admin import schemas
from prequal_middleware.admin.status import DEFAULT_MEMBER_LIMIT, MAX_MEMBER_LIMIT, describe, record_json
from prequal_middleware.admin.status_page import status_page
from prequal_middleware.exceptions import RegistrationError, RegistryUnavailable
from prequal_middleware.registry.registration import WriteRate, authorize, parse_body, validate

if TYPE_CHECKING:
    from prequal_middleware.gateway.gateway import Gateway

logger = logging.getLogger("prequal_middleware.admin.routes")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"cache-control": "no-store", **(headers or {})})


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RegistrationError(413, "body_too_large", f"the body must be at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RegistrationError(413, "body_too_large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _query_int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or not low <= int(raw) <= high:
        raise RegistrationError(400, "invalid_field", f"{name} must be an integer in [{low}, {high}]", field=name)
    return int(raw)


Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class AdminRoute:
    """One admin route: its handler, and what OpenAPI says of it (only ``admin_router`` reads that part)."""

    path: str
    method: str
    endpoint: Endpoint
    summary: str
    answer: type[Any] | None = None  # the model of the success answer
    status: int = 200
    errors: dict[int, str] = field(default_factory=dict)  # status -> when
    error_answer: type[Any] = schemas.Error  # the model of the error answers
    body: type[Any] | None = None  # the request body's model
    media_type: str = "application/json"
    query: tuple[dict[str, Any], ...] = ()  # OpenAPI parameters the handler reads itself


_WRITE_ERRORS = {
    400: "a bad body: the field is named",
    401: "no valid bearer token",
    403: "refused: no token and no loopback trust, a proxied or browser request, or a forbidden upstream",
    413: "the body is too large",
    415: "the body is not application/json",
    429: "too many admin writes; see Retry-After",
    503: "the registry cannot be written now; see Retry-After",
}


def admin_table(gateway: Gateway) -> list[AdminRoute]:
    """The admin routes of ``gateway``: the one implementation both wrappings serve."""
    settings = gateway.admin
    allow = gateway.allow_list
    rate = WriteRate(settings.max_writes_per_s)

    async def write(request: Request, kind: str) -> Response:
        try:
            authorize(settings, request.scope["headers"], request.scope.get("client"))
            wait_s = rate.take(gateway.clock())
            if wait_s > 0:
                raise RegistrationError(
                    429,
                    "too_many_writes",
                    f"more than {settings.max_writes_per_s:g} admin writes per second; retry later",
                    retry_after_s=wait_s,
                )
            body = parse_body(await _read_limited(request, settings.max_body_bytes))
            route_pools = {prefix: route.pool.name for prefix, route in gateway.routes.items()}
            req = validate(
                body, kind=kind, pools=list(gateway.pools), settings=settings, allow=allow, routes=route_pools
            )
            if kind == "register":
                members = gateway.pools[req.pool].members
                if req.url not in members and len(members) >= settings.max_members_per_pool:
                    raise RegistrationError(
                        409,
                        "pool_full",
                        f"the pool {req.pool} has {settings.max_members_per_pool} members, the most it may have",
                        field="pool",
                    )
                record = await gateway.register(req)
                return _json(record_json(record), 201)
            if kind == "heartbeat":
                renewed = await gateway.heartbeat(req)
                if renewed is None:
                    raise RegistrationError(404, "unknown_backend", "no such backend: register again", field="url")
                return _json(record_json(renewed))
            if req.url in gateway.pools[req.pool].config.upstreams:
                raise RegistrationError(409, "static_member", "a static upstream cannot be unregistered", field="url")
            if not await gateway.unregister(req):
                raise RegistrationError(404, "unknown_backend", "no such backend", field="url")
            return _json({"pool": req.pool, "url": req.url, "unregistered": True, "draining": True})
        except RegistrationError as exc:
            gateway.metrics.child(gateway.metrics.registry_events, "rejected").inc()
            client = request.scope.get("client")
            gateway.events.admin_refused(
                exc.status, exc.error, request.method, request.url.path, client[0] if client else None
            )
            retry = {"retry-after": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s is not None else None
            return _json(exc.body(), exc.status, retry)
        except RegistryUnavailable:
            logger.warning("registry unavailable for %s", kind)
            return _json(
                {"error": "registry_unavailable", "detail": "the registry cannot be written now; retry"},
                503,
                {"retry-after": "1"},
            )

    async def register(request: Request) -> Response:
        return await write(request, "register")

    async def heartbeat(request: Request) -> Response:
        return await write(request, "heartbeat")

    async def unregister(request: Request) -> Response:
        return await write(request, "unregister")

    async def backends(request: Request) -> Response:
        query = request.query_params
        try:
            pool = query.get("pool")
            if pool is not None and pool not in gateway.pools:
                raise RegistrationError(400, "invalid_field", f"pool must be one of {', '.join(gateway.pools)}", "pool")
            offset = _query_int(query.get("offset"), "offset", 0, 0, 10**9)
            limit = _query_int(query.get("limit"), "limit", DEFAULT_MEMBER_LIMIT, 1, MAX_MEMBER_LIMIT)
        except RegistrationError as exc:
            return _json(exc.body(), exc.status)
        return _json(describe(gateway, pool=pool, offset=offset, limit=limit).model_dump())

    async def healthz(request: Request) -> Response:
        if not gateway.running:
            return _json({"status": "stopped"}, 503)
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        report = gateway.readiness()
        answer = schemas.Readiness.model_validate(report.as_json()).model_dump()  # what the schema documents
        return _json(answer, 200 if report.ready else 503)

    async def metrics(request: Request) -> Response:
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type, headers={"cache-control": "no-store"})

    return [
        AdminRoute("/", "GET", status_page, "The status page (HTML)", media_type="text/html"),
        AdminRoute(
            "/register",
            "POST",
            register,
            "Register a backend, or update it in place",
            schemas.Record,
            201,
            {**_WRITE_ERRORS, 409: "the pool is full"},
            body=schemas.RegisterBody,
        ),
        AdminRoute(
            "/heartbeat",
            "POST",
            heartbeat,
            "Renew a backend's lease",
            schemas.Record,
            200,
            {**_WRITE_ERRORS, 404: "no such backend: register again"},
            body=schemas.HeartbeatBody,
        ),
        AdminRoute(
            "/unregister",
            "POST",
            unregister,
            "Unregister a backend; it drains",
            schemas.Unregistered,
            200,
            {**_WRITE_ERRORS, 404: "no such backend", 409: "a static upstream cannot be unregistered"},
            body=schemas.UnregisterBody,
        ),
        AdminRoute(
            "/backends",
            "GET",
            backends,
            "Pools, members by state, and a page of members",
            schemas.GatewayStatus,
            200,
            {400: "a bad query parameter: the parameter is named"},
            query=_BACKENDS_QUERY,
        ),
        AdminRoute(
            "/healthz", "GET", healthz, "Alive", schemas.Health, 200, {503: "stopped"}, error_answer=schemas.Health
        ),
        AdminRoute(
            "/readyz",
            "GET",
            readyz,
            "Ready to serve",
            schemas.Readiness,
            200,
            {503: "not ready, with the reasons"},
            error_answer=schemas.Readiness,
        ),
        AdminRoute("/metrics", "GET", metrics, "Prometheus exposition", media_type="text/plain"),
    ]


_BACKENDS_QUERY = tuple(
    {"name": name, "in": "query", "required": False, "description": text, "schema": schema}
    for name, text, schema in (
        ("pool", "only this pool (its name)", {"type": "string"}),
        ("offset", "the first member listed", {"type": "integer", "minimum": 0, "default": 0}),
        (
            "limit",
            "members listed per pool",
            {"type": "integer", "minimum": 1, "maximum": MAX_MEMBER_LIMIT, "default": DEFAULT_MEMBER_LIMIT},
        ),
    )
)


def admin_routes(gateway: Gateway) -> list[BaseRoute]:
    """The admin routes of ``gateway`` as Starlette routes, for a ``Mount`` or an app of their own."""
    return [Route(r.path, r.endpoint, methods=[r.method], name=r.endpoint.__name__) for r in admin_table(gateway)]


def admin_app(gateway: Gateway) -> Starlette:
    """A Starlette app of the admin routes, to ``app.mount("/_prequal", ...)``."""
    return Starlette(routes=admin_routes(gateway))


def admin_router(gateway: Gateway) -> Any:
    """A FastAPI ``APIRouter`` of ``APIRoute``s: the admin routes, with their models, in the app's OpenAPI
    schema (requires FastAPI). The handlers are ``admin_app()``'s; FastAPI validates nothing itself."""
    try:
        from fastapi import APIRouter
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("admin_router() needs FastAPI: pip install fastapi, or mount admin_app()") from exc
    classes = {"text/html": HTMLResponse, "text/plain": PlainTextResponse}
    router = APIRouter(tags=["prequal admin"])
    for r in admin_table(gateway):
        extra: dict[str, Any] = {}
        if r.body is not None:
            # Documented, not parsed by FastAPI: the handler authenticates and caps the size first.
            schema = r.body.model_json_schema(ref_template="#/components/schemas/{model}")
            extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        if r.query:
            extra["parameters"] = list(r.query)
        router.add_api_route(
            r.path,
            r.endpoint,
            methods=[r.method],
            name=r.endpoint.__name__,
            summary=r.summary,
            status_code=r.status,
            response_model=r.answer,
            response_class=classes.get(r.media_type, JSONResponse),
            responses={code: {"model": r.error_answer, "description": when} for code, when in r.errors.items()},
            openapi_extra=extra or None,
        )
    return router

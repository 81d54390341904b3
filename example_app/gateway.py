"""The demo gateway: a host app with its own routes, and ``PrequalMiddleware`` in front of it.

``uvicorn example_app.gateway:app --port 8000`` builds the pools from ``PREQUAL_POOLS`` (JSON: prefix ->
list of upstream URLs, or -> object with ``upstreams``, ``policy``, ``strip_prefix``, ...). Unset, there
is one pool at ``/api`` with no members.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prequal_middleware import Gateway, PrequalMiddleware
from prequal_middleware.envconfig import pools_from_env


def create_app(gateway: Gateway) -> Any:
    """The host app: ``/`` describes the gateway, ``/status`` shows its pools; ``/api/...`` is proxied."""

    async def index(request: Request) -> Response:
        return JSONResponse(
            {
                "app": "prequal-middleware example",
                "pools": {prefix: sorted(pool.members) for prefix, pool in gateway.pools.items()},
            }
        )

    async def status(request: Request) -> Response:
        snapshot = gateway.snapshot()
        pools = {}
        for prefix, pool in snapshot["pools"].items():
            client = pool["clients"][0]
            pools[prefix] = {
                "policy": pool["policy"],
                "selections": client.selections,
                "backends": [
                    {"url": b.id, "state": b.state, "probe_mode": b.probe_mode, "rif": b.rif, "latency_s": b.latency_s}
                    for b in client.backends
                ],
            }
        return JSONResponse({"state": snapshot["state"], "pools": pools})

    app = Starlette(routes=[Route("/", index), Route("/status", status)])
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


app = create_app(Gateway(pools_from_env()))

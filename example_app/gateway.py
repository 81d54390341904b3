"""The demo gateway: a host app with its own routes, ``PrequalMiddleware`` in front of it, and the admin
routes at ``/_prequal`` (register / heartbeat / unregister, backends, health, metrics, status page).

``uvicorn example_app.gateway:app --port 8000`` is configured by ``Gateway.from_env()``: pools from
``PREQUAL_POOLS`` (JSON: prefix -> list of upstream URLs, or -> object with ``upstreams``, ``policy``,
``strip_prefix``, ...; unset, one pool at ``/api`` filled by registration), ``PREQUAL_REGISTRY``,
``PREQUAL_REGISTRATION_TOKEN``, ``PREQUAL_ALLOWED_UPSTREAMS`` and the rest (``prequal_middleware.envconfig``).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from prequal_middleware import Gateway, PrequalMiddleware


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

    app = Starlette(routes=[Route("/", index), Route("/status", status), Mount("/_prequal", gateway.admin_app())])
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


def demo_environ() -> dict[str, str]:
    """The environment, with loopback trust for admin writes unless ``PREQUAL_ADMIN_TRUST_LOOPBACK`` says otherwise.

    The library refuses tokenless admin writes by default (``AdminSettings``); this demo keeps the seed's
    quick start (a local backend registers itself without a token). Set ``PREQUAL_REGISTRATION_TOKEN``,
    or ``PREQUAL_ADMIN_TRUST_LOOPBACK=0``, before a proxy on this host forwards anything to it.
    """
    env = dict(os.environ)
    env.setdefault("PREQUAL_ADMIN_TRUST_LOOPBACK", "1")
    return env


app = create_app(Gateway.from_env(demo_environ()))

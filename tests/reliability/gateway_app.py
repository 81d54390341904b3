"""A gateway as a process of its own, so a test can read its RSS and file descriptors from /proc.

    PREQUAL_POOLS='{"/api": ["http://127.0.0.1:8001"]}' python -m tests.reliability.gateway_app --port 8000

Configured like ``example_app.gateway`` by ``Gateway.from_env()`` (``PREQUAL_*``), admin routes at
``/_prequal``, run under uvicorn as the README says (``--no-proxy-headers --no-server-header
--no-date-header``) unless ``--proxy-headers`` asks for uvicorn's trusted-proxy handling (every peer
trusted). With ``--record-attempts`` every upstream attempt is recorded, through the pools'
``on_request`` hook, as ``(wall time, backend)`` and served at ``GET /_test/attempts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from prequal_middleware import Gateway, PrequalMiddleware
from prequal_middleware.envconfig import gateway_kwargs_from_env
from prequal_middleware.transports.base import UpstreamRequest


def create_app(record_attempts: bool) -> Any:
    # Like example_app's demo gateway: tokenless admin writes from loopback unless the test says otherwise.
    kwargs = gateway_kwargs_from_env({"PREQUAL_ADMIN_TRUST_LOOPBACK": "1", **os.environ})
    attempts: list[tuple[float, str]] = []

    def record(request: UpstreamRequest) -> None:
        attempts.append((time.time(), request.backend))

    if record_attempts:
        kwargs["pools"] = [dataclasses.replace(p, on_request=record) for p in kwargs["pools"]]
    gateway = Gateway(**kwargs)

    async def attempts_route(request: Request) -> Response:
        since = float(request.query_params.get("since", "0"))
        return JSONResponse([a for a in attempts if a[0] >= since])

    app = Starlette(routes=[Route("/_test/attempts", attempts_route), Mount("/_prequal", gateway.admin_app())])
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.gateway_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    parser.add_argument("--record-attempts", action="store_true")
    parser.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-For from every peer")
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.record_attempts),
        host=args.host,
        port=args.port,
        http=args.http,
        log_level="warning",
        lifespan="on",
        proxy_headers=args.proxy_headers,
        forwarded_allow_ips="*" if args.proxy_headers else None,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=3,
    )


if __name__ == "__main__":
    main()

"""A demo backend: private capacity (a few slots with a queue behind them), reporting its load.

Each request to ``/work`` holds one of ``slots`` for about ``delay_ms`` (exponentially distributed,
so some requests are much slower), like a service with a small worker pool. ``LoadReportingMiddleware``
answers the gateway's probes with the requests in flight and the latency at that load.

Run one on its own with ``uvicorn example_app.backend:app --port 8001``; the environment sets it up:

- ``PREQUAL_BACKEND_NAME`` (default: ``backend-<pid>``), ``PREQUAL_BACKEND_DELAY_MS`` (default 20),
  ``PREQUAL_BACKEND_SLOTS`` (default 4);
- with ``PREQUAL_GATEWAY_URL`` (the gateway's admin mount, e.g. ``http://localhost:8000/_prequal``) it
  registers itself as ``PREQUAL_BACKEND_URL`` (required then) in ``PREQUAL_POOL`` (default: the
  gateway's only pool), with ``PREQUAL_REGISTRATION_TOKEN`` if the gateway needs one, heartbeats and
  unregisters at shutdown. Without it, it only serves.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from prequal_middleware import LoadReportingMiddleware
from prequal_middleware.backend.self_registration import SelfRegistration


def create_backend(
    name: str, *, delay_ms: float = 20.0, slots: int = 4, registration: SelfRegistration | None = None
) -> LoadReportingMiddleware:
    """A demo backend app named ``name``; with ``registration`` it registers itself while it runs."""
    capacity = asyncio.Semaphore(slots)
    rng = random.Random()

    async def work(request: Request) -> Response:
        async with capacity:
            service_s = rng.expovariate(1000.0 / delay_ms) if delay_ms > 0 else 0.0
            await asyncio.sleep(service_s)
        return JSONResponse({"backend": name, "path": request.url.path, "service_ms": round(service_s * 1000, 3)})

    async def index(request: Request) -> Response:
        return JSONResponse({"backend": name, "path": request.url.path, "delay_ms": delay_ms, "slots": slots})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/work", work),
            Route("/{path:path}", index, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ],
        lifespan=registration.lifespan if registration is not None else None,
    )
    return LoadReportingMiddleware(app)


def registration_from_env(environ: Mapping[str, str]) -> SelfRegistration | None:
    gateway_url = environ.get("PREQUAL_GATEWAY_URL")
    if not gateway_url:
        return None
    url = environ.get("PREQUAL_BACKEND_URL")
    if not url:
        raise SystemExit(
            "PREQUAL_GATEWAY_URL is set, so PREQUAL_BACKEND_URL must say how the gateway reaches this backend"
        )
    return SelfRegistration(
        gateway_url,
        url,
        pool=environ.get("PREQUAL_POOL") or None,
        token=environ.get("PREQUAL_REGISTRATION_TOKEN") or None,
    )


app = create_backend(
    os.environ.get("PREQUAL_BACKEND_NAME", f"backend-{os.getpid()}"),
    delay_ms=float(os.environ.get("PREQUAL_BACKEND_DELAY_MS", "20")),
    slots=int(os.environ.get("PREQUAL_BACKEND_SLOTS", "4")),
    registration=registration_from_env(os.environ),
)

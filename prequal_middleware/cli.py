"""``prequal-gateway`` (and ``python -m prequal_middleware``): run a gateway without writing an app.

    prequal-gateway [--config prequal.toml] [--host 0.0.0.0] [--port 8000] [--workers 2] [--check]

The gateway is configured by the ``PREQUAL_*`` environment variables (``envconfig``) and/or a TOML file;
the environment overrides the file, and the flags override both. The file::

    [server]                     # host, port, workers, log_level, admin_path
    port = 8000
    workers = 2

    [gateway]                    # any PREQUAL_* variable, lower case and without the prefix
    registry = "sqlite:/var/lib/prequal/registry.db"
    registration_token = "a-long-random-secret"
    allowed_upstreams = ["10.0.0.0/8"]

    [pools."/api"]               # what PREQUAL_POOLS holds, as tables
    upstreams = ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    timeouts = { connect_s = 0.5 }

What runs: uvicorn with the settings in ``SERVER_SETTINGS`` (httptools, a connection cap, no ``Server``
or ``Date`` header of its own so the backends' pass through once, no trust in ``X-Forwarded-*``, a
bounded graceful shutdown), an app that proxies the configured pools, serves the admin routes at
``admin_path`` (``/_prequal``) and answers anything else with a JSON 404. Under ``--workers N`` the
workers share membership (``registry.default``: a SQLite file unless a registry is named).

Logs: uvicorn's and the ``prequal_middleware`` loggers on stderr at the log level; the access log
(``PREQUAL_ACCESS_LOG``) on stdout, one line per proxied request; uvicorn's access log is off (``log_config``).

A configuration error is one line on stderr naming the variable or key and what is wrong, and exit
status 2; ``--check`` validates and exits (0 when the configuration is good).

On SIGHUP and when the file changes, each worker reloads its pools and routes without dropping a
request (``reload``, ``Gateway.reconfigure``).

Once started, each worker settles its heap (``heap.settle_heap``): the objects start-up made are frozen
out of the garbage collector's full collections, and its young generation is collected every 10,000
allocations rather than 700. No setting turns this off: it only moves work out of the request path.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prequal_middleware import config_schema
from prequal_middleware.config import AccessLogSettings
from prequal_middleware.exceptions import ConfigurationError

PROG = "prequal-gateway"
DEFAULT_ADMIN_PATH = config_schema.DEFAULT_ADMIN_PATH

# The uvicorn settings we recommend in front of untrusted clients. uvicorn has no timeout for reading a
# request's headers (its keep-alive timer stops at a connection's first byte, so a client sending a byte
# at a time holds the connection): limit_concurrency caps what such clients can hold (beyond it, 503),
# and a proxy or load balancer in front (NGINX client_header_timeout, HAProxy timeout http-request)
# should bound header time. Bodies are bounded by the pools' RequestLimits (buffering, 408).
SERVER_SETTINGS: dict[str, Any] = {
    "http": "httptools",
    "lifespan": "on",  # a gateway that cannot start must stop the server, not serve without probes
    "limit_concurrency": 2048,  # connections + tasks; beyond it, new requests get 503 at once
    "backlog": 2048,
    "timeout_keep_alive": 5,  # idle keep-alive connections are closed after 5 s
    "h11_max_incomplete_event_size": 64 * 1024,  # h11: request line + headers (httptools has its own cap)
    "ws_max_size": 16 * 1024 * 1024,  # the largest WebSocket message
    "ws_ping_interval": 20.0,  # dead WebSocket peers are found and closed
    "ws_ping_timeout": 20.0,
    "timeout_graceful_shutdown": 10,
    "proxy_headers": False,  # X-Forwarded-For is appended to, never trusted
    "server_header": False,  # the backends' own Server and Date headers pass through, once
    "date_header": False,
}

# Under --workers N, how long uvicorn's supervisor waits for a new worker to be ready (a SIGHUP's
# replacement; else the restart is abandoned and the old workers keep the old file) and for a worker to
# answer its liveness ping (else it is killed as hung). uvicorn's 5 s is less than a worker's start-up
# (imports, the gateway's lifespan) on a busy host; the ping is answered by a thread of the worker, so a
# worker busy serving still answers it, and 30 s only delays noticing one truly wedged.
WORKER_HEALTHCHECK_TIMEOUT_S = 30

# [gateway] keys: the PREQUAL_* variables envconfig reads, lower case without the prefix. Lists are
# joined with commas (the variables' own format); booleans become true/false.
GATEWAY_KEYS = config_schema.GATEWAY_KEYS
SERVER_KEYS = tuple(config_schema.ServerTable.model_fields)
LOG_LEVELS = config_schema.LOG_LEVELS
ACCESS_LOGGER = AccessLogSettings().logger  # what PREQUAL_ACCESS_LOG writes to


def log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging configuration plus our loggers: ``prequal_middleware`` (events, startup, reloads) on
    stderr at ``log_level`` in uvicorn's format; the access log on stdout, one bare line per request (a JSON
    line stays parseable), whatever ``log_level`` says: ``PREQUAL_ACCESS_LOG`` alone turns it on and off."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["prequal_access"] = {"format": "%(message)s"}
    config["handlers"]["prequal_access"] = {
        "class": "logging.StreamHandler",
        "formatter": "prequal_access",
        "stream": "ext://sys.stdout",  # where uvicorn's access log goes
    }
    config["loggers"]["prequal_middleware"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    config["loggers"][ACCESS_LOGGER] = {"handlers": ["prequal_access"], "level": "INFO", "propagate": False}
    return config


def environ_from_file(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The ``PREQUAL_*`` variables and the ``[server]`` settings a TOML file describes (validated by
    ``config_schema.ConfigFile``; an error names the file and the key)."""
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{where}: invalid TOML ({exc})") from None
    try:
        described = config_schema.ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise config_schema.config_error(exc, config_schema.file_where(where), an_object="a table") from None
    env = {"PREQUAL_" + key.upper(): value for key, value in described.gateway.items()}
    if "pools" in data:
        # Validated with the environment's PREQUAL_POOLS (which overrides it); TOML dates go as text.
        env["PREQUAL_POOLS"] = json.dumps(described.pools, default=str)
    return env, described.server.model_dump(exclude_unset=True)


def check(env: Mapping[str, str]) -> str:
    """Validate a configuration the way the gateway will read it; a one-line summary when it is good."""
    from prequal_middleware.envconfig import gateway_kwargs_from_env
    from prequal_middleware.registry.default import check_registry_fits_workers

    kwargs = gateway_kwargs_from_env(env)
    check_registry_fits_workers(kwargs["registry"], env, argv=())
    admin_path = env.get("PREQUAL_ADMIN_PATH", DEFAULT_ADMIN_PATH)  # checked by gateway_kwargs_from_env
    routes: dict[str, list[str]] = {}
    for route in kwargs["routes"]:
        routes.setdefault(route.pool, []).append(route.prefix)
    pools = ", ".join(
        f"{p.name} ({len(p.upstreams)} upstreams"
        + (f"; routes {' '.join(routes[p.name])}" if p.name in routes else "")
        + ")"
        for p in kwargs["pools"]
    )
    return f"pools {pools}; registry {kwargs['registry'].kind}; admin at {admin_path}"


def create_app() -> Any:
    """The app ``prequal-gateway`` serves, from the environment (a uvicorn factory, one per worker).

    It reads the configuration file as it is now (a worker may start long after ``main``, when uvicorn
    replaces it) and reloads the pools and routes on SIGHUP and when the file changes (``reload``).
    """
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount

    from prequal_middleware.gateway.gateway import Gateway
    from prequal_middleware.gateway.middleware import PrequalMiddleware
    from prequal_middleware.heap import settle_heap
    from prequal_middleware.reload import ConfigSource, Read, Reloader, poll_interval

    source = ConfigSource.from_environ()
    try:
        current = source.read()
    except ConfigurationError as exc:
        # Only a worker started after an edit gets here (main validated the file): it serves what was
        # validated at start rather than failing (uvicorn would start it again and again).
        logging.getLogger("prequal_middleware.reload").warning(
            "the configuration file is invalid, serving the configuration validated at start: %s", exc
        )
        current = Read(dict(os.environ), {}, source.fingerprint())
    gateway = Gateway.from_env(current.env)
    reloader = Reloader(gateway, source, current, poll_s=poll_interval(current.env))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with reloader.running():  # the gateway is running here: PrequalMiddleware started it
            frozen = settle_heap()  # start-up's objects frozen, young collections rarer (heap.py says why)
            logging.getLogger("prequal_middleware.heap").info(
                "heap settled: %d start-up objects frozen, generation 0 collected every %d allocations",
                frozen,
                gc.get_threshold()[0],
            )
            yield

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "not_found", "detail": "no pool or route serves this path"}, status_code=404)

    admin_path = current.env.get("PREQUAL_ADMIN_PATH", DEFAULT_ADMIN_PATH)
    app = Starlette(
        routes=[Mount(admin_path, gateway.admin_app())], exception_handlers={404: not_found}, lifespan=lifespan
    )
    return PrequalMiddleware(app, gateway=gateway)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a Prequal gateway from PREQUAL_* variables and/or a TOML file."
    )
    parser.add_argument("--config", type=Path, help='a TOML file ([server], [gateway], [pools."/prefix"])')
    parser.add_argument("--host", help="address to listen on [127.0.0.1]")
    parser.add_argument("--port", type=int, help="port to listen on [8000]")
    parser.add_argument("--workers", type=int, help="worker processes [1]; they share membership")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="[info]")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        file_env: dict[str, str] = {}
        server: dict[str, Any] = {}
        if args.config is not None:
            file_env, server = environ_from_file(args.config)
        env = {**file_env, **os.environ}  # the environment overrides the file
        host = args.host or server.get("host", "127.0.0.1")
        port = args.port if args.port is not None else server.get("port", 8000)
        if args.workers is not None:
            workers = args.workers
        elif "workers" in server:
            workers = server["workers"]
        else:
            from prequal_middleware.registry.default import worker_count

            workers = worker_count(env, argv=())  # PREQUAL_WORKERS or WEB_CONCURRENCY, else 1
        log_level = args.log_level or server.get("log_level", "info")
        if "admin_path" in server and "PREQUAL_ADMIN_PATH" not in os.environ:
            env["PREQUAL_ADMIN_PATH"] = server["admin_path"]
        if not (isinstance(workers, int) and workers >= 1):
            raise ConfigurationError(f"workers must be a whole number >= 1, got {workers!r}")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ConfigurationError(f"port must be 0-65535, got {port!r}")
        if log_level not in LOG_LEVELS:
            raise ConfigurationError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        env["PREQUAL_WORKERS"] = str(workers)
        summary = check(env)
    except ConfigurationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{PROG}: configuration ok: {summary}")
        return 0
    from prequal_middleware.reload import remember

    remember(args.config, file_env, os.environ)  # what a reload reads again: the file, and which variables it set
    os.environ.update(env)  # the workers (and create_app in each) read it
    import uvicorn

    if hasattr(signal, "SIGHUP") and workers == 1:
        # Until the app's lifespan listens for it, a SIGHUP would end the server (the default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    supervisor: dict[str, Any] = {}
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:  # uvicorn >= 0.36
        supervisor["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_TIMEOUT_S
    uvicorn.run(
        "prequal_middleware.cli:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=log_config(log_level),  # applied by uvicorn in each worker too
        access_log=False,  # PREQUAL_ACCESS_LOG is the access log: uvicorn's would be a second line per request
        **SERVER_SETTINGS,
        **supervisor,
    )
    return 0

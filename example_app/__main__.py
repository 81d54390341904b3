"""``python -m example_app``: the gateway and a few demo backends of different speeds, in one process.

    python -m example_app [--host 127.0.0.1] [--port 8000] [--backends 4] [--policy prequal]

Backends listen on the next ports (8001, 8002, ...). Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
from typing import Any

import uvicorn

from prequal_middleware import Gateway, UpstreamPool
from prequal_middleware.cli import SERVER_SETTINGS
from prequal_middleware.core import POLICY_CLASSES

from .backend import create_backend
from .gateway import create_app

# The uvicorn settings we recommend (prequal-gateway runs with them too).

# Backend speeds: each next one is slower, so there is something to balance.
DELAYS_MS = (10.0, 15.0, 25.0, 40.0, 60.0, 90.0)


class BackgroundServer:
    """A uvicorn server on its own event loop in a daemon thread (signals stay with the main one)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio turns TCP_NODELAY on for accepted sockets only when the
        # listening socket says it is TCP; without it keep-alive responses stall ~40 ms (Nagle).
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backends", type=int, default=4, help="demo backends to start [4]")
    parser.add_argument("--policy", default="prequal", choices=sorted(POLICY_CLASSES))
    args = parser.parse_args(argv)
    if not 1 <= args.backends <= 64:
        parser.error("--backends must be between 1 and 64")

    backends: list[BackgroundServer] = []
    urls = []
    try:
        for i in range(args.backends):
            delay = DELAYS_MS[i % len(DELAYS_MS)]
            server = BackgroundServer(create_backend(f"backend-{i + 1}", delay_ms=delay), args.host, args.port + 1 + i)
            server.start()
            backends.append(server)
            host = f"[{args.host}]" if ":" in args.host else args.host
            urls.append(f"http://{host}:{args.port + 1 + i}")
    except OSError as exc:
        for server in backends:
            server.stop()
        print(f"cannot start the demo backends: {exc}", file=sys.stderr)
        return 1

    gateway = Gateway(pools=[UpstreamPool("/api", upstreams=urls, policy=args.policy)])
    base = f"http://{args.host}:{args.port}"
    print(f"prequal-middleware example: gateway on {base}, backends {', '.join(urls)}", flush=True)
    print(f"  curl {base}/api/work        # balanced with {args.policy} over the backends", flush=True)
    print(f"  curl {base}/status          # what the balancer sees", flush=True)
    print(f"  curl {base}/                # the host app's own route", flush=True)
    print("Ctrl-C stops everything.", flush=True)
    try:
        uvicorn.run(
            create_app(gateway),
            host=args.host,
            port=args.port,
            log_level="warning",
            **SERVER_SETTINGS,
        )
    finally:
        for server in backends:
            server.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the integration tests: waiting, gateway apps, subprocesses, ports."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount

from prequal_middleware import Gateway, PrequalMiddleware


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; AssertionError naming ``what`` after ``timeout_s``."""
    seconds_until(condition, timeout_s, what)


def seconds_until(condition: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> float:
    """How long ``condition`` took to hold (polled every 10 ms)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def wait_http(url: str, timeout_s: float = 15.0) -> httpx.Response:
    """GET ``url`` until the server answers at all."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=2.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def gateway_app(gateway: Gateway, routes: list[BaseRoute] | None = None) -> Any:
    """A host app with the admin routes at ``/_prequal`` and the gateway's middleware."""
    app = Starlette(routes=[*(routes or []), Mount("/_prequal", gateway.admin_app())])
    app.add_middleware(PrequalMiddleware, gateway=gateway)
    return app


def members(gateway_url: str, pool: str | None = None) -> dict[str, dict[str, Any]]:
    """The members ``GET /_prequal/backends`` lists (of one pool, or of all), by URL."""
    described = httpx.get(gateway_url + "/_prequal/backends").json()
    return {m["url"]: m for p in described["pools"] if pool in (None, p["prefix"]) for m in p["members"]}


def probe_rif(url: str) -> int:
    """A backend's requests in flight, as its probe endpoint reports them."""
    return int(httpx.get(url + "/_prequal/probe").headers["x-prequal-rif"])


@contextmanager
def running(
    args: list[str], env: dict[str, str] | None = None, *, capture: bool = True
) -> Iterator[subprocess.Popen[str]]:
    """``python <args>`` as a subprocess, terminated (then killed) by its PID at the end."""
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.communicate(timeout=10)  # also closes the pipe
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)


def consecutive_free_ports(count: int) -> int:
    """A port P with P .. P+count-1 all bindable, below Linux's ephemeral range (32768+) so that no
    outgoing connection takes one of them in the meantime."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free run of ports")

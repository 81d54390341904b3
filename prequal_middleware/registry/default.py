"""Which registry a gateway gets when none is named: one that every worker process of the server shares.

A ``MemoryRegistry`` lives in one process. Under ``uvicorn --workers N`` (or gunicorn's ``-w N``) each
worker is its own gateway, so a registration would reach the one worker that took the admin request:
``/backends`` would answer differently per request and the new backend would get a fraction of its
traffic. So when the server runs more than one worker, the default is a ``SqliteRegistry`` on a file all
of them share, and an explicit ``MemoryRegistry`` is refused at startup (``Gateway`` checks it).

How the worker count is found (first that says anything): ``PREQUAL_WORKERS`` (our console script sets
it), the server's command line (``--workers N``, ``-w N``; uvicorn's and gunicorn's spawned workers keep
their supervisor's ``sys.argv``), then ``WEB_CONCURRENCY`` (uvicorn's and gunicorn's default for it).

The shared file: ``PREQUAL_REGISTRY_PATH`` if set, else ``prequal-registry-<supervisor pid>.db`` in the
system's temporary directory, so the workers of one server share it and two servers on one host do not.
Name a path in production; its registrations outlive a restart of the server until their leases run out.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.registry.base import Registry
from prequal_middleware.registry.memory import MemoryRegistry
from prequal_middleware.registry.sqlite import SqliteRegistry

WORKER_FLAGS = ("--workers", "-w")


def worker_count(env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> int:
    """How many worker processes the server runs (1 when nothing says); ``ConfigurationError`` for a
    value that is not a positive integer, naming where it came from."""
    env = os.environ if env is None else env
    argv = sys.argv if argv is None else argv
    if env.get("PREQUAL_WORKERS", "").strip():
        return _count(env["PREQUAL_WORKERS"], "PREQUAL_WORKERS")
    for index, arg in enumerate(argv):
        for flag in WORKER_FLAGS:
            if arg == flag and index + 1 < len(argv):
                return _count(argv[index + 1], f"the command line's {flag}")
            if arg.startswith(flag + "=") or (flag == "-w" and arg.startswith("-w") and arg[2:].isdigit()):
                value = arg.split("=", 1)[1] if "=" in arg else arg[2:]
                return _count(value, f"the command line's {flag}")
    if env.get("WEB_CONCURRENCY", "").strip():
        return _count(env["WEB_CONCURRENCY"], "WEB_CONCURRENCY")
    return 1


def shared_registry_path(env: Mapping[str, str] | None = None) -> Path:
    """The SQLite file the workers of this server share (see the module docstring)."""
    env = os.environ if env is None else env
    named = env.get("PREQUAL_REGISTRY_PATH", "").strip()
    if named:
        return Path(named)
    # A spawned worker's parent is the server's supervisor: the same for every worker of one server.
    return Path(tempfile.gettempdir()) / f"prequal-registry-{os.getppid()}.db"


def default_registry(env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> Registry:
    """A ``MemoryRegistry`` for one worker, a ``SqliteRegistry`` every worker shares for several."""
    if worker_count(env, argv) > 1:
        return SqliteRegistry(shared_registry_path(env))
    return MemoryRegistry()


def check_registry_fits_workers(
    registry: Registry, env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> None:
    """Refuse a registry of one process when the server runs several workers."""
    workers = worker_count(env, argv)
    if workers > 1 and isinstance(registry, MemoryRegistry):
        raise ConfigurationError(
            f"registry: a MemoryRegistry lives in one process, but the server runs {workers} workers, so a"
            " registration would reach one of them; use SqliteRegistry (one host; the default when no"
            " registry is given), RedisRegistry (several hosts), or PREQUAL_REGISTRY=sqlite:PATH / redis://..."
        )


def _count(value: str, where: str) -> int:
    text = value.strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigurationError(f"{where} must be a whole number of workers >= 1, got {value!r}")
    return int(text)

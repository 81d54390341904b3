"""Who exists: the ``Registry`` protocol, ``MemoryRegistry`` (default), ``SqliteRegistry`` (the workers of one
host) and ``RedisRegistry`` (several hosts; extra ``redis``).

``RedisRegistry`` is imported on first use, so this package imports without redis installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prequal_middleware.exceptions import RegistryUnavailable
from prequal_middleware.registry.base import BackendRecord, Registry, RegistrySnapshot
from prequal_middleware.registry.memory import MemoryRegistry
from prequal_middleware.registry.sqlite import SqliteRegistry

if TYPE_CHECKING:
    from prequal_middleware.registry.redis import RedisRegistry

__all__ = [
    "BackendRecord",
    "MemoryRegistry",
    "RedisRegistry",
    "Registry",
    "RegistrySnapshot",
    "RegistryUnavailable",
    "SqliteRegistry",
]


def __getattr__(name: str) -> Any:
    if name == "RedisRegistry":
        from prequal_middleware.registry.redis import RedisRegistry

        return RedisRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

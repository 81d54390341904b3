"""prequal-middleware: an ASGI API gateway and load balancer driven by Google's Prequal algorithm.

The names most users need are the first five; the rest come by group. ``RedisRegistry`` is imported
on first use, so the package imports without the ``redis`` extra. Test helpers (``MockTransport``,
``FakeClock``) live in ``prequal_middleware.testing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# --- first: the gateway and the backend half -----------------------------------------------------
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.backend.self_registration import SelfRegistration
from prequal_middleware.config import UpstreamPool
from prequal_middleware.gateway.gateway import Gateway
from prequal_middleware.gateway.middleware import PrequalMiddleware

# isort: split
# --- settings --------------------------------------------------------------------------------------
from prequal_middleware.config import (
    AccessLogSettings,
    AdminSettings,
    HealthSettings,
    ProbeSettings,
    RequestLimits,
    RetrySettings,
    Route,
    Timeouts,
    UpstreamTLS,
)
from prequal_middleware.core import HistorySettings, LoadTrackerSettings, OutlierSettings, PrequalSettings

# isort: split
# --- policies, and the types to write a policy or a hook --------------------------------------------
from prequal_middleware.core import (
    BasePolicy,
    LeastLatencyPolicy,
    LeastRequestPolicy,
    Member,
    Outcome,
    PeakEwmaPolicy,
    Policy,
    PrequalPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    Selection,
    create_policy,
)
from prequal_middleware.gateway.membership import RegistryHook
from prequal_middleware.transports.base import (
    PathRewriteHook,
    RequestHook,
    ResponseHook,
    UpstreamRequest,
    UpstreamResponse,
)

# isort: split
# --- registries: who exists ------------------------------------------------------------------------
from prequal_middleware.registry import BackendRecord, MemoryRegistry, Registry, SqliteRegistry

# isort: split
# --- transports: how requests reach a backend ------------------------------------------------------
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport
from prequal_middleware.transports.http1 import H1Transport
from prequal_middleware.transports.httpx import HttpxTransport

# isort: split
# --- observability and the backend's load ------------------------------------------------------------
from prequal_middleware.core import LoadTracker
from prequal_middleware.gateway.metrics import PrequalMetrics

# isort: split
# --- errors (the tree is drawn in prequal_middleware.exceptions) -------------------------------------
from prequal_middleware.exceptions import (
    ConfigurationError,
    PrequalError,
    RegistryUnavailable,
    RequestBodyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)

if TYPE_CHECKING:
    from prequal_middleware.registry.redis import RedisRegistry

__version__ = "0.1.0.dev0"

__all__ = [
    "AccessLogSettings",
    "AdminSettings",
    "AiohttpTransport",
    "BackendRecord",
    "BasePolicy",
    "ConfigurationError",
    "Gateway",
    "H1Transport",
    "HealthSettings",
    "HistorySettings",
    "HttpxTransport",
    "LeastLatencyPolicy",
    "LeastRequestPolicy",
    "LoadReportingMiddleware",
    "LoadTracker",
    "LoadTrackerSettings",
    "Member",
    "MemoryRegistry",
    "Outcome",
    "OutlierSettings",
    "PathRewriteHook",
    "PeakEwmaPolicy",
    "Policy",
    "PrequalError",
    "PrequalMetrics",
    "PrequalMiddleware",
    "PrequalPolicy",
    "PrequalSettings",
    "ProbeSettings",
    "RandomPolicy",
    "RedisRegistry",
    "Registry",
    "RegistryHook",
    "RegistryUnavailable",
    "RequestBodyError",
    "RequestHook",
    "RequestLimits",
    "ResponseHook",
    "RetrySettings",
    "RoundRobinPolicy",
    "Route",
    "Selection",
    "SelfRegistration",
    "SqliteRegistry",
    "Timeouts",
    "Transport",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTLS",
    "UpstreamTLSError",
    "UpstreamTimeout",
    "__version__",
    "create_policy",
]


def __getattr__(name: str) -> Any:
    # Lazily, so that ``import prequal_middleware`` needs no redis; the error names the extra if it is missing.
    if name == "RedisRegistry":
        from prequal_middleware.registry.redis import RedisRegistry

        return RedisRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""prequal-middleware: an ASGI API gateway and load balancer driven by Google's Prequal algorithm."""

from __future__ import annotations

from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.backend.self_registration import SelfRegistration
from prequal_middleware.config import (
    AdminSettings,
    HealthSettings,
    ProbeSettings,
    RequestLimits,
    RetrySettings,
    Timeouts,
    UpstreamPool,
)
from prequal_middleware.core import (
    BasePolicy,
    LeastLatencyPolicy,
    LeastRequestPolicy,
    LoadTracker,
    LoadTrackerSettings,
    Member,
    Outcome,
    OutlierSettings,
    PeakEwmaPolicy,
    Policy,
    PrequalPolicy,
    PrequalSettings,
    RandomPolicy,
    RoundRobinPolicy,
    Selection,
    create_policy,
)
from prequal_middleware.exceptions import (
    ConfigurationError,
    GatewayNotRunning,
    PrequalError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from prequal_middleware.gateway.gateway import Gateway
from prequal_middleware.gateway.metrics import PrequalMetrics
from prequal_middleware.gateway.middleware import PrequalMiddleware
from prequal_middleware.registry import BackendRecord, MemoryRegistry, Registry, RegistryUnavailable
from prequal_middleware.transports.aiohttp import AiohttpTransport
from prequal_middleware.transports.base import Transport, UpstreamRequest, UpstreamResponse
from prequal_middleware.transports.http1 import H1Transport
from prequal_middleware.transports.httpx import HttpxTransport

__version__ = "0.1.0.dev0"

__all__ = [
    "AdminSettings",
    "AiohttpTransport",
    "BackendRecord",
    "BasePolicy",
    "ConfigurationError",
    "Gateway",
    "GatewayNotRunning",
    "H1Transport",
    "HealthSettings",
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
    "PeakEwmaPolicy",
    "Policy",
    "PrequalError",
    "PrequalMetrics",
    "PrequalMiddleware",
    "PrequalPolicy",
    "PrequalSettings",
    "ProbeSettings",
    "RandomPolicy",
    "Registry",
    "RegistryUnavailable",
    "RequestLimits",
    "RetrySettings",
    "RoundRobinPolicy",
    "Selection",
    "SelfRegistration",
    "Timeouts",
    "Transport",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "__version__",
    "create_policy",
]

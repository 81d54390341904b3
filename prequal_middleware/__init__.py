"""prequal-middleware: an ASGI API gateway and load balancer driven by Google's Prequal algorithm."""

from __future__ import annotations

from .backend import LoadReportingMiddleware
from .config import (
    AdminSettings,
    HealthSettings,
    ProbeSettings,
    RequestLimits,
    RetrySettings,
    Timeouts,
    UpstreamPool,
)
from .core import (
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
from .exceptions import (
    ConfigurationError,
    GatewayNotRunning,
    PrequalError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .gateway import Gateway
from .metrics import PrequalMetrics
from .middleware import PrequalMiddleware
from .registry import BackendRecord, MemoryRegistry, Registry, RegistryUnavailable
from .self_registration import SelfRegistration
from .transport import Transport, UpstreamRequest, UpstreamResponse
from .transport_aiohttp import AiohttpTransport
from .transport_h1 import H1Transport
from .transport_httpx import HttpxTransport

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

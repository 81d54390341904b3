"""prequal-middleware: an ASGI API gateway and load balancer driven by Google's Prequal algorithm."""

from __future__ import annotations

from .backend import LoadReportingMiddleware
from .config import HealthSettings, ProbeSettings, RetrySettings, Timeouts, UpstreamPool
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
from .middleware import PrequalMiddleware
from .transport import Transport, UpstreamRequest, UpstreamResponse
from .transport_aiohttp import AiohttpTransport
from .transport_httpx import HttpxTransport

__version__ = "0.1.0.dev0"

__all__ = [
    "AiohttpTransport",
    "BasePolicy",
    "ConfigurationError",
    "Gateway",
    "GatewayNotRunning",
    "HealthSettings",
    "HttpxTransport",
    "LeastLatencyPolicy",
    "LeastRequestPolicy",
    "LoadReportingMiddleware",
    "LoadTracker",
    "LoadTrackerSettings",
    "Member",
    "Outcome",
    "OutlierSettings",
    "PeakEwmaPolicy",
    "Policy",
    "PrequalError",
    "PrequalMiddleware",
    "PrequalPolicy",
    "PrequalSettings",
    "ProbeSettings",
    "RandomPolicy",
    "RetrySettings",
    "RoundRobinPolicy",
    "Selection",
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

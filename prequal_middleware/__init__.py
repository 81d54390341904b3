"""prequal-middleware: an ASGI API gateway and load balancer driven by Google's Prequal algorithm."""

from __future__ import annotations

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

__version__ = "0.1.0.dev0"

__all__ = [
    "BasePolicy",
    "LeastLatencyPolicy",
    "LeastRequestPolicy",
    "LoadTracker",
    "LoadTrackerSettings",
    "Member",
    "Outcome",
    "OutlierSettings",
    "PeakEwmaPolicy",
    "Policy",
    "PrequalPolicy",
    "PrequalSettings",
    "RandomPolicy",
    "RoundRobinPolicy",
    "Selection",
    "__version__",
    "create_policy",
]

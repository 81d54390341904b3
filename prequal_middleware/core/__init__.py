"""The sans-IO core of prequal-middleware: standard library only.

Every operation takes ``now`` (monotonic seconds) and draws randomness from an injected
``random.Random``; nothing here awaits, reads a clock or touches the global RNG, so every rule is
testable with a fake clock and a seeded RNG, and the simulator drives the very same objects.
"""

from __future__ import annotations

from prequal_middleware.core.history import HistorySettings, TrafficHistory
from prequal_middleware.core.load_tracker import LoadTracker, LoadTrackerSettings, RequestTicket
from prequal_middleware.core.outliers import OutlierDetector
from prequal_middleware.core.policies import (
    POLICY_CLASSES,
    LeastLatencyPolicy,
    LeastRequestPolicy,
    PeakEwmaPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    create_policy,
)
from prequal_middleware.core.policy import BasePolicy
from prequal_middleware.core.policy_protocol import Policy
from prequal_middleware.core.prequal import PrequalPolicy
from prequal_middleware.core.probe_pool import FractionalRate, ProbeEntry, ProbePool, RifHistory, reuse_budget
from prequal_middleware.core.settings import OutlierSettings, PrequalSettings
from prequal_middleware.core.types import (
    BackendId,
    BackendSnapshot,
    BackendState,
    Member,
    Outcome,
    PolicySnapshot,
    ProbeMode,
    Selection,
    SelectionReason,
)

__all__ = [
    "POLICY_CLASSES",
    "BackendId",
    "BackendSnapshot",
    "BackendState",
    "BasePolicy",
    "FractionalRate",
    "HistorySettings",
    "LeastLatencyPolicy",
    "LeastRequestPolicy",
    "LoadTracker",
    "LoadTrackerSettings",
    "Member",
    "Outcome",
    "OutlierDetector",
    "OutlierSettings",
    "PeakEwmaPolicy",
    "Policy",
    "PolicySnapshot",
    "PrequalPolicy",
    "PrequalSettings",
    "ProbeEntry",
    "ProbeMode",
    "ProbePool",
    "RandomPolicy",
    "RequestTicket",
    "RifHistory",
    "RoundRobinPolicy",
    "Selection",
    "SelectionReason",
    "TrafficHistory",
    "create_policy",
    "reuse_budget",
]

"""The admin API's answers as pydantic models: the status model (``GET /backends``), write answers, errors.

``status.describe`` builds ``GatewayStatus``; the routes send ``model_dump()`` of these models, and
``admin_router()`` lists them in a FastAPI app's OpenAPI schema (with the request bodies of
``registry.schemas``). Admin time only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The request bodies, re-exported so the admin API's whole schema is importable from one place.
from prequal_middleware.core.types import BackendState, ProbeMode
from prequal_middleware.registry.schemas import HeartbeatBody, RegisterBody, UnregisterBody

__all__ = [
    "Error",
    "GatewayStatus",
    "Health",
    "HeartbeatBody",
    "MemberStatus",
    "PoolReadiness",
    "PoolStatus",
    "Readiness",
    "Record",
    "RegisterBody",
    "RegistryReadiness",
    "RegistryStatus",
    "UnregisterBody",
    "Unregistered",
]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Error(_Answer):
    """Every 4xx and 503 of the admin routes; ``field`` names the offending field or header, when there is one."""

    error: str = Field(description="a code: invalid_field, unknown_field, unauthorized, forbidden, ...")
    detail: str
    field: str | None = None


class Record(_Answer):
    """A registration as stored: ``POST /register`` (201) and ``POST /heartbeat`` (200) answer with it."""

    pool: str
    url: str
    weight: int | float
    metadata: dict[str, Any]
    lease_expires_at: float | None = Field(description="wall-clock seconds since the epoch; null: no lease")
    ttl_s: float | None = Field(description="seconds left on the lease")


class Unregistered(_Answer):
    """``POST /unregister``: the backend is out and drains."""

    pool: str
    url: str
    unregistered: bool
    draining: bool


class Health(_Answer):
    """``GET /healthz``."""

    status: Literal["ok", "stopped"]


class PoolReadiness(_Answer):
    """One pool's part in readiness (``UpstreamPool.required_for_ready``)."""

    required: bool
    why: str
    ready: bool
    members: int
    healthy: int


class RegistryReadiness(_Answer):
    stale_for_s: float | None
    ready_while_stale_s: float


class Readiness(_Answer):
    """``GET /readyz``: 200 ``ready``, or 503 ``not_ready`` with the reasons; each pool's part."""

    status: Literal["ready", "not_ready"]
    problems: list[str]
    pools: dict[str, PoolReadiness]
    registry: RegistryReadiness


class MemberStatus(_Answer):
    """One member as the first policy client of its pool sees it."""

    url: str
    state: BackendState
    probe_mode: ProbeMode
    weight: int | float  # as the registry holds it: an int stays one in the JSON
    rif: int | None = Field(description="the last reported requests in flight")
    latency_ms: float | None
    in_flight: int
    lease_expires_in_s: float | None
    ejected_for_s: float | None
    consecutive_failures: int
    failure_rate: float
    source: Literal["registered", "static"]
    metadata: dict[str, Any]


class PoolStatus(_Answer):
    """One pool: its policy's state, members counted by state, and a page of members."""

    name: str
    prefix: str | None
    routes: list[str]
    policy: str
    in_flight: int
    clients: int
    pool_size: int | None = Field(description="probes pooled (Prequal only), over every client")
    pool_capacity: int | None
    rif_threshold: int | float | None
    panic: bool
    selections: dict[str, int]
    probes_in_flight: int
    probes_skipped: int
    member_count: int
    member_states: dict[str, int]
    members_offset: int
    members: list[MemberStatus]
    history: dict[str, Any] | None = Field(
        description="the last minutes for the page's charts (rps, p99, backends' shares); null until sampled"
    )


class RegistryStatus(_Answer):
    kind: str
    version: int
    stale: bool
    stale_for_s: float | None


class GatewayStatus(_Answer):
    """``GET /backends`` and the status page: the gateway's state."""

    state: str
    registry: RegistryStatus
    pools: list[PoolStatus]

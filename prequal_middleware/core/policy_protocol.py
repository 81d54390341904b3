"""``Policy``: what the gateway needs of a load-balancing policy (``BasePolicy`` implements it).

Kept apart from ``policy.py`` because that module is compiled with mypyc, which cannot compile a
runtime-checkable ``Protocol``; the gateway checks a user's policy against this one with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Protocol, runtime_checkable

from prequal_middleware.core.types import BackendId, Member, Outcome, PolicySnapshot, ProbeMode, Selection

_NOTHING: frozenset[BackendId] = frozenset()


@runtime_checkable
class Policy(Protocol):
    """What the gateway needs of a load-balancing policy. All methods are synchronous and cheap."""

    name: str

    def set_members(self, members: Iterable[Member], now: float) -> None:
        """Replace the member set. Members that left are forgotten; their requests in flight may still finish."""

    def upsert_member(self, member: Member, now: float) -> None:
        """Add one member, or update a present one's weight and draining; O(1), as one registration is."""

    def remove_member(self, backend: BackendId, now: float) -> None:
        """Forget one member (nothing if absent), as ``set_members`` forgets one that left; O(1)."""

    def set_health(self, backend: BackendId, healthy: bool, now: float) -> None:
        """Active health checking's verdict on a member."""

    def set_probe_mode(self, backend: BackendId, mode: ProbeMode, now: float) -> None:
        """``local`` when the backend does not answer probes, so the gateway's own view stands in."""

    def select(self, now: float, exclude: Container[BackendId] = _NOTHING) -> Selection | None:
        """Choose a backend for one request, never one in ``exclude``; ``None`` when none is eligible."""

    def on_start(self, backend: BackendId, now: float) -> None:
        """A request was sent to ``backend``."""

    def on_finish(self, backend: BackendId, now: float, latency_s: float, outcome: Outcome) -> None:
        """A request to ``backend`` ended after ``latency_s`` with ``outcome``."""

    def on_probe(self, backend: BackendId, now: float, rif: int, latency_s: float) -> None:
        """A probe answered: requests in flight and latency estimate, received at ``now``."""

    def on_probe_failure(self, backend: BackendId, now: float) -> None:
        """A probe failed or timed out."""

    @property
    def reads_reports(self) -> bool:
        """Whether ``on_report`` uses piggybacked reports (else the gateway does not parse them)."""

    def on_report(self, backend: BackendId, now: float, rif: int, latency_s: float) -> None:
        """A load report piggybacked on a response of ours, received at ``now`` (the request it answers left out)."""

    def idle_probes(self, now: float) -> Sequence[BackendId]:
        """Probes to send now even though no query asked for them (keeps an idle pool warm)."""

    def snapshot(self, now: float) -> PolicySnapshot:
        """The state for the status page and metrics."""

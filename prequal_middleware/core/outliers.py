"""Passive health: error aversion, consecutive-failure ejection with backoff, and panic mode.

A backend that fails fast looks idle (low latency, few requests in flight) and would attract ever
more traffic: the paper calls this sinkholing (Prequal, NSDI '24, section 4) and leaves its remedy
out. We combine what production balancers do (gateway-anchors.md section 2):

- a time-decayed failure rate per backend that load-aware policies use to make a failing backend
  look *worse*, never better (``penalty``);
- ejection after ``consecutive_failures`` failures in a row, for ``base_ejection_s`` doubling on each
  repeat up to ``max_ejection_s`` (Envoy's outlier detection, prequal-rs' health module); a backend
  back from an ejection is on probation until its first success, and one failure ejects it again;
- a *suspect* (its last outcome a failure, or on probation) takes one request at a time until one
  succeeds (``suspects``; the policy holds the trial, ``OutlierSettings.trial_timeout_s``). A fast
  failer looks idle, so without it every request started before its failure came back went to it too:
  a burst of failures at each return from an ejection (Finagle's failure accrual lets one request
  through in the same way);
- at most ``max_ejected_share`` of the members ejected at once: a further ejection is skipped;
- panic mode (Envoy's panic threshold): when fewer than ``panic_threshold`` of the members are
  healthy, route over all of them rather than overload the few that are left.

Sans-IO: every method takes ``now``.
"""

from __future__ import annotations

import math

from prequal_middleware.core.mypyc_compat import mypyc_attr
from prequal_middleware.core.settings import OutlierSettings
from prequal_middleware.core.types import BackendId


class _Health:
    __slots__ = ("consecutive", "ejections", "ejected_until", "last_ejection_s", "rate", "rate_at", "probation")

    def __init__(self) -> None:
        self.consecutive = 0
        self.probation = False  # back from an ejection, no success since: one failure ejects again
        self.ejections = 0  # the backoff exponent; decays while the backend behaves
        self.ejected_until = -math.inf
        self.last_ejection_s = 0.0
        self.rate = 0.0
        self.rate_at = 0.0


# Subclassable from plain Python where the core is compiled (tests count the questions it is asked).
@mypyc_attr(allow_interpreted_subclasses=True)
class OutlierDetector:
    """Failure bookkeeping for one pool's members."""

    def __init__(self, settings: OutlierSettings | None = None) -> None:
        self.settings = settings or OutlierSettings()
        self._health: dict[BackendId, _Health] = {}
        # The backends with a failure rate above 0 (every other one is never averse): lets a caller
        # skip asking about each member while none has failed (``may_be_averse``).
        self._rated: set[BackendId] = set()
        # The backends whose last outcome was a failure, or on probation: each takes one request at a
        # time (the policy's trials). Empty while nothing fails: the policy asks nothing more then.
        self.suspects: set[BackendId] = set()
        self.ejections_total = 0

    def add(self, backend: BackendId) -> None:
        self._health.setdefault(backend, _Health())

    def remove(self, backend: BackendId) -> None:
        self._health.pop(backend, None)
        self._rated.discard(backend)
        self.suspects.discard(backend)

    # --- outcomes ------------------------------------------------------------------------------

    def record_success(self, backend: BackendId, now: float) -> None:
        h = self._health.get(backend)
        if h is None or (h.rate == 0.0 and not h.ejections and not h.consecutive and not h.probation):
            return  # never failed (a rate of exactly 0 is only the initial one): nothing to update, every request
        h.consecutive = 0
        h.probation = False
        self.suspects.discard(backend)
        self._update_rate(h, 0.0, now)
        if h.rate == 0.0:
            self._rated.discard(backend)
        # Forgive one step of backoff once the backend has behaved for as long as it was last out.
        if h.ejections and now - h.ejected_until >= h.last_ejection_s:
            h.ejections -= 1
            h.ejected_until = now  # restart the clock for the next step

    def record_failure(self, backend: BackendId, now: float, members: int) -> bool:
        """Count a failure; returns True when it ejected the backend.

        ``members`` is the pool's member count, for the ejection cap.
        """
        h = self._health.get(backend)
        if h is None:
            return False
        h.consecutive += 1
        self._update_rate(h, 1.0, now)
        self._rated.add(backend)
        self.suspects.add(backend)
        s = self.settings
        # On probation (back from an ejection with no success since) one failure is enough: its failure
        # rate faded while it was out, so a fast failer would otherwise be everyone's favourite again.
        threshold = 1 if h.probation else s.consecutive_failures
        if s.consecutive_failures == 0 or h.consecutive < threshold or h.ejected_until > now:
            return False
        if self.ejected_count(now) + 1 > s.max_ejected_share * members:
            return False  # the cap: keep serving from it rather than eject too many
        duration = min(s.max_ejection_s, s.base_ejection_s * 2.0**h.ejections)
        h.ejected_until = now + duration
        h.last_ejection_s = duration
        h.ejections += 1
        h.consecutive = 0
        h.probation = True
        self.ejections_total += 1
        return True

    def _update_rate(self, h: _Health, x: float, now: float) -> None:
        rate = self._decayed_rate(h, now)
        h.rate = rate + self.settings.failure_weight * (x - rate)
        h.rate_at = now

    def _decayed_rate(self, h: _Health, now: float) -> float:
        if h.rate == 0.0:
            return 0.0
        return h.rate * math.exp(-max(0.0, now - h.rate_at) / self.settings.failure_decay_s)

    # --- queries -------------------------------------------------------------------------------

    def is_ejected(self, backend: BackendId, now: float) -> bool:
        h = self._health.get(backend)
        return h is not None and h.ejected_until > now

    def ejected_until(self, backend: BackendId, now: float) -> float | None:
        h = self._health.get(backend)
        return h.ejected_until if h is not None and h.ejected_until > now else None

    def ejected_count(self, now: float) -> int:
        return sum(1 for h in self._health.values() if h.ejected_until > now)

    def next_return(self, now: float) -> float:
        """When the next ejected backend comes back (``inf`` if none is ejected)."""
        return min((h.ejected_until for h in self._health.values() if h.ejected_until > now), default=math.inf)

    def consecutive_failures(self, backend: BackendId) -> int:
        h = self._health.get(backend)
        return h.consecutive if h is not None else 0

    def failure_rate(self, backend: BackendId, now: float) -> float:
        """The time-decayed share of recent outcomes that failed, in [0, 1]."""
        h = self._health.get(backend)
        return self._decayed_rate(h, now) if h is not None else 0.0

    def penalty(self, backend: BackendId, now: float) -> float:
        """A cost multiplier >= 1 for load-aware policies: ``1 / (1 - failure_rate)``, at most 20."""
        return 1.0 / max(0.05, 1.0 - self.failure_rate(backend, now))

    def may_be_averse(self) -> bool:
        """False when no member has a failure rate above 0, so that ``is_averse`` is False for every one."""
        return bool(self._rated)

    def is_averse(self, backend: BackendId, now: float) -> bool:
        h = self._health.get(backend)
        if h is None or h.rate == 0.0:  # the common case, asked for every pooled probe: no call deeper
            return False
        return self._decayed_rate(h, now) > self.settings.averse_above

    def in_panic(self, healthy: int, members: int) -> bool:
        """True when too few members are healthy: ``healthy < panic_threshold * members``, or none is.

        With no healthy member at all, routing over every member beats a certain 503, so a
        ``panic_threshold`` of 0 still panics then.
        """
        return members > 0 and (healthy == 0 or healthy < self.settings.panic_threshold * members)

"""Event logs: what an operator wants to hear about once, on the ``prequal_middleware.events`` logger.

- WARNING: a backend ejected by outlier detection, a backend failing its health checks, a pool entering
  panic mode, an admin request refused (401, 403, 409, 413, 429);
- INFO: a backend back from ejection, healthy again, a pool leaving panic, a backend registered,
  registered again, unregistered, or gone because its lease ran out.

Each event names its pool and backend. Repeats of one event (same kind, pool and backend; or status and
client for refusals) are logged at most once per ``interval_s`` (``core.LogThrottle``); the next line
logged says how many were held back ("suppressed K similar"), so a flapping backend costs a line per
interval, not one per flap.

Ejections are seen where they happen (after the failed attempt that caused one); returns from ejection
and panic are time-driven inside the policies, so the scheduler's gauge loop looks each second
(``sample``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from prequal_middleware.core import PolicySnapshot
from prequal_middleware.core.log_throttle import LogThrottle
from prequal_middleware.gateway.access_log import escape

logger = logging.getLogger("prequal_middleware.events")

# The least time between two lines of one event.
EVENT_LOG_INTERVAL_S = 10.0


class GatewayEvents:
    """Logs a gateway's events, rate-limited per event.

    Parameters:
        clock: monotonic seconds.
        interval_s: the least time between two logged lines of one event.
    """

    def __init__(self, clock: Callable[[], float], interval_s: float = EVENT_LOG_INTERVAL_S) -> None:
        self.clock = clock
        self.throttle = LogThrottle(interval_s)
        self.logger = logger
        self._ejected: dict[tuple[str, str], float] = {}  # (pool, backend) -> ejected until
        self._panic: dict[str, bool] = {}

    def _log(self, level: int, key: Hashable, message: str, *args: Any) -> None:
        held = self.throttle.allow(key, self.clock())
        if held is None:
            return
        if held:
            message += " (suppressed %d similar)"
            args = (*args, held)
        self.logger.log(level, message, *args)

    # --- outliers, health, panic -----------------------------------------------------------------

    def after_failure(self, pool: str, policy: Any, backend: str, now: float) -> None:
        """A failed attempt on ``backend`` was reported to ``policy``: log the ejection it caused, if any."""
        outliers = getattr(policy, "outliers", None)
        ejected_until = getattr(outliers, "ejected_until", None)
        if ejected_until is None:
            return  # a policy of one's own without outlier detection
        until = ejected_until(backend, now)
        key = (pool, backend)
        if until is None or self._ejected.get(key) == until:
            return  # not ejected, or a late failure during an ejection already told
        self._ejected[key] = until
        self._log(
            logging.WARNING,
            ("ejected", pool, backend),
            "backend %s of pool %s ejected for %.1f s (outlier detection)",
            backend,
            pool,
            until - now,
        )

    def health(self, pool: str, backend: str, healthy: bool, checks: int) -> None:
        """Active health checking turned ``backend`` healthy or unhealthy after ``checks`` in a row."""
        if healthy:
            self._log(
                logging.INFO,
                ("healthy", pool, backend),
                "backend %s of pool %s healthy again: passed %d health checks",
                backend,
                pool,
                checks,
            )
        else:
            self._log(
                logging.WARNING,
                ("unhealthy", pool, backend),
                "backend %s of pool %s unhealthy: failed %d health checks",
                backend,
                pool,
                checks,
            )

    def sample(self, pool: str, snapshot: PolicySnapshot, now: float) -> None:
        """The pool's state now (its first client's snapshot): returns from ejection and panic changes."""
        members = {b.id: b.state for b in snapshot.backends}
        for key, until in list(self._ejected.items()):
            if key[0] != pool or until > now:
                continue
            del self._ejected[key]
            backend = key[1]
            if backend in members and members[backend] != "ejected":
                self._log(
                    logging.INFO,
                    ("returned", pool, backend),
                    "backend %s of pool %s back from ejection (one failure before a success ejects it again)",
                    backend,
                    pool,
                )
        was = self._panic.get(pool, False)
        if snapshot.panic != was:
            self._panic[pool] = snapshot.panic
            healthy = sum(1 for state in members.values() if state == "healthy")
            if snapshot.panic:
                self._log(
                    logging.WARNING,
                    ("panic", pool),
                    "pool %s in panic: %d of %d members healthy, routing over all of them",
                    pool,
                    healthy,
                    len(members),
                )
            else:
                self._log(
                    logging.INFO,
                    ("calm", pool),
                    "pool %s out of panic: %d of %d members healthy",
                    pool,
                    healthy,
                    len(members),
                )

    # --- membership ------------------------------------------------------------------------------

    def registered(self, pool: str, url: str, *, again: bool, ttl_s: float | None) -> None:
        lease = f"{ttl_s:g} s lease" if ttl_s is not None else "no lease"
        self._log(
            logging.INFO,
            ("registered", pool, url, again),
            "backend %s registered%s in pool %s (%s)",
            url,
            " again" if again else "",
            pool,
            lease,
        )

    def unregistered(self, pool: str, url: str, draining: int) -> None:
        self._log(
            logging.INFO,
            ("unregistered", pool, url),
            "backend %s unregistered from pool %s%s",
            url,
            pool,
            f" (draining {draining} requests in flight)" if draining else "",
        )

    def lease_expired(self, pool: str, url: str) -> None:
        self._log(
            logging.INFO,
            ("expired", pool, url),
            "backend %s left pool %s: its lease ran out (no heartbeat)",
            url,
            pool,
        )

    # --- admin -----------------------------------------------------------------------------------

    def admin_refused(self, status: int, error: str, method: str, path: str, client: str | None) -> None:
        """An admin request refused (401, 403, 409, 413, 429): once per status and client per interval."""
        who = escape(client or "-", 64, bare=True)
        self._log(
            logging.WARNING,
            ("admin", status, who),
            "admin %s %s refused with %d %s for client %s",
            escape(method, 16, bare=True),
            escape(path, 256),
            status,
            escape(error, 64, bare=True),
            who,
        )

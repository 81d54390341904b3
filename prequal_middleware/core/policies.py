"""The policies users would otherwise pick, for comparison with Prequal and as plain options.

- ``round_robin``: smooth weighted round robin (NGINX's algorithm), starting at a random member so
  that independent clients do not march in step;
- ``random``: weighted random;
- ``least_request``: power of two choices on this client's requests in flight, divided by weight
  (Envoy's default; Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", 2001);
- ``peak_ewma``: power of two choices on peak-EWMA latency x (in flight + 1) (Finagle, Linkerd);
- ``least_latency``: the lowest measured latency, unmeasured members first (the seed project's rule).

A failing backend must never look attractive: the load-aware policies multiply their cost by the
outlier detector's ``penalty`` (1 / (1 - recent failure rate)), and failures never feed the latency
estimates (a fast 500 would look like a fast backend).
"""

from __future__ import annotations

import math
import random
from collections.abc import Container, Sequence
from typing import Final

from prequal_middleware.core.mypyc_compat import mypyc_attr
from prequal_middleware.core.policy import BasePolicy, _Backend
from prequal_middleware.core.prequal import PrequalPolicy
from prequal_middleware.core.settings import OutlierSettings, PrequalSettings
from prequal_middleware.core.types import BackendId, Selection

# Linkerd's default RTT for a backend nothing has been measured on yet.
DEFAULT_RTT_S: Final = 0.030
# Finagle's and Linkerd's decay time for peak EWMA.
DEFAULT_DECAY_S: Final = 10.0
# least_latency: a never-measured backend whose failures have faded below this is tried again.
UNTRIED_BELOW_FAILURE_RATE: Final = 0.01


@mypyc_attr(allow_interpreted_subclasses=True)
class RoundRobinPolicy(BasePolicy):
    """Smooth weighted round robin over the eligible members."""

    name = "round_robin"

    def __init__(
        self, *, rng: random.Random | None = None, outliers: OutlierSettings | None = None, slow_start_s: float = 0.0
    ) -> None:
        super().__init__(rng=rng, outliers=outliers, slow_start_s=slow_start_s)
        self._next = self.rng.randrange(1 << 16)
        self._current: dict[BackendId, float] = {}

    def _choose(self, candidates: Sequence[BackendId], now: float, exclude: Container[BackendId]) -> Selection:
        if self._uniform_weights:
            self._next += 1
            return self._selection(candidates[self._next % len(candidates)], "policy")
        # NGINX's smooth WRR: everyone gains its weight, the leader pays the total.
        current, backends = self._current, self._backends
        total = 0.0
        best: BackendId = candidates[0]
        best_value = -math.inf
        for c in candidates:
            weight = backends[c].weight
            value = current.get(c, 0.0) + weight
            current[c] = value
            total += weight
            if value > best_value:
                best, best_value = c, value
        current[best] -= total
        return self._selection(best, "policy")

    def _forget(self, backend: BackendId) -> None:
        self._current.pop(backend, None)


@mypyc_attr(allow_interpreted_subclasses=True)
class RandomPolicy(BasePolicy):
    """A random eligible member, in proportion to weight."""

    name = "random"

    def _choose(self, candidates: Sequence[BackendId], now: float, exclude: Container[BackendId]) -> Selection:
        return self._selection(self._weighted_choice(candidates), "policy")


@mypyc_attr(allow_interpreted_subclasses=True)
class _PowerOfTwoChoices(BasePolicy):
    """Two distinct random candidates; the one with the lower ``_cost`` wins."""

    def _choose(self, candidates: Sequence[BackendId], now: float, exclude: Container[BackendId]) -> Selection:
        n = len(candidates)
        if n == 1:
            return self._selection(candidates[0], "policy")
        i = int(self.rng.random() * n)
        j = int(self.rng.random() * (n - 1))
        if j >= i:
            j += 1  # distinct from i, uniform over the rest
        a, b = self._backends[candidates[i]], self._backends[candidates[j]]
        return self._selection((b if self._cost(b, now) < self._cost(a, now) else a).id, "policy")

    def _cost(self, b: _Backend, now: float) -> float:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastRequestPolicy(_PowerOfTwoChoices):
    """Power of two choices on requests in flight from this client, divided by weight."""

    name = "least_request"

    def _cost(self, b: _Backend, now: float) -> float:
        return (b.in_flight + 1) / b.weight * self.outliers.penalty(b.id, now)


@mypyc_attr(allow_interpreted_subclasses=True)
class PeakEwmaPolicy(_PowerOfTwoChoices):
    """Power of two choices on peak-EWMA latency x (requests in flight + 1), divided by weight.

    The estimate jumps up to any slower observation at once and decays towards faster ones with time
    constant ``decay_s``; it also decays towards zero while nothing is observed, so a backend that
    was slow once is tried again.

    Parameters:
        default_rtt_s: the estimate for a backend with no observation yet.
        decay_s: the EWMA's time constant.
    """

    name = "peak_ewma"

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        outliers: OutlierSettings | None = None,
        slow_start_s: float = 0.0,
        default_rtt_s: float = DEFAULT_RTT_S,
        decay_s: float = DEFAULT_DECAY_S,
    ) -> None:
        if not 0 < default_rtt_s < math.inf:
            raise ValueError(f"default_rtt_s must be a finite number > 0, got {default_rtt_s!r}")
        if not 0 < decay_s < math.inf:
            raise ValueError(f"decay_s must be a finite number > 0, got {decay_s!r}")
        super().__init__(rng=rng, outliers=outliers, slow_start_s=slow_start_s)
        self.default_rtt_s = default_rtt_s
        self.decay_s = decay_s
        self._ewma: dict[BackendId, tuple[float, float]] = {}  # backend -> (estimate_s, stamp)

    def estimate(self, backend: BackendId, now: float) -> float:
        """The current peak-EWMA latency estimate in seconds."""
        value = self._ewma.get(backend)
        if value is None:
            return self.default_rtt_s
        estimate, stamp = value
        return estimate * math.exp(-max(0.0, now - stamp) / self.decay_s)

    def _cost(self, b: _Backend, now: float) -> float:
        return self.estimate(b.id, now) * (b.in_flight + 1) / b.weight * self.outliers.penalty(b.id, now)

    def _on_success(self, b: _Backend, now: float, latency_s: float) -> None:
        value = self._ewma.get(b.id)
        if value is None:
            self._ewma[b.id] = (latency_s, now)
            return
        estimate, stamp = value
        w = math.exp(-max(0.0, now - stamp) / self.decay_s)
        decayed = estimate * w
        self._ewma[b.id] = (latency_s if latency_s > decayed else decayed + latency_s * (1.0 - w), now)

    def _load_of(self, b: _Backend, now: float) -> tuple[int | None, float | None]:
        return b.in_flight, self.estimate(b.id, now)

    def _forget(self, backend: BackendId) -> None:
        self._ewma.pop(backend, None)


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastLatencyPolicy(BasePolicy):
    """The member with the lowest EWMA of measured latency; members not yet measured go first.

    This is the seed project's rule, kept for comparison: with no regard for requests in flight it
    herds onto whichever member looked fastest last. A member that has only ever failed goes last.
    """

    name = "least_latency"

    def _choose(self, candidates: Sequence[BackendId], now: float, exclude: Container[BackendId]) -> Selection:
        best: BackendId = candidates[0]
        best_cost = math.inf
        ties = 0
        for c in candidates:
            b = self._backends[c]
            if b.latency_s is not None:
                cost = b.latency_s * self.outliers.penalty(c, now)
            else:  # untried goes first; failed and never succeeded goes last until its failures fade
                cost = -1.0 if self.outliers.failure_rate(c, now) < UNTRIED_BELOW_FAILURE_RATE else math.inf
            if cost < best_cost:
                best, best_cost, ties = c, cost, 1
            elif cost == best_cost:
                ties += 1
                if self.rng.random() * ties < 1.0:
                    best = c
        return self._selection(best, "policy")


# --- names -------------------------------------------------------------------------------------

POLICY_CLASSES: dict[str, type[BasePolicy]] = {
    "prequal": PrequalPolicy,
    "round_robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "least_request": LeastRequestPolicy,
    "peak_ewma": PeakEwmaPolicy,
    "least_latency": LeastLatencyPolicy,
}
"""The built-in policies by name; ``prequal`` is the default."""


def create_policy(
    name: str,
    *,
    rng: random.Random | None = None,
    outliers: OutlierSettings | None = None,
    prequal: PrequalSettings | None = None,
    slow_start_s: float = 0.0,
) -> BasePolicy:
    """A fresh built-in policy by name. ``prequal`` settings apply to the ``prequal`` policy only."""
    if name == "prequal":
        return PrequalPolicy(prequal, rng=rng, outliers=outliers, slow_start_s=slow_start_s)
    cls = POLICY_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"policy must be one of {', '.join(sorted(POLICY_CLASSES))}, got {name!r}")
    return cls(rng=rng, outliers=outliers, slow_start_s=slow_start_s)

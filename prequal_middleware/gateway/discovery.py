"""``Discovery``: keeps the members of upstreams named by DNS in step with DNS (``registry.dns``).

Each configured upstream whose host is a DNS name (``DnsSettings.enabled``) is looked up at startup
(all at once, before the gateway serves) and again when its answer's TTL runs out (clamped to
``min_refresh_s``..``max_refresh_s``, Envoy's ``respect_dns_ttl``). A failed lookup keeps the members
the name had (fail-static, as nginx and Envoy do) and is retried after ``failure_retry_s`` (Envoy's
``dns_failure_refresh_rate``); a name that no longer exists, or has no address, empties its share of the
pool, since that is what DNS says. Members that leave while requests to them are in flight drain first
(``Membership``). The scheduler owns the loops (``ProbeScheduler.start``).
"""

from __future__ import annotations

import asyncio
import logging

from prequal_middleware.exceptions import DnsLookupFailed
from prequal_middleware.gateway.membership import Membership
from prequal_middleware.registry.dns import DnsResolver, DnsSettings, needs_resolving

logger = logging.getLogger("prequal_middleware.gateway.discovery")


class Discovery:
    """The DNS-named upstreams of every pool, and one resolver for all of them."""

    def __init__(self, membership: Membership, settings: DnsSettings) -> None:
        self.membership = membership
        self.settings = settings
        self.resolver = DnsResolver(settings)
        self.failing: set[tuple[str, str]] = set()  # (pool, upstream) whose last lookup failed
        self.lookups = 0
        self.failures = 0
        self._next: dict[tuple[str, str], float] = {}  # when each name is due again (seconds from its lookup)
        if settings.enabled:
            membership.resolves = needs_resolving

    def names(self) -> list[tuple[str, str]]:
        """(pool, upstream) for every configured upstream DNS expands."""
        if not self.settings.enabled:
            return []
        return [
            (name, url)
            for name, pool in self.membership.pools.items()
            for url in pool.config.upstreams
            if needs_resolving(url)
        ]

    async def resolve(self, pool: str, upstream: str) -> float:
        """Look ``upstream`` up once and apply the answer; the seconds until the next lookup."""
        members = await self.lookup(pool, upstream)
        if members is not None and self.membership.set_discovered(pool, upstream, members):
            logger.info("pool %s: %s is now %d members", pool, upstream, len(members))
        return self._next[(pool, upstream)]

    async def lookup(self, pool: str, upstream: str) -> tuple[str, ...] | None:
        """Look ``upstream`` up once without applying the answer (``Gateway.reconfigure`` applies it with
        the new pools): the members it stands for, or None when the lookup failed (logged, retried by
        its loop after ``failure_retry_s``)."""
        self.lookups += 1
        try:
            expansion = await self.resolver.expand(upstream)
        except DnsLookupFailed as exc:
            self.failures += 1
            if (pool, upstream) not in self.failing:
                logger.warning("pool %s: %s; keeping its %d members", pool, exc, self._count(pool, upstream))
                self.failing.add((pool, upstream))
            self._next[(pool, upstream)] = self.settings.failure_retry_s
            return None
        self._next[(pool, upstream)] = expansion.ttl_s
        if (pool, upstream) in self.failing:
            self.failing.discard((pool, upstream))
            logger.info("pool %s: %s resolves again", pool, upstream)
        return expansion.members

    async def resolve_all(self) -> None:
        """Every name once, concurrently (startup): within about ``timeout_s``."""
        await asyncio.gather(*(self.resolve(pool, upstream) for pool, upstream in self.names()))

    async def loop(self, pool: str, upstream: str) -> None:
        """Keep one name in step until cancelled (after ``resolve_all``: its first wait is the TTL it got)."""
        delay = self._next.get((pool, upstream), 0.0)
        while True:
            await asyncio.sleep(delay)
            try:
                delay = await self.resolve(pool, upstream)
            except Exception:  # applying the answer failed (a policy's bug): keep the loop, try again later
                logger.exception("pool %s: applying what %s resolves to failed", pool, upstream)
                delay = self.settings.failure_retry_s

    def _count(self, pool: str, upstream: str) -> int:
        return len(self.membership.discovered(pool, upstream))

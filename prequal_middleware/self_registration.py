"""``SelfRegistration``: a backend registers itself with a gateway and keeps its lease alive.

    registration = SelfRegistration(gateway_url="http://gw:8000/_prequal", url="http://10.0.0.5:8001")
    app = Starlette(routes=..., lifespan=registration.lifespan)
    # or around a lifespan you already have: lifespan=registration.wrap(my_lifespan)

At startup it registers (one quick attempt, then in the background so a gateway that is down never
blocks the backend's startup), then heartbeats every ``interval_s`` with jitter; a 404 means the
gateway forgot the backend (a restart, an expired lease), so it registers again; while the gateway
is unreachable it backs off exponentially. At shutdown it unregisters, so the gateway drains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx

logger = logging.getLogger("prequal_middleware.self_registration")

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
MAX_BACKOFF_S = 30.0
STARTUP_ATTEMPT_S = 2.0


class SelfRegistration:
    """Registration and heartbeats of one backend with one gateway.

    Parameters:
        gateway_url: the gateway's admin mount, e.g. ``http://gw:8000/_prequal``.
        url: this backend's URL as the gateway should call it (with an explicit port).
        pool: the pool's prefix; optional when the gateway has one pool.
        weight, metadata: sent with the registration.
        ttl_s: the lease; heartbeats come every ``interval_s`` (default a third of it).
        token: the gateway's registration token, if it has one.
        jitter: each wait is scaled by a random factor in [1 - jitter, 1 + jitter].
        client: an ``httpx.AsyncClient`` to use (you close it); by default one of its own.
    """

    def __init__(
        self,
        gateway_url: str,
        url: str,
        *,
        pool: str | None = None,
        weight: float = 1.0,
        metadata: Mapping[str, Any] | None = None,
        ttl_s: float = 30.0,
        interval_s: float | None = None,
        token: str | None = None,
        jitter: float = 0.2,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not gateway_url.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url must be an http(s) URL, got {gateway_url!r}")
        if not 0 < ttl_s:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self.gateway_url = gateway_url.rstrip("/")
        self.url = url
        self.pool = pool
        self.weight = weight
        self.metadata = dict(metadata or {})
        self.ttl_s = ttl_s
        self.interval_s = interval_s if interval_s is not None else ttl_s / 3
        self.jitter = jitter
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = client
        self._owns_client = client is None
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self.registered = False
        self.registrations = 0
        self.heartbeats = 0

    # --- lifespan ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Register for the lifetime of the app (a Starlette ``lifespan``)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def wrap(self, inner: Lifespan) -> Lifespan:
        """Your lifespan, with registration around it."""

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            async with inner(app) as state, self.lifespan(app):
                yield state

        return lifespan

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STARTUP_ATTEMPT_S):
                await self._register()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.registered:
            with contextlib.suppress(httpx.HTTPError, TimeoutError):
                async with asyncio.timeout(STARTUP_ATTEMPT_S):
                    await self._post("/unregister", {"url": self.url, **self._pool()})
            self.registered = False
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            await asyncio.sleep(self._jittered(self.interval_s if self.registered else backoff))
            try:
                if self.registered:
                    response = await self._post("/heartbeat", {"url": self.url, "ttl_s": self.ttl_s, **self._pool()})
                    if response.status_code == 404:
                        logger.info("the gateway forgot %s: registering again", self.url)
                        self.registered = False
                        await self._register()
                    elif response.status_code >= 400:
                        logger.warning("heartbeat refused: %s %s", response.status_code, response.text[:200])
                    else:
                        self.heartbeats += 1
                else:
                    await self._register()
                backoff = 1.0 if self.registered else min(MAX_BACKOFF_S, backoff * 2)
            except (httpx.HTTPError, OSError) as exc:
                # Still registered as far as we know: a gateway that comes back answers the next
                # heartbeat with 404 if it forgot us, and we register again then.
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                logger.warning("gateway %s unreachable (%s); retrying in about %.0f s", self.gateway_url, exc, backoff)

    async def _register(self) -> None:
        body = {"url": self.url, "weight": self.weight, "metadata": self.metadata, "ttl_s": self.ttl_s, **self._pool()}
        try:
            response = await self._post("/register", body)
        except (httpx.HTTPError, OSError) as exc:
            logger.warning("cannot register with %s yet: %s", self.gateway_url, exc)
            return
        if response.status_code == 201:
            self.registered = True
            self.registrations += 1
            logger.info("registered %s with %s", self.url, self.gateway_url)
        else:
            logger.error("registration refused: %s %s", response.status_code, response.text[:200])

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        assert self._client is not None
        return await self._client.post(self.gateway_url + path, json=body, headers=self._headers)

    def _pool(self) -> dict[str, str]:
        return {"pool": self.pool} if self.pool is not None else {}

    def _jittered(self, seconds: float) -> float:
        return seconds * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))

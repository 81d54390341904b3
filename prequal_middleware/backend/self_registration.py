"""``SelfRegistration``: a backend registers itself with a gateway and keeps its lease alive.

    registration = SelfRegistration(gateway_url="http://gw:8000/_prequal", url="http://10.0.0.5:8001")
    app = Starlette(routes=..., lifespan=registration.lifespan)
    # or around a lifespan you already have: lifespan=registration.wrap(my_lifespan)

At startup it registers (one quick attempt, then in the background so a gateway that is down never
blocks the backend's startup), then heartbeats every ``interval_s`` with jitter; a 404 means the
gateway forgot the backend (a restart, an expired lease), so it registers again; while the gateway
is unreachable it backs off exponentially. At shutdown it unregisters, so the gateway drains it.

A pre-stop drain: uvicorn, on SIGTERM, stops accepting and closes its idle keep-alive connections
*before* the lifespan shutdown runs, so a gateway that has just picked this backend may write a request
on a connection the backend is closing (a streamed upload too large to replay then fails). When the
process's SIGTERM handler is a Python one (uvicorn's, gunicorn's), ``SelfRegistration`` wraps it: the
first SIGTERM unregisters at once, keeps serving for ``drain_s`` while the gateways stop sending, and
only then hands the signal to the server. A second SIGTERM skips the wait. With a shared registry, make
``drain_s`` longer than the gateways' refresh interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import FrameType
from typing import Any

import httpx

logger = logging.getLogger("prequal_middleware.backend.self_registration")

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
MAX_BACKOFF_S = 30.0
STARTUP_ATTEMPT_S = 2.0


class SelfRegistration:
    """Registration and heartbeats of one backend with one gateway.

    Parameters:
        gateway_url: the gateway's admin mount, e.g. ``http://gw:8000/_prequal``.
        url: this backend's URL as the gateway should call it (with an explicit port).
        pool: the pool's name (a pool declared by prefix, ``UpstreamPool("/api")``, is named by it;
            one reached through ``Route`` objects by its ``name``, never a route's prefix); optional when
            the gateway has one pool.
        weight, metadata: sent with the registration.
        ttl_s: the lease; heartbeats come every ``interval_s`` (default a third of it).
        token: the gateway's registration token, if it has one.
        jitter: each wait is scaled by a random factor in [1 - jitter, 1 + jitter].
        client: an ``httpx.AsyncClient`` to use (you close it); by default one of its own.
        drain_s: on SIGTERM, unregister and keep serving this long before the server stops (0: off).
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
        drain_s: float = 1.0,
    ) -> None:
        if not gateway_url.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url must be an http(s) URL, got {gateway_url!r}")
        if not 0 < ttl_s:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        if not 0 <= drain_s:
            raise ValueError(f"drain_s must be >= 0, got {drain_s!r}")
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
        self.drain_s = drain_s
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._server_handler: Callable[[int, FrameType | None], Any] | None = None
        self._on_sigterm: Callable[[int, FrameType | None], None] | None = None
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
        self._wrap_sigterm()

    async def stop(self) -> None:
        self._unwrap_sigterm()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        await self.leave()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def leave(self) -> None:
        """Stop heartbeating and unregister now (the first step of a drain); ``stop`` still runs later."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.registered:
            with contextlib.suppress(httpx.HTTPError, OSError, TimeoutError):
                async with asyncio.timeout(STARTUP_ATTEMPT_S):
                    await self._post("/unregister", {"url": self.url, **self._pool()})
            self.registered = False

    # --- the pre-stop drain --------------------------------------------------------------------

    def _wrap_sigterm(self) -> None:
        # signal.signal works only in the main thread; a server that is not the process's (a test's
        # thread, an embedded server) keeps its own shutdown and we unregister at lifespan end as before.
        if self.drain_s <= 0 or threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if not callable(current):
            return  # SIG_DFL / SIG_IGN: nobody would shut the server down gracefully after the drain
        loop = asyncio.get_running_loop()
        self._server_handler = current

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self._drain is not None:  # a second SIGTERM: the operator is in a hurry
                current(signum, frame)
                return
            loop.call_soon_threadsafe(self._begin_drain, signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._on_sigterm = on_sigterm

    def _begin_drain(self, signum: int, frame: FrameType | None) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_stop(signum, frame))

    async def _drain_then_stop(self, signum: int, frame: FrameType | None) -> None:
        try:
            logger.info("SIGTERM: unregistering %s and serving for %.1f s before stopping", self.url, self.drain_s)
            await self.leave()
            await asyncio.sleep(self.drain_s)
        finally:
            handler = self._server_handler
            if handler is not None:
                handler(signum, frame)

    def _unwrap_sigterm(self) -> None:
        handler, self._server_handler = self._server_handler, None
        if handler is None or threading.current_thread() is not threading.main_thread():
            return
        if self._on_sigterm is not None and signal.getsignal(signal.SIGTERM) is self._on_sigterm:
            signal.signal(signal.SIGTERM, handler)

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

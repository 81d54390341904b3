"""Reloading ``prequal-gateway``'s pools and routes: on SIGHUP and when its configuration file changes.

``main`` records where the configuration came from (``remember``): the file, and which ``PREQUAL_*``
variables the file put into the environment. Each worker (``create_app``) reads the configuration the
same way (``ConfigSource.read``: the file as it is now, the environment as it was at start, the
environment winning) and runs a ``Reloader``: it looks at the file every ``POLL_S`` (its size, mtime and
a hash of its bytes, so an edit within one mtime tick is seen too) and listens for SIGHUP. A changed
configuration is validated in full, then applied by ``Gateway.reconfigure`` (no request dropped); an
invalid one is refused as a whole with one WARNING line naming the key, and the running configuration
stays. A reload applies the pools and routes; a change to any other setting is logged as needing a restart.

Under ``--workers N`` every worker watches the file and reloads itself. SIGHUP sent to a worker reloads
that worker; SIGHUP sent to uvicorn's supervisor (the main process) makes uvicorn replace the workers
one by one (uvicorn >= 0.30 starts each replacement and waits until it serves before stopping the old
one, which finishes its requests within ``timeout_graceful_shutdown``). The replacements read the file
as it is then; one that finds it invalid says so and serves the configuration validated at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.gateway.gateway import Gateway

logger = logging.getLogger("prequal_middleware.reload")

# How often the configuration file is looked at; PREQUAL_CONFIG_POLL_S changes it, 0 turns the watch off
# (reload on SIGHUP only: for tools that write the file in several steps).
POLL_S = 1.0
# Where ``main`` leaves, for the workers, the file and the variables that came from it (JSON). Not a
# PREQUAL_* name: it is not configuration.
STATE_VARIABLE = "_PREQUAL_GATEWAY_SOURCE"
# The variables a reload applies (they shape the pools and routes); a change to any other is logged.
POOL_VARIABLES = frozenset(
    {
        "PREQUAL_POOLS",
        "PREQUAL_POLICY",
        "PREQUAL_HEALTH_PATH",
        "PREQUAL_PROBE_PATH",
        "PREQUAL_PATH_REWRITE_HOOK",
        "PREQUAL_REQUEST_HOOK",
        "PREQUAL_RESPONSE_HOOK",
    }
)

Fingerprint = tuple[int, int, str] | None  # (mtime_ns, size, sha256) of the file; None: unreadable


def remember(config: Path | None, file_env: Mapping[str, str], environ: dict[str, str] | os._Environ[str]) -> None:
    """Record in ``environ`` (before ``main`` merges the file into it) where the configuration comes from."""
    state = {
        "config": str(config.resolve()) if config is not None else None,
        "file_keys": sorted(k for k in file_env if k not in environ),
    }
    environ[STATE_VARIABLE] = json.dumps(state)


def poll_interval(env: Mapping[str, str]) -> float:
    """How often the file is looked at (``PREQUAL_CONFIG_POLL_S``, ``[gateway] config_poll_s``); 0: never."""
    from prequal_middleware.config_schema import EnvSettings

    value = EnvSettings.read(env).config_poll_s  # validated there with the other variables
    return POLL_S if value is None else value


@dataclass(frozen=True)
class Read:
    """One reading of the configuration."""

    env: dict[str, str]
    server: dict[str, Any]
    fingerprint: Fingerprint


class ConfigSource:
    """The configuration file (if any) and the environment as it was when the gateway started."""

    def __init__(self, config: Path | None, base_env: Mapping[str, str]) -> None:
        self.config = config
        self.base_env = dict(base_env)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ConfigSource:
        """What ``remember`` recorded; without it (an app served by hand), the environment alone."""
        environ = os.environ if environ is None else environ
        raw = environ.get(STATE_VARIABLE)
        if not raw:
            return cls(None, environ)
        state = json.loads(raw)
        file_keys = set(state["file_keys"])
        base = {k: v for k, v in environ.items() if k not in file_keys and k != STATE_VARIABLE}
        return cls(Path(state["config"]) if state["config"] else None, base)

    def fingerprint(self) -> Fingerprint:
        if self.config is None:
            return None
        try:
            data = self.config.read_bytes()
            stat = self.config.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, hashlib.sha256(data).hexdigest())

    def read(self) -> Read:
        """The configuration now, validated as ``main`` validates it; ``ConfigurationError`` if it is not."""
        from prequal_middleware.cli import check, environ_from_file

        fingerprint = self.fingerprint()  # before reading: a change made meanwhile is seen at the next look
        file_env: dict[str, str] = {}
        server: dict[str, Any] = {}
        if self.config is not None:
            file_env, server = environ_from_file(self.config)
        env = {**file_env, **self.base_env}  # the environment overrides the file, as at start
        check(env)
        return Read(env, server, fingerprint)


class Reloader:
    """Applies a changed configuration to a running gateway (see the module docstring).

    Parameters:
        gateway: the gateway to reconfigure.
        source: where the configuration comes from.
        current: the configuration the gateway was built from.
        poll_s: how often the file is looked at.
    """

    def __init__(self, gateway: Gateway, source: ConfigSource, current: Read, *, poll_s: float = POLL_S) -> None:
        self.gateway = gateway
        self.source = source
        self.current = current
        self.poll_s = poll_s
        self.seen = current.fingerprint  # the file's last look, applied or refused: each edit is tried once
        self.reloads = 0
        self.refusals = 0
        self._signalled = asyncio.Event()

    def request(self) -> None:
        """Reload at once (the SIGHUP handler)."""
        self._signalled.set()

    async def run(self) -> None:
        """Watch the file and wait for SIGHUP until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s or None):
                    await self._signalled.wait()
            if self._signalled.is_set():
                self._signalled.clear()
                await self.reload("SIGHUP")
                continue
            if self.source.config is None or not self.poll_s:
                continue
            fingerprint = await asyncio.to_thread(self.source.fingerprint)
            if fingerprint != self.seen:
                await self.reload(f"{self.source.config} changed")

    async def reload(self, reason: str) -> bool:
        """Read, validate and apply the configuration; False (and one WARNING line) when it is refused."""
        try:
            read = await asyncio.to_thread(self.source.read)
            self.seen = read.fingerprint
            from prequal_middleware.envconfig import pools_and_routes_from_env

            pools, routes = pools_and_routes_from_env(read.env)
            done = await self.gateway.reconfigure(pools, routes)
        except ConfigurationError as exc:
            self.seen = await asyncio.to_thread(self.source.fingerprint)
            self.refusals += 1
            logger.warning("reload (%s) refused, the previous configuration keeps serving: %s", reason, exc)
            return False
        except Exception:  # a bug must not end the watch: the running configuration stays
            self.refusals += 1
            logger.exception("reload (%s) failed, the previous configuration keeps serving", reason)
            return False
        self.reloads += 1
        later = _needs_restart(self.current, read)
        if later:
            logger.warning("reload (%s): %s changed; that takes effect at the next restart", reason, ", ".join(later))
        self.current = read
        logger.info("reload (%s): %s", reason, done)
        return True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Watch and listen for SIGHUP while the app runs (its lifespan)."""
        loop = asyncio.get_running_loop()
        hangup = getattr(signal, "SIGHUP", None)
        listening = False
        if hangup is not None:
            try:
                loop.add_signal_handler(hangup, self.request)
                listening = True
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
                logger.debug("SIGHUP is not available here; the file is still watched")
        task = loop.create_task(self.run())
        try:
            yield
        finally:
            if listening and hangup is not None:
                loop.remove_signal_handler(hangup)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _needs_restart(old: Read, new: Read) -> list[str]:
    """The settings that changed but a reload does not apply."""
    keys = (old.env.keys() | new.env.keys()) - POOL_VARIABLES
    changed = sorted(k for k in keys if k.startswith("PREQUAL_") and old.env.get(k) != new.env.get(k))
    changed += sorted(
        f"[server].{k}" for k in old.server.keys() | new.server.keys() if old.server.get(k) != new.server.get(k)
    )
    return changed

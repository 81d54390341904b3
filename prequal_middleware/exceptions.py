"""Every error the library raises, in one hierarchy::

    PrequalError
    ├── ConfigurationError (also a ValueError)   a setting or environment variable is wrong
    ├── GatewayNotRunning                        a request arrived before startup or after shutdown
    ├── RegistryUnavailable                      the registry's store cannot be reached or written
    └── UpstreamError                            talking to a backend failed
        ├── UpstreamConnectError                 never reached it: refused, unreachable (nothing sent)
        ├── UpstreamTimeout                      connect, response headers or body read took too long
        └── UpstreamProtocolError                sent, then the connection broke or the reply was malformed

``UpstreamError.sent`` tells whether any byte of the request may have reached the backend: only
an error with ``sent`` false is safe to retry for every method.
"""

from __future__ import annotations

from typing import Literal

TimeoutPhase = Literal["connect", "headers", "body"]


class PrequalError(Exception):
    """Base class of the library's errors."""


class ConfigurationError(PrequalError, ValueError):
    """A setting is invalid; the message names it and says what was expected."""


class GatewayNotRunning(PrequalError):
    """The gateway has not been started (or was stopped)."""


class RegistryUnavailable(PrequalError):
    """The registry's store cannot be reached or written; the write was not applied."""


class UpstreamError(PrequalError):
    """Talking to a backend failed.

    Parameters:
        message: what happened, for logs (never sent to clients).
        sent: whether the request may have reached the backend.
    """

    sent: bool = True

    def __init__(self, message: str, *, sent: bool | None = None) -> None:
        super().__init__(message)
        if sent is not None:
            self.sent = sent


class UpstreamConnectError(UpstreamError):
    """The connection could not be made; nothing was sent."""

    sent = False


class UpstreamTimeout(UpstreamError):
    """A timeout: ``phase`` is ``connect`` (nothing sent), ``headers`` or ``body``."""

    def __init__(self, message: str, *, phase: TimeoutPhase) -> None:
        super().__init__(message, sent=phase != "connect")
        self.phase: TimeoutPhase = phase


class UpstreamProtocolError(UpstreamError):
    """The request was (perhaps partly) sent, then the exchange failed."""

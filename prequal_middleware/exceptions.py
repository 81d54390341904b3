"""Every error the library raises, in one hierarchy::

    PrequalError
    ├── ConfigurationError (also a ValueError)   a setting or environment variable is wrong
    ├── RegistryUnavailable                      the registry's store cannot be reached or written
    ├── DnsLookupFailed                          a DNS lookup got no answer: keep the members you had
    ├── RegistrationError                        an admin write was refused (a 4xx: status, error code, field)
    ├── TargetRefused (also a ValueError)        a request target the gateway does not route (a 400)
    ├── RequestBodyError                         the client's request body stopped: what a transport may
    │   │                                        see raised while it reads ``UpstreamRequest.body``
    │   ├── ClientDisconnected                   the client went away
    │   ├── RequestBodyTooLarge                  past ``RequestLimits.max_body_bytes`` (a 413)
    │   └── RequestBodyTimeout                   too slow for ``RequestLimits`` (a 408)
    ├── ProbeError                               a probe produced no load report
    │   ├── ProbeUnsupported                     the backend reports no load (no ``LoadReportingMiddleware``)
    │   └── ProbeFailed                          connect error, timeout, malformed answer or header
    └── UpstreamError                            talking to a backend failed
        ├── UpstreamConnectError                 never reached it: refused, unreachable (nothing sent)
        │   └── UpstreamTLSError                 the TLS handshake failed: certificate or name not trusted
        ├── UpstreamTimeout                      connect, response headers or body read took too long
        └── UpstreamProtocolError                sent, then the connection broke or the reply was malformed

``UpstreamError.sent`` tells whether any byte of the request may have reached the backend: only
an error with ``sent`` false is safe to retry for every method. A ``Transport`` raises only
``UpstreamError`` subclasses (and lets a ``RequestBodyError`` from the request body through); the
forwarder alone turns them into status codes, so none of them reaches a client as an exception.
"""

from __future__ import annotations

from typing import Any, Literal

TimeoutPhase = Literal["connect", "headers", "body"]


class PrequalError(Exception):
    """Base class of the library's errors."""


class ConfigurationError(PrequalError, ValueError):
    """A setting is invalid; the message names it and says what was expected."""


class RegistryUnavailable(PrequalError):
    """The registry's store cannot be reached or written; the write was not applied."""


class DnsLookupFailed(PrequalError):
    """A lookup got no answer (timeout, server failure, no reachable server): keep what you had."""


class RegistrationError(PrequalError):
    """A refused admin request: ``status`` (4xx), ``error`` (a code), ``field`` (or None) and ``detail``."""

    def __init__(
        self, status: int, error: str, detail: str, field: str | None = None, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error, "detail": self.detail}
        if self.field is not None:
            out["field"] = self.field
        return out


class TargetRefused(PrequalError, ValueError):
    """A request target the gateway does not route: ``error`` is the code, ``detail`` says why."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


# --- the client's request body -------------------------------------------------------------------


class RequestBodyError(PrequalError):
    """Reading the client's request body stopped; raised from ``UpstreamRequest.body`` into the transport."""


class ClientDisconnected(RequestBodyError):
    """The client went away (while its request body was being read)."""


class RequestBodyTooLarge(RequestBodyError):
    """The client's streamed body went past ``RequestLimits.max_body_bytes``."""


class RequestBodyTimeout(RequestBodyError):
    """The client's body did not arrive in time (``RequestLimits.body_timeout_s`` and ``body_min_rate_bytes_per_s``)."""


# --- probes --------------------------------------------------------------------------------------


class ProbeError(PrequalError):
    """A probe did not produce a load report."""


class ProbeUnsupported(ProbeError):
    """The backend answered 404, 405 or a 200 without ``x-prequal-rif``: it does not report its load."""


class ProbeFailed(ProbeError):
    """Connect error, timeout, malformed answer, unexpected status or an invalid load header."""


# --- upstream ------------------------------------------------------------------------------------


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


class UpstreamTLSError(UpstreamConnectError):
    """The TLS handshake failed (the backend's certificate is not trusted or does not name it, or it
    refused ours); nothing was sent. Usually a configuration matter (``UpstreamTLS``), so it is told apart."""


class UpstreamTimeout(UpstreamError):
    """A timeout: ``phase`` is ``connect`` (nothing sent), ``headers`` or ``body``."""

    def __init__(self, message: str, *, phase: TimeoutPhase) -> None:
        super().__init__(message, sent=phase != "connect")
        self.phase: TimeoutPhase = phase


class UpstreamProtocolError(UpstreamError):
    """The request was (perhaps partly) sent, then the exchange failed."""

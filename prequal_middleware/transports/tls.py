"""A pool's TLS context, built once from its ``UpstreamTLS`` and shared by everything that reaches its members.

The gateway builds one context per pool at startup (``PoolRuntime.ssl_context``) and hands that same
object to the forwarding transport (``UpstreamRequest.tls``, ``connect_websocket(tls=...)``), the probe
client and the health checks, so a pool cannot trust one CA for requests and another for probes.

``server_name`` is carried by the context itself (``UpstreamSSLContext``): every TLS connection is
started with ``SSLContext.wrap_bio`` (asyncio, uvloop and anyio alike), which presents and verifies that
name whatever host the transport asked for. Without it the transports pass the member's host (a
DNS-pinned member's name, never its address).
"""

from __future__ import annotations

import ssl
from os import PathLike
from typing import TYPE_CHECKING, Any

from prequal_middleware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from prequal_middleware.config import UpstreamTLS


class UpstreamSSLContext(ssl.SSLContext):
    """A client context that may name the server itself: ``server_name`` wins over the transport's host."""

    server_name: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        name = self.server_name if self.server_name is not None else server_hostname
        return super().wrap_bio(incoming, outgoing, server_side, name, session)

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.server_name is not None:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def client_context(settings: UpstreamTLS) -> UpstreamSSLContext:
    """A new client context from ``settings``; ``ConfigurationError`` naming the field a file failed in."""
    context = UpstreamSSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and name by default
    context.server_name = settings.server_name
    if settings.min_version is not None:
        context.minimum_version = ssl.TLSVersion[settings.min_version.replace(".", "_")]
    if not settings.verify:
        context.check_hostname = False  # must go first: a context that checks names needs CERT_REQUIRED
        context.verify_mode = ssl.CERT_NONE
    elif settings.ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        try:
            context.load_verify_locations(cafile=settings.ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigurationError(
                f"UpstreamTLS.ca_file: cannot load {settings.ca_file!r} as PEM CA certificates ({exc})"
            ) from None
    if settings.cert_file is not None:
        _load_client_certificate(context, settings)
    return context


def _load_client_certificate(context: ssl.SSLContext, settings: UpstreamTLS) -> None:
    cert, key = settings.cert_file, settings.key_file
    assert cert is not None

    def no_password() -> str:
        # Without a callback OpenSSL would ask for the passphrase on the terminal and the gateway would hang.
        field = "key_file" if key is not None else "cert_file"
        raise ConfigurationError(f"UpstreamTLS.{field}: the private key is encrypted; give an unencrypted key")

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ConfigurationError:
        raise
    except (ssl.SSLError, OSError, ValueError) as exc:
        # Blame the file that is wrong: the certificate file if no certificate loads from it, else the key.
        if not _holds_certificates(cert):
            what = f"cannot load {cert!r} as a PEM certificate"
            raise ConfigurationError(f"UpstreamTLS.cert_file: {what} ({exc})") from None
        if key is None:
            what = f"no private key matching the certificate in {cert!r} (set key_file)"
            raise ConfigurationError(f"UpstreamTLS.cert_file: {what} ({exc})") from None
        what = f"cannot load {key!r} as the PEM private key of {cert!r}"
        raise ConfigurationError(f"UpstreamTLS.key_file: {what} ({exc})") from None


def _holds_certificates(path: str | PathLike[str]) -> bool:
    """Whether ``path`` is a PEM file of certificates (any, CA or not: all a trust store asks)."""
    try:
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError):
        return False
    return bool(probe.cert_store_stats()["x509"])

"""Which request targets reach a pool, and how their path is matched against the pools' prefixes.

The gateway is the front door, so it decides this once, for every protocol the server speaks
(httptools, h11, WebSocket), before anything is routed:

- **Origin-form only.** A target must be a path that starts with ``/`` (RFC 9112, section 3.2.1), with
  no ``#`` anywhere.
  ``*``, authority-form (``host:443``), ``@host:port/...`` and any other shape are refused with 400:
  joined to a backend's URL they would name another host (``http://10.0.0.5:8000`` + ``@evil/``
  is a request to ``evil``). uvicorn's httptools protocol already reduces an absolute-form target
  (``http://host/path``) to its path; h11 hands it over as it came, and it is refused.
- **No dot segments.** A path with a ``.`` or ``..`` segment, however it is spelt (``%2e``, ``%2E``,
  ``..%2F``, a backslash as separator), is refused with 400 rather than normalised: browsers and
  HTTP libraries never send one, and refusing means a path can never climb out of a pool's prefix or
  a backend's base path, whatever the backend's own decoding does. The check reads the decoded path
  the server hands us (one level of percent-decoding, which is what HTTP defines); a backend that
  decodes twice (``%252e``) is on its own.
- **Prefixes match the raw path, byte for byte.** ``/api`` matches the raw target ``/api`` and
  ``/api/...`` only; ``/%61pi/...`` does not match (it goes to the wrapped app), so the bytes a pool
  strips are exactly the bytes it matched and what goes upstream is the rest of what the client
  sent, unchanged (Envoy's rule; nginx normalises instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from prequal_middleware.exceptions import TargetRefused

# Characters a client may send unencoded in a path (RFC 3986 pchar and "/"); everything else is
# percent-encoded when a raw path has to be rebuilt from a decoded one.
SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"


NOT_ORIGIN_FORM = TargetRefused(
    "invalid_request_target", "the request target must be a path starting with '/' (origin-form), without '#'"
)
DOT_SEGMENT = TargetRefused("invalid_path", "the path must not contain '.' or '..' segments, in any spelling")


def raw_prefix(prefix: str) -> bytes:
    """A pool prefix as a client sends it on the wire (``/api`` -> ``b"/api"``)."""
    return quote(prefix, safe=SAFE_PATH_CHARS).encode("ascii")


def raw_path(scope: Mapping[str, Any]) -> bytes:
    """The path as the client sent it: ``raw_path`` when the server gives it, else re-encoded."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw
    path: str = scope["path"]
    return quote(path, safe=SAFE_PATH_CHARS).encode("ascii")


def check_target(raw: bytes, path: str, query: bytes = b"") -> None:
    """Raise ``TargetRefused`` unless ``raw`` is origin-form and ``path`` (decoded) has no dot segment.

    A ``#`` is refused too: a fragment is never part of a request target (RFC 9112 section 3.2), h11
    passes it through, and one transport would send it while another cut the path there (``/api/.#``
    would reach a backend as the dot segment ``/.``).
    """
    if raw[:1] != b"/" or b"#" in raw or b"#" in query:
        raise NOT_ORIGIN_FORM
    # Every path starts with "/", so a dot segment needs "/." or "\\." (a file name's dot needs neither).
    if ("/." in path or "\\." in path) and has_dot_segment(path):
        raise DOT_SEGMENT


def has_dot_segment(path: str) -> bool:
    """True when a ``/``- or ``\\``-separated segment of ``path`` is ``.`` or ``..``."""
    for segment in path.replace("\\", "/").split("/"):
        if segment == "." or segment == "..":
            return True
    return False


def under_prefix(raw: bytes, prefix: bytes) -> bool:
    """True when ``raw`` is ``prefix`` or continues it with ``/`` (``/`` matches every origin-form path)."""
    if prefix == b"/":
        return True
    return raw.startswith(prefix) and (len(raw) == len(prefix) or raw[len(prefix)] == 0x2F)

"""Request ids (``X-Request-ID`` by default): kept when the client sent a sound one, else made here.

The id goes upstream on every attempt (HTTP and WebSocket), back to the client on the response (a
gateway-made error included) and into the access log. A client's id is kept when it is one header of
1 to 128 visible ASCII characters; anything else (control characters, spaces, too long, two of them) is
replaced, as it would end up in logs and in the backends' headers.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from typing import Any

_VALID = re.compile(rb"[\x21-\x7e]{1,128}").fullmatch

RawHeaders = list[tuple[bytes, bytes]]
_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})  # the messages that carry headers


# The ids' generator: seeded from os.urandom, and again in a forked child (a pre-forked worker would
# otherwise repeat its parent's ids). Ids need to be unique, not secret: a client may send its own,
# which is kept. Half the cost of os.urandom per id (a system call each).
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """A fresh id: 128 random bits in hex (as unique as a uuid4, without building one)."""
    return f"{_ids.getrandbits(128):032x}"


def request_id_of(headers: RawHeaders, name: bytes) -> str:
    """The client's id under ``name`` (lower case) when it sent exactly one sound one, else a new id."""
    found: bytes | None = None
    for key, value in headers:
        if key == name:
            if found is not None:
                return new_request_id()  # two ids: which one would the backend log?
            found = value
    if found is not None and _VALID(found):
        return found.decode("ascii")
    return new_request_id()


def set_request_id(headers: RawHeaders, name: bytes, request_id: str) -> None:
    """Make ``request_id`` the one ``name`` header of ``headers`` (a list we own, changed in place)."""
    headers[:] = [(k, v) for k, v in headers if k != name]
    headers.append((name, request_id.encode("ascii")))


def with_request_id(send: Callable[[dict[str, Any]], Any], name: bytes, request_id: str) -> Callable[..., Any]:
    """``send`` that puts the id on the response's start (replacing a backend's own); returns ``send``'s
    awaitable itself, so the request path gets no extra await."""
    value = request_id.encode("ascii")

    def sending(message: dict[str, Any]) -> Any:
        if message["type"] in _STARTS:
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != name]
            headers.append((name, value))
            message["headers"] = headers
        return send(message)

    return sending

"""``H1Connection``: one keep-alive HTTP/1.1 client connection, parsed with ``httptools``.

The wire half of our one HTTP/1.1 engine (``h1_pool`` is the other half: origins, connection slots,
idle stacks, the sweep). Both the forwarding transport (``http1.H1Transport``) and the probe client
(``probe.ProbeClient``) subclass it; what they share is decided here, once:

- Framing: ``Content-Length`` or chunked framing makes a connection reusable; an unframed body runs to
  the end of the connection (``read_unframed``), or, for a caller that wants only the head, ends the
  answer at its head and the connection after it.
- Interim answers: only 100 and 103 are accepted; any other 1xx (101 without an upgrade asked for
  included) or a status above 599 fails the exchange.
- Bounds: the head (status lines and fields, interim answers included) is at most ``max_head_bytes``,
  counted exactly and also read by read while it is incomplete (a field without end is never buffered);
  each field at most ``max_header_bytes`` and ``max_headers`` per section; bytes since the last body
  bytes (chunk framing, trailers) at most ``max_head_bytes``; the body at most ``max_body_bytes``
  when that is not 0. Trailer fields are parsed and dropped, never merged into the head.
- A byte after the end of the answer (a second answer in the same read, a late one on the idle
  connection, a body on a 204/304) closes the connection; it is never parsed as the next answer.

A subclass is told through a few hooks, all called from the event loop's callbacks (no task):
``field`` (a field of the final head), ``interim`` (an interim answer ended: forget its fields),
``head_done``, ``body``, ``finished`` (the answer is complete, told once, after the read that completed
it was parsed), ``failed`` (the exchange broke a rule or the connection closed mid-answer: the reason)
and ``overran`` (bytes followed a complete answer).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

import httptools

if TYPE_CHECKING:
    from prequal_middleware.transports.h1_pool import H1Pool, Origin

# The interim answers a request without ``Expect``/``Upgrade`` games can get (RFC 9110 15.2; 103 Early Hints).
INTERIM_OK = (100, 103)


class _Overrun(Exception):
    """Raised from a parser callback: bytes after the end of the answer (the connection must go)."""


class _Refused(Exception):
    """Raised from a parser callback: the answer breaks a rule; the message says which."""


class H1Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; one exchange at a time (see the module docstring)."""

    __slots__ = (
        "active",
        "body_bytes",
        "closed",
        "complete",
        "exchanges",
        "fields",
        "framed",
        "head_bytes",
        "head_only",
        "idle_since",
        "keep_alive",
        "max_body_bytes",
        "max_head_bytes",
        "max_header_bytes",
        "max_headers",
        "origin",
        "parser",
        "pool",
        "received",
        "since_body",
        "status",
        "transport",
    )

    # Whether an answer without framing is read to the end of the connection (else it ends at its head).
    read_unframed = True
    # The fields ``field`` is told of (lower-case names), or None for every one. A filter, not a call
    # per field: the probe path wants two of a handful.
    fields_wanted: frozenset[bytes] | None = None

    def __init__(self, pool: H1Pool[Any], origin: Origin[Any]) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exchanges = 0  # exchanges begun: tells a late close of an earlier answer from this one
        self.idle_since = 0.0
        self.max_headers = pool.max_headers
        self.max_header_bytes = pool.max_header_bytes
        self.max_head_bytes = pool.max_head_bytes
        self.max_body_bytes = pool.max_body_bytes
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = False  # a HEAD request: the answer has no body whatever its fields say
        self.active = False
        self.received = False
        self.status = 0
        self.framed = False
        self.keep_alive = False
        self.complete = False
        self.fields = 0  # fields in the section being parsed
        self.head_bytes = 0  # the head's size as the parser saw it, interim answers included
        self.since_body = 0  # bytes received since the last body bytes: the head, chunk framing, trailers
        self.body_bytes = 0

    def start(self, head_only: bool = False) -> None:
        """Begin an exchange (the caller writes the request next)."""
        if self.head_only:
            # The last answer was to a HEAD: its parser still waits for the body the fields announced.
            self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.received = False
        self.status = 0
        self.framed = False
        self.keep_alive = False
        self.complete = False
        self.fields = self.head_bytes = self.since_body = self.body_bytes = 0
        self.active = True
        self.exchanges += 1

    def abort(self) -> None:
        """Close now, dropping unsent bytes; the pool forgets the connection at once."""
        if not self.closed:
            self.closed = True
            self.pool.connections.discard(self)
            origin = self.origin
            if self in origin.idle:
                origin.idle.remove(self)
            origin.release_slot()
        if self.transport is not None:
            self.transport.abort()

    # --- hooks (see the module docstring) ------------------------------------------------------

    def field(self, name: bytes, value: bytes) -> None:
        """A field of the final head (``name`` lower-case), if ``fields_wanted`` has it."""

    def interim(self) -> None:
        """An interim answer's head ended: the fields seen so far were its own."""

    def head_done(self) -> None:
        """The final head is complete (``status`` is set)."""

    def body(self, data: bytes) -> None:
        """Body bytes of the answer."""

    def finished(self) -> None:
        """The answer is complete."""

    def failed(self, reason: str) -> None:
        """The exchange failed (``reason``); the default closes the connection."""
        self.abort()

    def overran(self) -> None:
        """Bytes followed a complete answer in the same read; the default closes the connection."""
        self.abort()

    # --- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pool.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Bytes nobody asked for (idle, or after the end of the answer): never parsed as the next
            # request's answer; the stream can no longer be trusted.
            self.abort()
            return
        self.received = True
        self.since_body += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.failed("unexpected protocol upgrade")
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Overrun):
                self.overran()
            elif isinstance(cause, _Refused):
                self.failed(str(cause))
            else:
                self.failed(f"malformed response ({exc})" if cause is None else f"invalid answer ({cause!r})")
            return
        except Exception as exc:  # never let an answer's bytes raise out of the event loop's callback
            self.failed(f"invalid answer ({exc!r})")
            return
        if self.complete:
            self.finished()
        elif self.since_body > self.max_head_bytes and not self.closed:
            what = "trailers or chunk framing" if self.status else "head"
            self.failed(f"response {what} larger than {self.max_head_bytes} bytes")

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        if self.active and not self.complete and not self.closed:
            if self.status and not self.framed:
                self.complete = True  # a body delimited by the end of the connection: complete
                self.finished()
            else:
                what = "before the response headers" if not self.status else "mid-body"
                self.failed(f"connection closed {what}")
        self.abort()

    # --- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Overrun()  # a second answer after the final one: nobody asked for it

    def on_status(self, status: bytes) -> None:
        # Every status line counts towards the head, interim answers' too (a hundred 100 Continue in
        # one read are a head without end).
        self.head_bytes += len(status) + 15  # "HTTP/1.1 200 " and CRLF
        if self.head_bytes > self.max_head_bytes:
            raise _Refused(f"response head larger than {self.max_head_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4  # ": " and CRLF
        fields = self.fields = self.fields + 1
        if self.status:
            # A trailer field: the head went on already, and nothing after it joins it.
            if fields > self.max_headers or size - 2 > self.max_header_bytes:
                raise _Refused("response trailers too large")
            return
        # Exact, whatever the reads: a head past the bound fails even when it came in one read.
        head_bytes = self.head_bytes = self.head_bytes + size
        if head_bytes > self.max_head_bytes or fields > self.max_headers or size - 2 > self.max_header_bytes:
            if head_bytes > self.max_head_bytes:
                raise _Refused(f"response head larger than {self.max_head_bytes} bytes")
            raise _Refused("response headers too large")  # httptools reports it as a parser error
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True
        wanted = self.fields_wanted
        if wanted is None or name in wanted:
            self.field(name, value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.fields = 0
        if status < 200:
            if status not in INTERIM_OK:
                raise _Refused(f"unexpected interim status {status}")  # 101 with no upgrade asked for, too
            self.framed = False  # an interim answer (100 Continue, 103): the final one follows
            self.interim()
            return
        if status > 599:
            raise _Refused(f"status {status} out of range")
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only or status in (204, 304):
            self.framed = True
            self.complete = True
        elif not self.framed and not self.read_unframed:
            self.keep_alive = False  # the body runs to the end of the connection: take the head only
            self.complete = True
        self.head_done()

    def on_body(self, body: bytes) -> None:
        self.since_body = 0
        if self.complete:
            return
        self.body_bytes += len(body)
        if self.max_body_bytes and self.body_bytes > self.max_body_bytes:
            raise _Refused(f"response body larger than {self.max_body_bytes} bytes")
        self.body(body)

    def on_message_complete(self) -> None:
        if self.status:
            self.complete = True

"""Case 9: request smuggling and header abuse, sent as raw bytes, judged by what reached the backend.

The gateway runs as a process under uvicorn with each of its HTTP parsers: ``httptools`` (the default
when installed, as with ``uvicorn[standard]``) and ``h11``. The backend is a raw asyncio server that
records every request exactly as it arrived (``rawservers.Recorder``). For every payload:

- nothing smuggled ever reaches the backend, and it never receives a request it cannot frame;
- no more requests reach it than the client sent;
- the outcome the README and ``forwarding.py`` document: 400 for ambiguous framing (and the
  connection closed, RFC 9112 section 6.1), 431 for too many or too large headers, hop-by-hop headers
  and those named in ``Connection`` dropped, ``X-Forwarded-For`` appended to, ``X-Forwarded-Proto`` and
  ``-Host`` set by the gateway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.procs import HttpProc, gateway_proc
from tests.reliability.rawclient import RawResponse, exchange
from tests.reliability.rawservers import LoopThread, RawRequest, Recorder
from tests.reliability.report import Report
from tests.reliability.support import pools_env

SERVERS = ("httptools", "h11")
SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"


def request(first: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    return first + b"\r\nHost: gw\r\n" + headers + b"\r\n" + body


@dataclass
class Seen:
    responses: list[RawResponse]
    closed: bool
    upstream: list[RawRequest]

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses if r.status >= 200]

    def up(self, name: bytes) -> list[bytes]:
        return [v for u in self.upstream for v in u.header_values(name)]

    def summary(self) -> str:
        made_by = next(
            (
                "gateway" if r.header(b"x-prequal-pool") else "uvicorn" if b"Invalid HTTP" in r.body else "host app"
                for r in self.responses
                if r.status >= 400
            ),
            "",
        )
        status = "/".join(map(str, self.statuses)) + (f" ({made_by})" if made_by else "")
        arrived = (
            ", ".join((u.method + b" " + u.target).decode("latin-1") + f" [{u.framing}]" for u in self.upstream)
            or "nothing"
        )
        return f"{status}{', closed' if self.closed else ''}; upstream: {arrived}"


Check = Callable[[Seen], str | None]


def refused(status: int, close: bool = False) -> Check:
    def check(seen: Seen) -> str | None:
        if seen.statuses[:1] != [status]:
            return f"expected {status}, got {seen.statuses}"
        if seen.upstream:
            return "refused, yet something reached the backend"
        if close and not seen.closed:
            return "the connection stayed open after an ambiguously framed request"
        return None

    return check


def refused_or_clean(body: bytes | None = None) -> Check:
    """A 400, or forwarded as exactly one cleanly framed request (with ``body``, if given)."""

    def check(seen: Seen) -> str | None:
        if seen.statuses[:1] == [400]:
            return None if not seen.upstream else "refused, yet something reached the backend"
        if len(seen.upstream) != 1:
            return f"{len(seen.upstream)} requests upstream"
        up = seen.upstream[0]
        if len(up.header_values(b"content-length")) > 1:
            return "more than one Content-Length upstream"
        if body is not None and up.body != body:
            return f"body {up.body!r} upstream"
        if any(b" " in k or not k for k, _ in up.headers) or any(b"\r" in v or b"\n" in v for _, v in up.headers):
            return "a malformed header reached the backend"
        return None

    return check


def forwarded(*checks: Callable[[Seen], str | None]) -> Check:
    def check(seen: Seen) -> str | None:
        if seen.statuses != [200] or len(seen.upstream) != 1:
            return f"expected one 200 and one upstream request, got {seen.statuses} and {len(seen.upstream)}"
        return next((p for c in checks if (p := c(seen)) is not None), None)

    return check


def without(*names: bytes) -> Check:
    return lambda seen: next((f"{n.decode()} reached the backend" for n in names if seen.up(n)), None)


def has(name: bytes, value: bytes) -> Check:
    return lambda seen: None if seen.up(name) == [value] else f"{name.decode()}: {seen.up(name)} (want [{value!r}])"


def peer_last(seen: Seen) -> str | None:
    """One X-Forwarded-For upstream, the real peer (loopback here) its last element."""
    values = seen.up(b"x-forwarded-for")
    return (
        None if len(values) == 1 and values[0].split(b",")[-1].strip() == b"127.0.0.1" else f"x-forwarded-for {values}"
    )


def body_is(body: bytes) -> Check:
    return lambda seen: None if seen.upstream[0].body == body else f"body {seen.upstream[0].body!r}"


@dataclass(frozen=True)
class Abuse:
    name: str
    payload: bytes
    check: Check
    documented: str
    sent: int = 1  # requests the client sent
    known_bug: dict[str, str] | None = None  # server -> reason, for a strict xfail


TRAILER_BUG = (
    "uvicorn's httptools protocol appends chunked trailer fields to the request's header list when they "
    "arrive with the request (a uvicorn bug); the gateway forwards them upstream as header fields"
)

ABUSES = [
    Abuse(
        "CL + TE (Content-Length covers a smuggled request)",
        request(
            b"POST /api/a HTTP/1.1",
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLED)),
            b"0\r\n\r\n" + SMUGGLED,
        ),
        refused(400, close=True),
        "400, connection closed, nothing upstream",
    ),
    Abuse(
        "TE + CL (same, header order swapped)",
        request(
            b"POST /api/a HTTP/1.1",
            b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % (5 + len(SMUGGLED)),
            b"0\r\n\r\n" + SMUGGLED,
        ),
        refused(400, close=True),
        "400, connection closed, nothing upstream",
    ),
    Abuse(
        "conflicting Content-Lengths",
        request(b"POST /api/a HTTP/1.1", b"Content-Length: 5\r\nContent-Length: 44\r\n", b"hello" + SMUGGLED[:39]),
        refused(400, close=True),
        "400, connection closed, nothing upstream",
    ),
    Abuse(
        "identical duplicate Content-Lengths",
        request(b"POST /api/a HTTP/1.1", b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        refused_or_clean(b"hello"),
        "400, or one request with one Content-Length",
    ),
    Abuse(
        "Content-Length list (5, 5)",
        request(b"POST /api/a HTTP/1.1", b"Content-Length: 5, 5\r\n", b"hello"),
        refused_or_clean(b"hello"),
        "400, or one request with one Content-Length",
    ),
    Abuse(
        "Content-Length: +5",
        request(b"POST /api/a HTTP/1.1", b"Content-Length: +5\r\n", b"hello"),
        refused(400),
        "400, nothing upstream",
    ),
    Abuse(
        "Transfer-Encoding obfuscated (xchunked; chunked + identity; space before colon)",
        request(b"POST /api/a HTTP/1.1", b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED)
        + request(
            b"POST /api/a HTTP/1.1", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n"
        ),
        refused(400, close=True),
        "400, connection closed, nothing upstream",
        sent=2,
    ),
    Abuse(
        "Transfer-Encoding : chunked (space before the colon) with a Content-Length",
        request(
            b"POST /api/a HTTP/1.1", b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED
        ),
        refused(400, close=True),
        "400, connection closed, nothing upstream",
    ),
    Abuse(
        "a 40 kB header",
        request(b"GET /api/a HTTP/1.1", b"X-Big: " + b"a" * 40_000 + b"\r\n"),
        refused(431),
        "431 headers_too_large, nothing upstream",
    ),
    Abuse(
        "150 headers",
        request(b"GET /api/a HTTP/1.1", b"".join(b"X-N%d: v\r\n" % i for i in range(150))),
        refused(431),
        "431 headers_too_large, nothing upstream",
    ),
    Abuse(
        "Connection: naming end-to-end headers (X-Secret, Cookie, Authorization)",
        request(
            b"GET /api/a HTTP/1.1",
            b"Connection: keep-alive, X-Secret, Cookie, Authorization\r\n"
            b"X-Secret: s\r\nCookie: c=1\r\nAuthorization: Bearer t\r\nX-Kept: yes\r\n",
        ),
        forwarded(without(b"x-secret", b"cookie", b"authorization", b"connection"), has(b"x-kept", b"yes")),
        "the named headers dropped, the others kept",
    ),
    Abuse(
        "Connection: naming the gateway's own X-Forwarded-* headers",
        request(
            b"GET /api/a HTTP/1.1",
            b"Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n",
        ),
        forwarded(
            peer_last,
            has(b"x-forwarded-proto", b"http"),
            has(b"x-forwarded-host", b"gw"),
        ),
        "the gateway's X-Forwarded-* still set, the peer last in X-Forwarded-For",
    ),
    Abuse(
        "Connection: Content-Length on a POST",
        request(b"POST /api/a HTTP/1.1", b"Connection: Content-Length\r\nContent-Length: 5\r\n", b"hello"),
        forwarded(body_is(b"hello")),
        "the body still arrives whole, framed one way",
    ),
    Abuse(
        "spoofed X-Forwarded-For (twice), -Proto, -Host; Forwarded, X-Real-IP",
        request(
            b"GET /api/a HTTP/1.1",
            b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: evil.example\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\n",
        ),
        forwarded(
            has(b"x-forwarded-for", b"1.2.3.4, 5.6.7.8, 127.0.0.1"),
            has(b"x-forwarded-proto", b"http"),
            has(b"x-forwarded-host", b"gw"),
        ),
        "X-Forwarded-For appended to (the real peer last), -Proto and -Host replaced",
    ),
    Abuse(
        "h2c upgrade smuggling (Upgrade: h2c, HTTP2-Settings)",
        request(
            b"GET /api/a HTTP/1.1",
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
        forwarded(without(b"upgrade", b"http2-settings", b"connection")),
        "a plain request upstream, no upgrade",
    ),
    Abuse(
        "Expect: 100-continue",
        request(b"POST /api/a HTTP/1.1", b"Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello"),
        forwarded(without(b"expect"), body_is(b"hello")),
        "answered in front, not forwarded",
    ),
    Abuse(
        "two pipelined requests",
        request(b"GET /api/one HTTP/1.1") + request(b"GET /api/two HTTP/1.1"),
        lambda seen: (
            None
            if seen.statuses == [200, 200] and [u.target for u in seen.upstream] == [b"/one", b"/two"]
            else f"{seen.statuses}, {[u.target for u in seen.upstream]}"
        ),
        "two requests, in order",
        sent=2,
    ),
    Abuse(
        "obs-fold (a header continued on the next line)",
        request(b"GET /api/a HTTP/1.1", b"X-Fold: a\r\n b\r\n"),
        refused_or_clean(),
        "400, or one request with no malformed header",
    ),
    Abuse(
        "bare LF line endings", b"GET /api/a HTTP/1.1\nHost: gw\n\n", refused_or_clean(), "400, or one clean request"
    ),
    Abuse("NUL in a header value", request(b"GET /api/a HTTP/1.1", b"X-Nul: a\x00b\r\n"), refused(400), "400"),
    Abuse("space in a header name", request(b"GET /api/a HTTP/1.1", b"X Bad: v\r\n"), refused(400), "400"),
    Abuse(
        "absolute-form target (http://evil.example/api/abs)",
        request(b"GET http://evil.example/api/abs HTTP/1.1"),
        lambda seen: (
            None
            if all(u.target.startswith(b"/") and u.header_values(b"host") != [b"evil.example"] for u in seen.upstream)
            else "an absolute target or the client's host reached the backend"
        ),
        "origin-form upstream to the pool's backend (or not routed)",
    ),
    Abuse(
        "chunked body with a trailer field (X-Trailer)",
        request(
            b"POST /api/a HTTP/1.1", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-Trailer: evil\r\n\r\n"
        ),
        forwarded(body_is(b"hello"), without(b"x-trailer")),
        "the body forwarded, the trailer never made a header",
        known_bug={"httptools": TRAILER_BUG},
    ),
    Abuse(
        "Transfer-Encoding in HTTP/1.0 with a smuggled request after the body",
        request(b"POST /api/a HTTP/1.0", b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        refused_or_clean(b""),
        "400, or the one request (the connection then closes)",
    ),
]


@dataclass
class Setup:
    recorder: Recorder
    gateways: dict[str, HttpProc]
    seen: dict[tuple[str, str], Seen]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, report: Report) -> Iterator[Setup]:
    log_dir = tmp_path_factory.mktemp("smuggling")
    loop = LoopThread().start()
    recorder = Recorder(loop).start()
    env = pools_env({"/api": {"upstreams": [recorder.url], "health": {"path": None}}})
    gateways = {http: gateway_proc(f"gateway-{http}", log_dir, env, http=http) for http in SERVERS}
    try:
        for g in gateways.values():
            g.start()
        for g in gateways.values():
            g.wait_http(g.url + "/_prequal/healthz")
        state = Setup(recorder, gateways, {})
        yield state
        record(report, state.seen)
    finally:
        for g in gateways.values():
            g.stop()
        recorder.stop()
        loop.stop()


def record(report: Report, seen: dict[tuple[str, str], Seen]) -> None:
    if len(seen) != len(ABUSES) * len(SERVERS):
        return  # a partial run: the document is not rewritten anyway
    for i, abuse in enumerate(ABUSES):
        problems = {http: abuse.check(seen[(abuse.name, http)]) for http in SERVERS}
        report.record(
            9,
            abuse.name,
            load=f"raw bytes, {abuse.sent} request{'s' if abuse.sent > 1 else ''}, uvicorn httptools / h11",
            happened="; ".join(f"{http}: {seen[(abuse.name, http)].summary()}" for http in SERVERS),
            figure=f"documented: {abuse.documented}; "
            + (", ".join(f"{h}: {'as documented' if p is None else 'NOT: ' + p}" for h, p in problems.items())),
            order=i,
            expected_failure="; ".join(abuse.known_bug.values())
            if abuse.known_bug and any(problems.values())
            else None,
        )


def cases() -> Iterator[object]:
    for abuse in ABUSES:
        for http in SERVERS:
            marks = []
            if abuse.known_bug and http in abuse.known_bug:
                marks.append(pytest.mark.xfail(strict=True, reason=abuse.known_bug[http]))
            yield pytest.param(abuse, http, marks=marks, id=f"{http}-{abuse.name[:40]}")


@pytest.mark.parametrize(("abuse", "http"), list(cases()))
def test_request_abuse(setup: Setup, abuse: Abuse, http: str) -> None:
    recorder = setup.recorder
    before = len(recorder.requests)
    malformed_before = len(recorder.malformed)
    responses, closed = exchange(setup.gateways[http].port, abuse.payload)
    time.sleep(0.05)  # anything still on its way upstream lands
    seen = Seen(responses, closed, recorder.requests[before:])
    setup.seen[(abuse.name, http)] = seen
    assert not any(b"smuggled" in u.target for u in seen.upstream), f"smuggled upstream: {seen.summary()}"
    assert recorder.malformed[malformed_before:] == [], "the backend got a request it could not frame"
    assert len(seen.upstream) <= abuse.sent, seen.summary()
    problem = abuse.check(seen)
    assert problem is None, f"{problem}: {seen.summary()}"


def test_every_gateway_still_serves(setup: Setup) -> None:
    for http, gateway in setup.gateways.items():
        responses, _ = exchange(gateway.port, request(b"GET /api/after HTTP/1.1", b"Connection: close\r\n"))
        assert [r.status for r in responses] == [200], http
        assert gateway.alive(), gateway.log_tail()

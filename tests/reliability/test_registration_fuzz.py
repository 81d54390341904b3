"""Case 8: registration under fuzzing, in process (``httpx.ASGITransport``) and over real sockets.

The admin app of a started gateway (two pools, a static member, an allow-list) gets arbitrary JSON
values, dictionaries of the registration fields with hostile values, URLs from a hostile grammar, raw
bytes with random content types, random bearer tokens; ``authorize`` gets random client addresses and
proxy headers. After every case:

- never a 5xx;
- a refusal is a 4xx JSON ``{"error", "detail"}`` and ``GET /backends`` is exactly as before;
- an accepted registration is complete (the record and ``/backends`` agree with the request, the URL
  is http(s), with an explicit port, no credentials and an allow-listed host, as both ``urlsplit`` and
  the transport's URL parser (yarl) see it); it is then unregistered and ``/backends`` is as before.

Minimal reproductions of inputs that once gave a 500 (an integer beyond float range) are kept as
their own cases below.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import string
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yarl
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

from prequal_middleware import AdminSettings, Gateway, HealthSettings, UpstreamPool
from prequal_middleware.exceptions import RegistrationError
from prequal_middleware.registry.registration import authorize
from tests.reliability.procs import HttpProc, gateway_proc, running
from tests.reliability.report import Report
from tests.reliability.support import pools_env

ALLOWED = ("127.0.0.0/8", "::1/128", "localhost", "*.svc.local")
POOLS = ("/api", "/other")
STATIC = "http://127.0.0.1:9"
TOKEN = "s3cret-token-for-tests"
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same cases on every CI run; a finding reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CONTROL_OR_SPACE = frozenset(chr(c) for c in range(0x21)) | {"\x7f"}

# --- an admin app on an event loop of its own --------------------------------------------------------


def raw_headers(headers: Mapping[str, str | bytes] | None) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v if isinstance(v, bytes) else v.encode("latin-1")) for k, v in (headers or {}).items()]


class Admin:
    """A started gateway's admin app, driven through ``httpx.ASGITransport`` from synchronous code."""

    def __init__(self, token: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        off = HealthSettings(path=None)
        pools = [UpstreamPool("/api", upstreams=[STATIC], health=off), UpstreamPool("/other", health=off)]
        # Without a token, loopback trust (the Host httpx sends here is "gateway", allowed by name).
        admin = AdminSettings(
            token=token,
            trust_loopback=token is None,
            allowed_hosts=("gateway",),
            allowed_upstreams=ALLOWED,
            max_writes_per_s=1e6,  # the fuzzer writes faster than any real registrar
        )
        self.gateway = Gateway(pools=pools, admin=admin)
        self.app = Starlette(routes=[Mount("/_prequal", self.gateway.admin_app())])
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.run(self.gateway.startup())
        self.baseline = self.members()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def client(self, host: str = "127.0.0.1") -> httpx.AsyncClient:
        if host not in self._clients:
            transport = httpx.ASGITransport(app=self.app, client=(host, 50000), raise_app_exceptions=False)
            self._clients[host] = httpx.AsyncClient(transport=transport, base_url="http://gateway")
        return self._clients[host]

    def post(
        self, kind: str, content: bytes, headers: Mapping[str, str | bytes] | None = None, host: str = "127.0.0.1"
    ) -> httpx.Response:
        headers = {"content-type": "application/json", **(headers or {})}
        response: httpx.Response = self.run(
            self.client(host).post(f"/_prequal/{kind}", content=content, headers=raw_headers(headers))
        )
        return response

    def members(self) -> list[tuple[Any, ...]]:
        """What ``/backends`` says about membership (not health: probing changes that on its own)."""
        described = self.run(self.client().get("/_prequal/backends")).json()
        return sorted(
            (p["prefix"], m["url"], m["weight"], json.dumps(m["metadata"], sort_keys=True), m["source"])
            for p in described["pools"]
            for m in p["members"]
        )

    def close(self) -> None:
        for client in self._clients.values():
            self.run(client.aclose())
        self.run(self.gateway.shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def admin() -> Iterator[Admin]:
    harness = Admin()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def token_admin() -> Iterator[Admin]:
    harness = Admin(token=TOKEN)
    yield harness
    harness.close()


# --- the oracle ------------------------------------------------------------------------------------


def allowed_host(host: str) -> bool:
    """The allow-list, checked independently of the library's ``AllowList``."""
    host = host.lower()
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost" or host.endswith(".svc.local")
    return (
        address in ipaddress.ip_network("127.0.0.0/8")
        if address.version == 4
        else address == ipaddress.ip_address("::1")
    )


def canonical(url: str) -> str:
    """The one spelling an accepted URL is stored under, computed independently of the library."""
    parts = urlsplit(url)
    host = (parts.hostname or "").removesuffix(".")
    if ":" in host:
        host = f"[{ipaddress.IPv6Address(host).compressed}]"
    return f"{parts.scheme.lower()}://{host.lower()}:{parts.port}{parts.path.rstrip('/')}"


def url_problems(url: str) -> list[str]:
    """Why an accepted URL should not have been (security invariants, by two independent parsers)."""
    problems = []
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"urlsplit cannot parse it: {exc}"]
    if parts.scheme.lower() not in ("http", "https"):
        problems.append(f"scheme {parts.scheme!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        problems.append("userinfo")
    if not parts.hostname or not allowed_host(parts.hostname):
        problems.append(f"host {parts.hostname!r} not allow-listed")
    if port is None or not 0 < port < 65536:
        problems.append(f"port {port!r}")
    if parts.query or parts.fragment:
        problems.append("query or fragment")
    if CONTROL_OR_SPACE.intersection(url) or not url.isascii():
        problems.append("whitespace, control or non-ASCII characters (urlsplit drops some before parsing)")
        return problems
    try:
        seen = yarl.URL(url, encoded=True)
    except ValueError as exc:
        problems.append(f"the transport's parser refuses it: {exc}")
    else:
        if (seen.host or "").lower() != (parts.hostname or "").lower() or seen.explicit_port != port:
            problems.append(f"parsers disagree: yarl sees {seen.host!r}:{seen.explicit_port!r}")
        if seen.user is not None:
            problems.append("yarl sees userinfo")
    return problems


class Checker:
    """Sends one admin request and checks the outcome; counts what happened."""

    def __init__(self, harness: Admin, auth: Mapping[str, str | bytes] | None = None) -> None:
        self.h = harness
        self.auth = auth  # what the clean-up after an accepted case sends
        self.stats: Counter[str] = Counter()

    def check(
        self, kind: str, raw: bytes, headers: Mapping[str, str | bytes] | None = None, host: str = "127.0.0.1"
    ) -> int:
        h = self.h
        response = h.post(kind, raw, headers, host)
        status = response.status_code
        self.stats["cases"] += 1
        self.stats[f"{status // 100}xx"] += 1
        assert status < 500, f"{status} for {kind} {raw[:300]!r}: {response.text[:200]}"
        if status >= 400:
            error = response.json()
            assert set(error) >= {"error", "detail"}, error
            assert h.members() == h.baseline, f"refused ({status} {error}) but /backends changed"
            return status
        if kind == "register":
            assert status == 201, status
            self.accepted(json.loads(raw), response.json())
        else:  # a heartbeat or unregister of a member the fuzzer cannot have registered
            assert h.members() == h.baseline, f"{kind} {raw[:200]!r} accepted and changed /backends"
        return status

    def accepted(self, body: dict[str, Any], record: dict[str, Any]) -> None:
        h = self.h
        self.stats["accepted"] += 1
        url = record["url"]
        assert set(record) >= {"pool", "url", "weight", "metadata", "lease_expires_at", "ttl_s"}, record
        assert url == canonical(body["url"]), (body["url"], url)
        assert "pool" in body, "the gateway has two pools: a registration naming none must be refused"
        assert record["pool"] == body["pool"]
        assert record["weight"] == float(body.get("weight", 1.0))
        assert record["metadata"] == (body.get("metadata") or {})
        ttl = body.get("ttl_s") or 30.0
        assert abs(record["ttl_s"] - ttl) < 1.0, (record["ttl_s"], ttl)
        problems = url_problems(url)
        assert not problems, f"accepted {url!r}: {problems}"
        members = h.members()
        mine = [m for m in members if m[1] == url and m[0] == record["pool"]]
        if ttl >= 1.0:  # a shorter lease may be gone already; present or not, never partial
            assert mine, f"{url!r} accepted but not a member"
        for m in mine:
            assert m[2] == record["weight"] and json.loads(m[3]) == record["metadata"] and m[4] == "registered", m
        assert sorted(set(members) - set(mine)) == h.baseline
        undo = h.post("unregister", json.dumps({"url": url, "pool": record["pool"]}).encode(), self.auth)
        assert undo.status_code in (200, 404), undo.text  # 404: the short lease ran out first
        assert h.members() == h.baseline, "unregistering did not restore /backends"


# --- strategies ------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)

SCHEMES = ["http", "https", "HTTP", "hTTps", "file", "ftp", "gopher", "javascript", "data", "ws", "", "http:", "h ttp"]
SEPARATORS = ["://", ":/", ":///", ":\\\\", "//", ":"]
USERINFO = ["", "", "", "user@", "user:pass@", ":@", "@", "a%40b@", "127.0.0.1@", "evil.example@", "localhost:80@"]
HOSTS = [
    *["127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "a.svc.local", "deep.a.svc.local", "[::1]"],  # allowed
    "evil.example",
    "10.0.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "[::]",
    "[::ffff:127.0.0.1]",
    "2130706433",
    "0x7f000001",
    "127.1",
    "017700000001",
    "svc.local",
    "a.svc.local.evil.example",
    "a.svc.local.",
    "localhost.",
    "ｌｏｃａｌｈｏｓｔ",
    "127。0。0。1",
    "loc%61lhost",
    "[fe80::1%25eth0]",
    "",
    "[::1",
    "exa mple",
]
PORTS = [
    "",
    ":",
    ":0",
    ":1",
    ":80",
    ":8080",
    ":65535",
    ":65536",
    ":-1",
    ":abc",
    ":080",
    ": 80",
    ":80:80",
    ":८०",
    ":+80",
]
TAILS = [
    "",
    "",
    "/",
    "/base",
    "/a/b/",
    "/%2e%2e/x",
    "?q=1",
    "#frag",
    "/x?y#z",
    "\\x",
    "//evil.example",
    "/@evil.example",
]
NOISE = ["\t", "\n", "\r", " ", "\x00", "\\", "@", "#", "?", "/", "%", "．", "\u200b", "[", "]", ":"]


ALLOWED_HOSTS = ["127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "a.svc.local", "deep.a.svc.local", "[::1]"]
VALID_PORTS = [":1", ":80", ":8080", ":65535"]
BENIGN_TAILS = ["", "/", "/base", "/a/b/"]


@st.composite
def hostile_urls(draw: st.DrawFn) -> str:
    """Half near-valid (allow-listed host, valid port, maybe one noise character), half from every piece."""
    if draw(st.booleans()):
        url = (
            draw(st.sampled_from(["http", "https"]))
            + "://"
            + draw(st.sampled_from(["", "", "", "user@"]))
            + draw(st.sampled_from(ALLOWED_HOSTS + ["evil.example", "10.0.0.1"]))
            + draw(st.sampled_from(VALID_PORTS + ["", ":0", ":65536"]))
            + draw(st.sampled_from(BENIGN_TAILS + ["?q=1", "#f"]))
        )
        noise = draw(st.integers(0, 1))
    else:
        url = (
            draw(st.sampled_from(SCHEMES))
            + draw(st.sampled_from(SEPARATORS[:1] * 6 + SEPARATORS))
            + draw(st.sampled_from(USERINFO))
            + draw(st.sampled_from(HOSTS) | st.text(string.ascii_letters + string.digits + ".-_~%", max_size=12))
            + draw(st.sampled_from(PORTS))
            + draw(st.sampled_from(TAILS))
        )
        noise = draw(st.integers(0, 2))
    for _ in range(noise):
        at = draw(st.integers(0, len(url)))
        url = url[:at] + draw(st.sampled_from(NOISE)) + url[at:]
    return url


field_values: dict[str, st.SearchStrategy[Any]] = {
    "url": hostile_urls() | json_scalars,
    "pool": st.sampled_from(["/api", "/other", "/", "/api/", "/API", "", "api", "/missing"]) | json_scalars,
    "weight": st.sampled_from([0, 0.0, 1, 2.5, 1000, 1000.0001, -1, True, "1", None]) | st.floats() | st.integers(),
    "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    | st.dictionaries(st.text(max_size=4), st.text(min_size=1000, max_size=3000), max_size=3)
    | json_scalars,
    "ttl_s": st.sampled_from([0, 0.001, 1, 30, 3600, 3600.5, -5, "10", None]) | st.floats() | st.integers(),
}
valid_registration = st.fixed_dictionaries(
    {
        "url": st.sampled_from(["http", "https"]).flatmap(
            lambda scheme: st.tuples(
                st.sampled_from(ALLOWED_HOSTS), st.sampled_from(VALID_PORTS), st.sampled_from(BENIGN_TAILS)
            ).map(lambda t: f"{scheme}://{t[0]}{t[1]}{t[2]}")
        ),
        "pool": st.sampled_from(POOLS),
    },
    optional={
        "weight": st.floats(0.001, 1000) | st.integers(1, 1000),
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "ttl_s": st.floats(1.0, 3600) | st.integers(1, 3600),
    },
)


@st.composite
def field_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid registration with up to three hostile changes (a field replaced, dropped, or added)."""
    body: dict[str, Any] = draw(valid_registration)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*field_values, "extra"]))
        if key == "extra":
            body[draw(st.sampled_from(["id", "URL", "Url", "health", "__proto__", ""]))] = draw(json_scalars)
        elif draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(field_values[key])
    return body


KINDS = st.sampled_from(["register", "register", "heartbeat", "unregister"])
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]
)
raw_bodies = (
    st.binary(max_size=2048)
    | st.binary(min_size=16 * 1024 - 8, max_size=17 * 1024)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.tuples(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=8)).map(lambda t: t[0] + t[1])
    | st.integers(1, 12_000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(1, 5_000).map(lambda n: b'{"url":' * n + b"1" + b"}" * n)
    | st.text(max_size=200).map(lambda t: t.encode("utf-16"))
)


def record(report: Report, order: int, what: str, stats: Counter[str], note: str = "") -> None:
    report.record(
        8,
        what,
        load=f"{stats['cases']} cases (hypothesis, derandomized, deadline=None)",
        happened=(
            f"statuses {dict(sorted((k, v) for k, v in stats.items() if k.endswith('xx')))}; "
            f"{stats['accepted']} accepted, each complete and then removed" + (f"; {note}" if note else "")
        ),
        figure="0 5xx, 0 partial records, 0 accepted URLs off the allow-list, with credentials, "
        "without a port or not http(s)",
        order=order,
    )


# --- in-process fuzzing ------------------------------------------------------------------------------


def test_arbitrary_json_values(admin: Admin, report: Report) -> None:
    checker = Checker(admin)

    @settings(FUZZ, max_examples=600)
    @given(kind=KINDS, value=json_values)
    def case(kind: str, value: Any) -> None:
        checker.check(kind, json.dumps(value).encode(), {"content-type": "application/json"})

    case()
    record(report, 0, "arbitrary JSON values to register / heartbeat / unregister", checker.stats)


def test_registration_fields(admin: Admin, report: Report) -> None:
    checker = Checker(admin)

    @settings(FUZZ, max_examples=1000)
    @given(kind=KINDS, body=field_dicts())
    def case(kind: str, body: dict[str, Any]) -> None:
        checker.check(kind, json.dumps(body).encode(), {"content-type": "application/json"})

    case()
    record(report, 1, "objects of the registration fields with hostile values", checker.stats)


def test_hostile_urls(admin: Admin, report: Report) -> None:
    checker = Checker(admin)
    refused_families: Counter[str] = Counter()

    @settings(FUZZ, max_examples=1500)
    @given(url=hostile_urls(), pool=st.sampled_from(["/api", "/other"]))
    def case(url: str, pool: str) -> None:
        status = checker.check("register", json.dumps({"url": url, "pool": pool}).encode())
        cleaned = "".join(c for c in url if c not in "\t\r\n")
        if cleaned.lower().lstrip().startswith("file:"):
            assert status >= 400, url
            refused_families["file"] += 1
        try:
            parts = urlsplit(cleaned)
            host = parts.hostname
            has_user = parts.username is not None
        except ValueError:
            host, has_user = None, False
        if has_user:
            assert status >= 400, url
            refused_families["userinfo"] += 1
        if host is not None and not allowed_host(host):
            assert status >= 400, url
            refused_families["not allow-listed"] += 1

    case()
    note = "refused as required: " + ", ".join(f"{k} {v}" for k, v in sorted(refused_families.items()))
    record(
        report,
        2,
        "URLs from a hostile grammar (schemes, userinfo, hosts, ports, noise characters)",
        checker.stats,
        note,
    )
    assert refused_families["file"] and refused_families["userinfo"] and refused_families["not allow-listed"]


def test_raw_bytes_bodies(admin: Admin, report: Report) -> None:
    checker = Checker(admin)

    @settings(FUZZ, max_examples=500)
    @given(kind=KINDS, raw=raw_bodies, content_type=CONTENT_TYPES)
    def case(kind: str, raw: bytes, content_type: str) -> None:
        checker.check(kind, raw, {"content-type": content_type} if content_type else None)

    case()
    record(
        report,
        3,
        "raw bytes bodies (random, oversized, deeply nested, UTF-16) with random content types",
        checker.stats,
    )


def test_bearer_tokens(token_admin: Admin, report: Report) -> None:
    checker = Checker(token_admin, {"authorization": f"Bearer {TOKEN}"})
    valid = json.dumps({"url": "http://127.0.0.1:8123", "pool": "/api"}).encode()
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(
        authorization=st.none()
        | st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer {TOKEN} ", f"Bearer {TOKEN[:-1]}", "Bearer "])
        | st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
        host=st.sampled_from(["127.0.0.1", "::1", "203.0.113.7", "10.1.2.3"]),
    )
    def case(authorization: str | None, host: str) -> None:
        headers = {"authorization": authorization.encode("latin-1")} if authorization is not None else {}
        status = checker.check("register", valid, headers, host)
        right = authorization == f"Bearer {TOKEN}"
        assert (status == 201) == right, (authorization, host, status)
        if not right:
            assert status == 401
        outcomes["accepted (right token, any address)" if right else "401"] += 1

    case()
    record(report, 4, "random Authorization headers from loopback and remote clients, token configured", checker.stats)
    assert outcomes["401"] > 100


def test_authorize_by_client_address(report: Report) -> None:
    settings_ = AdminSettings(trust_loopback=True)
    proxy_headers = [b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-forwarded-host"]
    stats: Counter[str] = Counter()

    @settings(FUZZ, max_examples=1500)
    @given(
        address=st.ip_addresses().map(str)
        | st.sampled_from(["127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1", "0.0.0.0", "localhost", "", "x"]),
        proxy=st.lists(st.sampled_from(proxy_headers), max_size=2),
        other=st.lists(st.sampled_from([b"user-agent", b"x-forwarded-proto", b"via"]), max_size=2),
        no_client=st.booleans(),
    )
    def case(address: str, proxy: list[bytes], other: list[bytes], no_client: bool) -> None:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        headers += [(name, b"127.0.0.1") for name in proxy + other]
        client = None if no_client else (address, 1234)
        try:
            authorize(settings_, headers, client)
            allowed = True
        except RegistrationError as exc:
            assert exc.status == 403
            allowed = False
        loopback = False
        if client is not None:
            try:
                ip = ipaddress.ip_address(address)
                loopback = (
                    ip in ipaddress.ip_network("127.0.0.0/8") if ip.version == 4 else ip == ipaddress.ip_address("::1")
                )
            except ValueError:
                loopback = False
        expected = loopback and not proxy
        assert allowed == expected, (address, proxy, client)
        stats["cases"] += 1
        stats["allowed" if allowed else "refused"] += 1

    case()
    report.record(
        8,
        "authorize() with random client addresses (v4, v6, names, none) and proxy headers, no token",
        load=f"{stats['cases']} cases (hypothesis, derandomized)",
        happened=f"{stats['allowed']} allowed (every one a loopback client without proxy headers), "
        f"{stats['refused']} refused 403",
        figure="0 non-loopback or proxied writers allowed",
        order=5,
    )


# --- minimal reproductions: hostile bodies and URLs ----------------------------------------------------

BODY_CASES = 6
URL_CASES = 7


@pytest.fixture(scope="module")
def reproductions(report: Report) -> Iterator[dict[str, int]]:
    """Status per reproduction; one row for all of them once every one ran."""
    seen: dict[str, int] = {}
    yield seen
    if len(seen) == BODY_CASES + URL_CASES:
        bodies = [k for k in seen if k.startswith("body: ")]
        urls = [k for k in seen if k.startswith("url: ")]
        report.record(
            8,
            "minimal reproductions: hostile bodies (deep nesting, huge numbers, NaN, Infinity) and URLs with "
            "whitespace, control, non-ASCII or quote characters",
            load=f"{len(seen)} requests",
            happened="; ".join(f"{k[6:]}: {seen[k]}" for k in bodies)
            + f"; URLs: {sum(seen[k] == 400 for k in urls)}/{len(urls)} refused 400 naming the url field",
            figure=f"{sum(v == 400 for v in seen.values())}/{len(seen)} are 400 (bound: all)",
            order=7,
        )


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 8000 + b"]" * 8000, id="nested 8000 deep"),
        pytest.param(
            b'{"url": "http://127.0.0.1:80", "pool": "/api", "weight": 1' + b"0" * 5000 + b"}", id="5001 digits"
        ),
        pytest.param(b'{"url": "http://127.0.0.1:80", "pool": "/api", "weight": NaN}', id="NaN"),
        pytest.param(b'{"url": "http://127.0.0.1:80", "pool": "/api", "ttl_s": Infinity}', id="Infinity"),
        pytest.param(b'{"url": "http://127.0.0.1:80", "pool": "/api", "metadata": {"a": NaN}}', id="NaN in metadata"),
        pytest.param(
            b'{"url": "http://127.0.0.1:80", "pool": "/api", "ttl_s": 1' + b"0" * 400 + b"}",
            id="int beyond float range",
        ),
    ],
)
def test_hostile_json_is_a_400(
    admin: Admin, reproductions: dict[str, int], body: bytes, request: pytest.FixtureRequest
) -> None:
    response = admin.post("register", body)
    reproductions["body: " + request.node.callspec.id] = response.status_code
    assert response.status_code == 400, response.status_code
    assert admin.members() == admin.baseline


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8\t0",
        " http://127.0.0.1:80",
        "http://127.0.0.1:80\n",
        "http://127.0.0.1:80/a b",
        "http://127.0.0.1:80/a HTTP/1.1\r\nX-Injected: 1",
        "http://127.0.0.1:80/\u00e9",
        'http://127.0.0.1:80/"x"',
    ],
)
def test_url_with_whitespace_or_controls_is_refused(admin: Admin, reproductions: dict[str, int], url: str) -> None:
    response = admin.post("register", json.dumps({"url": url, "pool": "/api"}).encode())
    reproductions["url: " + url] = response.status_code
    if response.status_code == 201:
        admin.post("unregister", json.dumps({"url": response.json()["url"], "pool": "/api"}).encode())
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "url"


# --- over real sockets ---------------------------------------------------------------------------------


def outside_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    for target in ("10.255.255.254", "203.0.113.1", "192.0.2.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target, 9))  # UDP: nothing is sent, the kernel just picks a route
            except OSError:
                continue
            address = str(probe.getsockname()[0])
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def test_registration_over_real_sockets(log_dir: Any, report: Report) -> None:
    env = pools_env({"/api": []}, PREQUAL_ALLOWED_UPSTREAMS=",".join(ALLOWED))
    plain = gateway_proc("plain", log_dir, env, host="0.0.0.0")
    proxied = gateway_proc("proxied", log_dir, env, proxy_headers=True)
    tokened = gateway_proc("tokened", log_dir, {**env, "PREQUAL_REGISTRATION_TOKEN": TOKEN})
    good = {"url": "http://127.0.0.1:8123"}
    outside = outside_address()
    results: list[tuple[str, int, int]] = []  # (what, status, expected)

    def post(gw: HttpProc, what: str, expected: int, base: str | None = None, **kwargs: Any) -> None:
        before = httpx.get(gw.url + "/_prequal/backends").json()["pools"]
        if "content" in kwargs:  # raw bodies are still sent as JSON: the media type is checked first
            kwargs.setdefault("headers", {"content-type": "application/json"})
        response = httpx.post((base or gw.url) + "/_prequal/register", timeout=5, **kwargs)
        results.append((what, response.status_code, expected))
        if response.status_code == 201:
            httpx.post(gw.url + "/_prequal/unregister", json=good)
        else:
            assert httpx.get(gw.url + "/_prequal/backends").json()["pools"] == before, what

    def chunks(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"x" * 1024

    with running(plain, proxied, tokened, ready_path="/_prequal/healthz"):
        post(plain, "loopback client", 201, json=good)
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            post(plain, f"loopback client with {header}", 403, json=good, headers={header: "127.0.0.1"})
        post(plain, "17 kB body (Content-Length)", 413, content=b"x" * 17_000)
        post(plain, "17 kB body (chunked)", 413, content=chunks(17))
        post(plain, "invalid JSON", 400, content=b"{not json")
        for url, code in (
            ("file:///etc/passwd", 400),
            ("http://user:pw@127.0.0.1:80", 400),
            ("http://169.254.169.254:80", 403),
            ("gopher://127.0.0.1:70", 400),
            ("http://127.0.0.1", 400),
        ):
            post(plain, url, code, json={"url": url})
        if outside is not None:
            post(
                plain,
                f"client at {outside} (non-loopback socket)",
                403,
                base=f"http://{outside}:{plain.port}",
                json=good,
            )
        post(
            proxied,
            "trusted-proxy uvicorn, X-Forwarded-For: 127.0.0.1",
            403,
            json=good,
            headers={"X-Forwarded-For": "127.0.0.1"},
        )
        post(
            proxied,
            "trusted-proxy uvicorn, X-Forwarded-For: 203.0.113.9",
            403,
            json=good,
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
        post(tokened, "token configured, none sent", 401, json=good)
        post(tokened, "token configured, wrong one", 401, json=good, headers={"Authorization": "Bearer nope-nope-nope"})
        post(tokened, "token configured, right one", 201, json=good, headers={"Authorization": f"Bearer {TOKEN}"})

    report.record(
        8,
        "real sockets: three gateway processes (loopback-only on 0.0.0.0, behind uvicorn --proxy-headers, "
        "with a token)",
        load=f"{len(results)} requests",
        happened="; ".join(f"{what}: {status}" for what, status, _ in results),
        figure=f"{sum(s == e for _, s, e in results)}/{len(results)} as documented"
        + ("" if outside else " (no non-loopback interface here: that case skipped)"),
        order=6,
    )
    assert [(w, s) for w, s, e in results if s != e] == []

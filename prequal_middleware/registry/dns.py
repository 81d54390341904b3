"""DNS discovery: an upstream named by DNS stands for every address the name has (nginx ``resolve``,
Envoy ``STRICT_DNS``), and an SRV name for every target and port it lists.

``DnsResolver.expand(url)`` turns one upstream URL into its members:

- ``http://api.internal:8000/base``: the A and AAAA records of ``api.internal``, one member per address,
  pinned to it (``http://api.internal:8000/base#10.0.0.5``, ``core.member_url``): the transports connect
  to the address and send ``Host: api.internal:8000`` (over TLS, that name as SNI and for verification);
- ``http://_http._tcp.api.internal/base`` (a name whose first two labels start with ``_``, no port):
  the SRV records, one member per target address and port (``http://node1:8001/base#10.0.0.5``);
- an IP literal, ``localhost`` or a name under ``.localhost`` or ``.invalid`` (RFC 6761: no DNS server
  answers for them) stays as it is.

Without ``nameservers``, a name DNS does not know (or a DNS that does not answer) is also asked of the
system resolver (``getaddrinfo``: ``/etc/hosts``, nsswitch), as a connection by name would have been;
its addresses are kept for ``max_refresh_s``, as it gives no TTL.

Each result carries how long it may be kept: the smallest TTL among the records used, clamped to
``[min_refresh_s, max_refresh_s]``. A failed lookup (timeout, SERVFAIL, no server) raises
``DnsLookupFailed`` and the caller keeps the members it had (fail-static, retried after
``failure_retry_s``); a name that does not exist (NXDOMAIN) or has no address records is an answer,
an empty one. What a DNS server sends is bounded: at most ``max_addresses`` members per upstream.

Lookups use dnspython's asynchronous resolver (no thread, no blocking ``getaddrinfo``), with the system's
``/etc/resolv.conf`` unless ``nameservers`` names servers (``"10.0.0.2"`` or ``"127.0.0.1:5353"``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from prequal_middleware.core.member_url import pin_address
from prequal_middleware.exceptions import ConfigurationError, DnsLookupFailed

# Never looked up: names RFC 6761 says no DNS server answers for (a test double's backends use .invalid).
STATIC_NAMES = frozenset({"localhost"})
STATIC_SUFFIXES = (".localhost", ".invalid")
# An SRV target that may go into a member's URL: a host name of letters, digits, "-" and ".".
_TARGET_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


@dataclass(frozen=True)
class DnsSettings:
    """How upstream names are resolved.

    Parameters:
        enabled: expand upstreams named by DNS (else a name is one member, resolved per connection).
        nameservers: servers to ask (``"ip"`` or ``"ip:port"``); empty: the system's resolver config.
        timeout_s: the longest one lookup (all its queries and retries) may take.
        min_refresh_s / max_refresh_s: the bounds a record's TTL is clamped to before the next lookup.
        failure_retry_s: when to try again after a failed lookup.
        max_addresses: members one upstream may expand to (the rest of an answer is ignored).
    """

    enabled: bool = True
    nameservers: tuple[str, ...] = ()
    timeout_s: float = 2.0
    min_refresh_s: float = 1.0
    max_refresh_s: float = 30.0
    failure_retry_s: float = 5.0
    max_addresses: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigurationError(f"DnsSettings.enabled must be true or false, got {self.enabled!r}")
        if isinstance(self.nameservers, str):
            raise ConfigurationError("DnsSettings.nameservers must be a list of addresses, not a string")
        object.__setattr__(self, "nameservers", tuple(self.nameservers))
        for server in self.nameservers:
            _nameserver(server)
        for name in ("timeout_s", "min_refresh_s", "max_refresh_s", "failure_retry_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf):
                raise ConfigurationError(f"DnsSettings.{name} must be a positive number of seconds, got {value!r}")
        if self.min_refresh_s > self.max_refresh_s:
            raise ConfigurationError("DnsSettings.min_refresh_s must not exceed max_refresh_s")
        if not (isinstance(self.max_addresses, int) and self.max_addresses >= 1):
            raise ConfigurationError(f"DnsSettings.max_addresses must be an integer >= 1, got {self.max_addresses!r}")


@dataclass(frozen=True)
class Expansion:
    """What one upstream URL stands for (member URLs, in a stable order) and for how long."""

    members: tuple[str, ...]
    ttl_s: float


def needs_resolving(url: str) -> bool:
    """Whether ``url``'s host is a DNS name to expand (not an IP literal, not a static name)."""
    host = urlsplit(url).hostname or ""
    if host in STATIC_NAMES or host.endswith(STATIC_SUFFIXES):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def is_srv(url: str) -> bool:
    """An SRV upstream: ``_service._proto.name`` with no port."""
    split = urlsplit(url)
    labels = (split.hostname or "").split(".")
    return len(labels) >= 3 and labels[0].startswith("_") and labels[1].startswith("_") and split.port is None


class DnsResolver:
    """Expands upstream URLs through DNS (see the module docstring); one per gateway."""

    def __init__(self, settings: DnsSettings | None = None) -> None:
        self.settings = settings or DnsSettings()
        resolver = dns.asyncresolver.Resolver(configure=not self.settings.nameservers)
        if self.settings.nameservers:
            parsed = [_nameserver(s) for s in self.settings.nameservers]
            resolver.nameservers = [host for host, _ in parsed]
            resolver.port = parsed[0][1]  # dnspython asks every server on one port
        resolver.cache = None  # we schedule by TTL ourselves; a cache would hide changes for its lifetime
        self._resolver = resolver

    async def expand(self, url: str) -> Expansion:
        """The members ``url`` stands for now; raises ``DnsLookupFailed`` when DNS gave no answer."""
        split = urlsplit(url)
        host = split.hostname or ""
        if not needs_resolving(url):
            return Expansion((url,), self.settings.max_refresh_s)
        if is_srv(url):
            return await self._expand_srv(url, host)
        addresses, ttl = await self._addresses(host)
        return self._bounded([pin_address(url, address) for address in addresses], ttl)

    async def _expand_srv(self, url: str, name: str) -> Expansion:
        split = urlsplit(url)
        answer = await self._query(name, "SRV")
        if answer is None or answer.rrset is None:
            return self._bounded([], self.settings.max_refresh_s)
        ttl = float(answer.rrset.ttl)
        targets = sorted(
            ((r.priority, -r.weight, str(r.target).rstrip("."), int(r.port)) for r in answer),
            key=lambda t: (t[0], t[1], t[2], t[3]),
        )
        # A target is a name a DNS server chose: only a plain host name goes into a member's URL (one with
        # "/", "#", "@" or ":" would shape the URL), "." means "not here" (RFC 2782). Looked up together,
        # so a long answer costs one lookup's time, not one per target.
        chosen = [
            (target, port)
            for _, _, target, port in targets[: self.settings.max_addresses]
            if _TARGET_NAME.fullmatch(target)
        ]
        names = list(dict.fromkeys(target for target, _ in chosen))
        found = dict(zip(names, await asyncio.gather(*(self._addresses(name) for name in names)), strict=True))
        members: list[str] = []
        for target, port in chosen:
            addresses, target_ttl = found[target]
            ttl = min(ttl, target_ttl)
            base = urlunsplit((split.scheme, f"{target}:{port}", split.path, "", ""))
            members.extend(pin_address(base, address) for address in addresses)
        return self._bounded(members, ttl)

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        try:
            a, aaaa = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        except DnsLookupFailed:
            fallback = await self._system(name)
            if fallback is None:
                raise
            return fallback, self.settings.max_refresh_s
        addresses: list[str] = []
        ttl = self.settings.max_refresh_s
        for answer in (a, aaaa):
            if answer is not None and answer.rrset is not None:
                ttl = min(ttl, float(answer.rrset.ttl))
                addresses.extend(sorted(str(r.address) for r in answer))
        if not addresses:
            fallback = await self._system(name)
            if fallback:
                return fallback, self.settings.max_refresh_s
        return addresses, ttl

    async def _system(self, name: str) -> list[str] | None:
        """The system resolver's addresses for ``name`` (``/etc/hosts`` and the like), only when no
        nameservers are configured; ``None`` when it knows none either."""
        if self.settings.nameservers:
            return None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return None
        found = sorted({str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)})
        return found or None

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """An answer, ``None`` for "no such name / no such records", ``DnsLookupFailed`` for no answer."""
        try:
            return await self._resolver.resolve(
                name, rdtype, lifetime=self.settings.timeout_s, search=False, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise DnsLookupFailed(f"DNS lookup of {name} ({rdtype}) failed: {exc}") from None
        except dns.exception.DNSException as exc:
            raise DnsLookupFailed(f"DNS lookup of {name} ({rdtype}) failed: {type(exc).__name__}") from None

    def _bounded(self, members: list[str], ttl: float) -> Expansion:
        unique = tuple(dict.fromkeys(members))[: self.settings.max_addresses]
        clamped = min(max(ttl, self.settings.min_refresh_s), self.settings.max_refresh_s)
        return Expansion(unique, clamped)


def _nameserver(server: str) -> tuple[str, int]:
    text = server.strip()
    host, port = text, 53
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else 53
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ConfigurationError(f"DnsSettings.nameservers: bad port in {server!r}")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigurationError(
            f"DnsSettings.nameservers must be IP addresses (with an optional port), got {server!r}"
        ) from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"DnsSettings.nameservers: port out of range in {server!r}")
    return host, port

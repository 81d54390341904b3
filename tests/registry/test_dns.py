"""DNS discovery against a real DNS server on loopback: A/AAAA and SRV expansion, TTLs, failures, bounds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prequal_middleware.exceptions import ConfigurationError
from prequal_middleware.registry.dns import (
    DnsLookupFailed,
    DnsResolver,
    DnsSettings,
    is_srv,
    needs_resolving,
)
from tests.dns_server import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def resolver(server: DnsServer, **settings: object) -> DnsResolver:
    return DnsResolver(DnsSettings(nameservers=(server.address,), **settings))  # type: ignore[arg-type]


async def test_a_name_stands_for_all_its_addresses(dns_server: DnsServer) -> None:
    dns_server.set("api.test.", a=["127.0.0.2", "127.0.0.1"], aaaa=["::1"], ttl=7)
    expansion = await resolver(dns_server).expand("http://api.test:8000/base")
    assert expansion.members == (
        "http://api.test:8000/base#127.0.0.1",
        "http://api.test:8000/base#127.0.0.2",
        "http://api.test:8000/base#::1",
    )
    assert expansion.ttl_s == 7


async def test_the_default_port_and_https(dns_server: DnsServer) -> None:
    dns_server.set("secure.test.", a=["127.0.0.9"])
    expansion = await resolver(dns_server).expand("https://secure.test")
    assert expansion.members == ("https://secure.test#127.0.0.9",)


async def test_srv_lists_targets_and_ports(dns_server: DnsServer) -> None:
    dns_server.set_srv(
        "_http._tcp.svc.test.", [(10, 5, 8001, "node1.test."), (10, 5, 8002, "node2.test."), (0, 0, 0, ".")], ttl=20
    )
    dns_server.set("node1.test.", a=["127.0.0.11"], ttl=4)
    dns_server.set("node2.test.", a=["127.0.0.12", "127.0.0.13"], ttl=30)
    expansion = await resolver(dns_server).expand("http://_http._tcp.svc.test/v1")
    assert expansion.members == (
        "http://node1.test:8001/v1#127.0.0.11",
        "http://node2.test:8002/v1#127.0.0.12",
        "http://node2.test:8002/v1#127.0.0.13",
    )
    assert expansion.ttl_s == 4  # the smallest TTL among the records used


@pytest.mark.parametrize(("ttl", "expected"), [(0, 1.0), (3, 3.0), (86400, 30.0)])
async def test_ttl_is_clamped(dns_server: DnsServer, ttl: int, expected: float) -> None:
    dns_server.set("t.test.", a=["127.0.0.1"], ttl=ttl)
    assert (await resolver(dns_server).expand("http://t.test:1")).ttl_s == expected


async def test_a_missing_name_is_an_empty_answer_not_a_failure(dns_server: DnsServer) -> None:
    expansion = await resolver(dns_server).expand("http://nope.test:1")
    assert expansion.members == ()


async def test_a_failing_server_is_a_failed_lookup(dns_server: DnsServer) -> None:
    dns_server.failing = True
    with pytest.raises(DnsLookupFailed, match="nope.test"):
        await resolver(dns_server, timeout_s=0.5).expand("http://nope.test:1")


async def test_no_server_is_a_failed_lookup_within_the_timeout() -> None:
    from tests.servers import free_port

    silent = DnsResolver(DnsSettings(nameservers=(f"127.0.0.1:{free_port()}",), timeout_s=0.3))
    with pytest.raises(DnsLookupFailed):
        await silent.expand("http://api.test:1")


async def test_answers_are_bounded(dns_server: DnsServer) -> None:
    dns_server.set("many.test.", a=[f"127.0.1.{i}" for i in range(1, 60)])
    expansion = await resolver(dns_server, max_addresses=8).expand("http://many.test:1")
    assert len(expansion.members) == 8


async def test_no_caching_between_lookups(dns_server: DnsServer) -> None:
    dns_server.set("moving.test.", a=["127.0.0.1"], ttl=300)
    r = resolver(dns_server)
    assert list((await r.expand("http://moving.test:1")).members) == ["http://moving.test:1#127.0.0.1"]
    dns_server.set("moving.test.", a=["127.0.0.2"], ttl=300)
    assert list((await r.expand("http://moving.test:1")).members) == ["http://moving.test:1#127.0.0.2"]


async def test_literals_and_localhost_are_not_looked_up(dns_server: DnsServer) -> None:
    r = resolver(dns_server)
    for url in ("http://127.0.0.1:5", "http://localhost:5", "http://[::1]:5"):
        assert (await r.expand(url)).members == (url,)
    assert sum(dns_server.records.queries.values()) == 0


def test_which_urls_resolve() -> None:
    assert needs_resolving("http://api.internal:8000")
    assert not needs_resolving("http://10.0.0.5:8000")
    assert not needs_resolving("http://[fd00::1]:8000")
    assert not needs_resolving("http://localhost:8000")
    assert is_srv("http://_http._tcp.api.internal")
    assert not is_srv("http://_http._tcp.api.internal:80")
    assert not is_srv("http://api.internal")


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"nameservers": "127.0.0.1"}, "nameservers"),
        ({"nameservers": ("dns.example",)}, "nameservers"),
        ({"nameservers": ("127.0.0.1:abc",)}, "nameservers"),
        ({"nameservers": ("127.0.0.1:70000",)}, "nameservers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_refresh_s": float("inf")}, "max_refresh_s"),
        ({"min_refresh_s": 10, "max_refresh_s": 5}, "min_refresh_s"),
        ({"max_addresses": 0}, "max_addresses"),
    ],
)
def test_bad_settings_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"DnsSettings.{field}"):
        DnsSettings(**settings)  # type: ignore[arg-type]


async def test_srv_targets_that_are_not_host_names_are_skipped(dns_server: DnsServer) -> None:
    dns_server.set_srv("_http._tcp.mixed.test.", [(10, 1, 8001, "ok.test."), (10, 1, 8002, "bad/path#x.test.")])
    dns_server.set("ok.test.", a=["127.0.0.21"])
    dns_server.set("bad/path#x.test.", a=["127.0.0.22"])  # it resolves: only its name keeps it out
    expansion = await resolver(dns_server).expand("http://_http._tcp.mixed.test")
    assert expansion.members == ("http://ok.test:8001#127.0.0.21",)

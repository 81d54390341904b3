"""Upstreams named by DNS, through a real gateway and a real DNS server on loopback: a name stands for
all its addresses, follows DNS as it changes (TTL), keeps its members while DNS fails, and an SRV name
stands for its targets and ports."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from prequal_middleware import Gateway, UpstreamPool
from prequal_middleware.config import HealthSettings
from prequal_middleware.registry.dns import DnsResolver, DnsSettings
from tests.apps import make_backend
from tests.dns_server import DnsServer
from tests.helpers import gateway_app, members, wait_for
from tests.servers import ServerThread, free_port, serve


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def fast_dns(server: DnsServer) -> DnsSettings:
    return DnsSettings(nameservers=(server.address,), min_refresh_s=0.1, max_refresh_s=1.0, failure_retry_s=0.1)


@pytest.fixture
def twin_backends() -> Iterator[tuple[int, dict[str, object]]]:
    """Two backends on one port, at 127.0.0.1 and 127.0.0.2 (what one name with two A records reaches)."""
    port = free_port()
    app1, state1 = make_backend("one")
    app2, state2 = make_backend("two")
    first = ServerThread(app1, host="127.0.0.1", port=port).start()
    second = ServerThread(app2, host="127.0.0.2", port=port).start()
    try:
        yield port, {"one": state1, "two": state2}
    finally:
        first.stop()
        second.stop()


def spread(url: str, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client() as client:
        for _ in range(count):
            response = client.get(url + "/api/x")
            seen[response.json()["backend"] if response.status_code == 200 else str(response.status_code)] += 1
    return seen


def gateway_for(upstream: str, dns: DnsSettings) -> Gateway:
    pool = UpstreamPool("/api", upstreams=[upstream], policy="round_robin", health=HealthSettings(path=None))
    return Gateway([pool], dns=dns)


def test_a_name_stands_for_all_its_addresses_and_follows_dns(
    dns_server: DnsServer, twin_backends: tuple[int, dict[str, object]]
) -> None:
    port, _ = twin_backends
    dns_server.set("api.test.", a=["127.0.0.1", "127.0.0.2"], ttl=1)
    gateway = gateway_for(f"http://api.test:{port}", fast_dns(dns_server))
    with serve(gateway_app(gateway)) as g:
        # Resolved before the gateway served its first request: no empty window.
        first = httpx.get(g.url + "/api/x")
        assert first.status_code == 200
        assert dict(first.json()["headers"])["host"] == f"api.test:{port}"
        assert set(members(g.url)) == {f"http://api.test:{port}#127.0.0.1", f"http://api.test:{port}#127.0.0.2"}
        assert spread(g.url, 20) == Counter({"one": 10, "two": 10})

        dns_server.set("api.test.", a=["127.0.0.2"], ttl=1)  # one address leaves DNS
        wait_for(lambda: set(members(g.url)) == {f"http://api.test:{port}#127.0.0.2"}, 5, "the member to leave")
        assert spread(g.url, 10) == Counter({"two": 10})

        dns_server.failing = True  # DNS down: the members stay
        queries = dns_server.count("api.test.", "A")
        wait_for(lambda: dns_server.count("api.test.", "A") > queries + 2, 5, "retries while failing")
        assert set(members(g.url)) == {f"http://api.test:{port}#127.0.0.2"}
        assert spread(g.url, 5) == Counter({"two": 5})

        dns_server.failing = False
        dns_server.remove("api.test.")  # the name is gone: so are its members
        wait_for(lambda: members(g.url) == {}, 5, "the pool to empty")
        assert spread(g.url, 3) == Counter({"503": 3})


def test_an_srv_name_stands_for_its_targets_and_ports(dns_server: DnsServer) -> None:
    app1, _ = make_backend("n1")
    app2, _ = make_backend("n2")
    with serve(app1) as b1, serve(app2) as b2:
        dns_server.set_srv("_http._tcp.svc.test.", [(10, 1, b1.port, "node1.test."), (10, 1, b2.port, "node2.test.")])
        dns_server.set("node1.test.", a=["127.0.0.1"])
        dns_server.set("node2.test.", a=["127.0.0.1"])
        gateway = gateway_for("http://_http._tcp.svc.test", fast_dns(dns_server))
        with serve(gateway_app(gateway)) as g:
            assert set(members(g.url)) == {
                f"http://node1.test:{b1.port}#127.0.0.1",
                f"http://node2.test:{b2.port}#127.0.0.1",
            }
            assert spread(g.url, 10) == Counter({"n1": 5, "n2": 5})
            response = httpx.get(g.url + "/api/x")
            assert dict(response.json()["headers"])["host"] in (f"node1.test:{b1.port}", f"node2.test:{b2.port}")


def test_with_dns_off_a_name_is_one_member(dns_server: DnsServer) -> None:
    gateway = gateway_for("http://api.test:9", DnsSettings(enabled=False, nameservers=(dns_server.address,)))
    with serve(gateway_app(gateway)) as g:
        assert set(members(g.url)) == {"http://api.test:9"}
    assert dns_server.count("api.test.", "A") == 0


async def test_without_nameservers_the_system_resolver_answers_what_dns_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolver = DnsResolver(DnsSettings(timeout_s=0.5))

    async def nxdomain(name: str, rdtype: str) -> None:
        return None  # what dnspython gives for NXDOMAIN

    monkeypatch.setattr(resolver, "_query", nxdomain)
    expansion = await resolver.expand(f"http://{socket.gethostname()}:8000")  # /etc/hosts knows this one
    assert expansion.members
    assert all(m.startswith(f"http://{socket.gethostname()}:8000#") for m in expansion.members)
    assert expansion.ttl_s == resolver.settings.max_refresh_s


def test_dns_settings_from_the_environment() -> None:
    from prequal_middleware.envconfig import dns_from_env
    from prequal_middleware.exceptions import ConfigurationError

    assert dns_from_env({}) == DnsSettings()
    got = dns_from_env(
        {"PREQUAL_DNS": "off", "PREQUAL_DNS_NAMESERVERS": "10.0.0.2, 127.0.0.1:5353", "PREQUAL_DNS_REFRESH_S": "10"}
    )
    assert (got.enabled, got.nameservers, got.max_refresh_s) == (False, ("10.0.0.2", "127.0.0.1:5353"), 10.0)
    for env, variable in (
        ({"PREQUAL_DNS": "perhaps"}, "PREQUAL_DNS"),
        ({"PREQUAL_DNS_NAMESERVERS": "dns.example"}, "PREQUAL_DNS_NAMESERVERS"),
        ({"PREQUAL_DNS_REFRESH_S": "soon"}, "PREQUAL_DNS_REFRESH_S"),
        ({"PREQUAL_DNS_REFRESH_S": "-1"}, "PREQUAL_DNS_REFRESH_S"),
    ):
        with pytest.raises(ConfigurationError, match=variable):
            dns_from_env(env)


def test_srv_names_are_for_configured_upstreams_only() -> None:
    from prequal_middleware.config import validate_upstream_url
    from prequal_middleware.exceptions import ConfigurationError

    assert validate_upstream_url("http://_HTTP._tcp.Api.Test/v1", allow_srv=True) == "http://_http._tcp.api.test/v1"
    with pytest.raises(ConfigurationError, match="takes no port"):
        validate_upstream_url("http://_http._tcp.api.test:80", allow_srv=True)
    with pytest.raises(ConfigurationError, match="host name"):
        validate_upstream_url("http://_http._tcp.api.test")  # a registration: no SRV


async def test_startup_resolves_every_name_before_it_returns(dns_server: DnsServer) -> None:
    dns_server.set("api.test.", a=["127.0.0.1", "127.0.0.2"])
    gateway = gateway_for("http://api.test:9", fast_dns(dns_server))
    assert dict(gateway.pools["/api"].members) == {}  # a name is no member until DNS answers
    await gateway.startup()
    try:
        assert set(gateway.pools["/api"].members) == {"http://api.test:9#127.0.0.1", "http://api.test:9#127.0.0.2"}
    finally:
        await gateway.shutdown()

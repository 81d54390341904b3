"""Configuration from PREQUAL_* variables: what is accepted, and errors that name the variable."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from prequal_middleware import (
    ConfigurationError,
    Gateway,
    HistorySettings,
    MemoryRegistry,
    RoundRobinPolicy,
    UpstreamTLS,
)
from prequal_middleware.cli import environ_from_file
from prequal_middleware.envconfig import gateway_kwargs_from_env, pools_from_env
from prequal_middleware.reload import poll_interval
from tests.test_upstream_tls import _ca as make_ca


def seen_hook(record: object) -> None:
    """A hook for PREQUAL_REGISTER_HOOK."""


def rewrite(target: str) -> str:
    return "/v2" + target


def test_default_is_one_registration_pool() -> None:
    pools = pools_from_env({})
    assert [(p.prefix, p.upstreams, p.policy) for p in pools] == [("/api", (), "prequal")]


def test_pools_lists_and_objects() -> None:
    pools = pools_from_env(
        {
            "PREQUAL_POOLS": '{"/api": ["http://127.0.0.1:8001/"], "/s": {"upstreams": [], "policy": "peak_ewma",'
            ' "strip_prefix": false, "timeouts": {"connect_s": 0.5}, "prequal": {"q_rif": 0.6},'
            ' "max_in_flight_per_backend": 8}}',
            "PREQUAL_POLICY": "round_robin",
            "PREQUAL_HEALTH_PATH": "/health",
            "PREQUAL_PROBE_PATH": "/probe",
            "PREQUAL_PATH_REWRITE_HOOK": "tests.test_envconfig:rewrite",
        }
    )
    api, s = pools
    assert (api.prefix, api.upstreams, api.policy) == ("/api", ("http://127.0.0.1:8001",), "round_robin")
    assert (s.policy, s.strip_prefix, s.timeouts.connect_s, s.prequal.q_rif) == ("peak_ewma", False, 0.5, 0.6)
    assert s.max_in_flight_per_backend == 8
    assert api.health.path == "/health" and api.probes.path == "/probe"
    assert api.rewrite_path is rewrite and s.rewrite_path is rewrite


def test_policy_by_class_path() -> None:
    (pool,) = pools_from_env({"PREQUAL_POLICY": "prequal_middleware.core:RoundRobinPolicy"})
    assert pool.policy is RoundRobinPolicy


def test_gateway_from_env() -> None:
    gateway = Gateway.from_env(
        {
            "PREQUAL_POOLS": '{"/a": [], "/b": []}',
            "PREQUAL_REGISTRATION_TOKEN": "a-long-token",
            "PREQUAL_ALLOWED_UPSTREAMS": "10.0.0.0/8, *.svc",
            "PREQUAL_LEASE_TTL_S": "12",
            "PREQUAL_REGISTER_HOOK": "tests.test_envconfig:seen_hook",
        }
    )
    assert list(gateway.pools) == ["/a", "/b"]
    assert isinstance(gateway.registry, MemoryRegistry)
    assert gateway.admin.token == "a-long-token"
    assert gateway.admin.allowed_upstreams == ("10.0.0.0/8", "*.svc")
    assert gateway.admin.default_ttl_s == 12.0
    assert gateway.membership.on_register is seen_hook


def test_redis_registry_from_a_url() -> None:
    pytest.importorskip("redis")
    kwargs = gateway_kwargs_from_env({"PREQUAL_REGISTRY": "redis://127.0.0.1:6399/2"})
    assert kwargs["registry"].kind == "redis"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREQUAL_POOLS": "{nope"}, r"PREQUAL_POOLS is not valid JSON"),
        ({"PREQUAL_POOLS": "[]"}, r"PREQUAL_POOLS must be a JSON object"),
        ({"PREQUAL_POOLS": '{"api": []}'}, r"PREQUAL_POOLS\['api'\].*prefix must be"),
        ({"PREQUAL_POOLS": '{"/api": ["ftp://x"]}'}, r"PREQUAL_POOLS\['/api'\].*http or https"),
        ({"PREQUAL_POOLS": '{"/api": {"upstream": []}}'}, r"unknown setting 'upstream'"),
        (
            {"PREQUAL_POOLS": '{"/api": {"timeouts": {"connect": 1}}}'},
            r"\['/api'\]\.timeouts has an unknown setting 'connect'",
        ),
        ({"PREQUAL_POOLS": '{"/api": {"prequal": {"q_rif": 2}}}'}, r"prequal: q_rif must be"),
        ({"PREQUAL_POLICY": "fastest"}, r"PREQUAL_POLICY must be one of"),
        ({"PREQUAL_POLICY": "no_such_module_x:Policy"}, r"PREQUAL_POLICY: cannot import module"),
        ({"PREQUAL_REGISTRY": "etcd://x"}, r"PREQUAL_REGISTRY must be 'memory'"),
        ({"PREQUAL_REGISTRATION_TOKEN": "short"}, r"PREQUAL_REGISTRATION_TOKEN"),
        ({"PREQUAL_ALLOWED_UPSTREAMS": "10.0.0.0/8, bad host"}, r"PREQUAL_ALLOWED_UPSTREAMS"),
        ({"PREQUAL_LEASE_TTL_S": "soon"}, r"PREQUAL_LEASE_TTL_S must be a number"),
        ({"PREQUAL_TRANSPORT": "httpx"}, r"PREQUAL_TRANSPORT must be 'h1' or 'aiohttp', got 'httpx'"),
        ({"PREQUAL_REQUEST_HOOK": "tests.test_envconfig:nothing_here"}, r"PREQUAL_REQUEST_HOOK: module"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Gateway.from_env(env)


def test_transport_is_chosen_by_name() -> None:
    from prequal_middleware.transports.aiohttp import AiohttpTransport
    from prequal_middleware.transports.http1 import H1Transport

    assert isinstance(Gateway.from_env({"PREQUAL_TRANSPORT": "h1"})._transport, H1Transport)
    assert isinstance(Gateway.from_env({"PREQUAL_TRANSPORT": "aiohttp"})._transport, AiohttpTransport)
    assert Gateway.from_env({})._transport is None  # the gateway's default, opened at startup
    assert Gateway.from_env({"PREQUAL_TRANSPORT": " "})._transport is None


def test_booleans_are_read_deliberately() -> None:
    # pydantic's lax booleans: JSON false, "false", "off", 0 are False; anything else is an error naming the key.
    pools = pools_from_env(
        {
            "PREQUAL_POOLS": '{"/a": {"strip_prefix": "false"}, "/b": {"strip_prefix": 0, "websockets": "off"},'
            ' "/c": {"preserve_host": "TRUE"}}'
        }
    )
    assert [(p.strip_prefix, p.websockets, p.preserve_host) for p in pools] == [
        (False, True, False),
        (False, False, False),
        (True, True, True),
    ]
    assert gateway_kwargs_from_env({"PREQUAL_ADMIN_TRUST_LOOPBACK": " Yes "})["admin"].trust_loopback is True
    assert gateway_kwargs_from_env({"PREQUAL_ADMIN_TRUST_LOOPBACK": "off"})["admin"].trust_loopback is False


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        (
            '{"/api": {"strip_prefix": "yes please"}}',
            "PREQUAL_POOLS['/api'].strip_prefix must be a boolean (true/false, 1/0, yes/no, on/off), got 'yes please'",
        ),
        (
            '{"u": {"routes": [{"prefix": "/v1", "websockets": "nah"}]}}',
            "PREQUAL_POOLS['u'].routes[0].websockets must be a boolean (true/false, 1/0, yes/no, on/off), got 'nah'",
        ),
        (
            '{"/api": {"timeouts": {"connect_s": true}}}',
            "PREQUAL_POOLS['/api'].timeouts.connect_s must be a number, not a boolean, got True",
        ),
        ('{"/api": {"max_in_flight": true}}', "PREQUAL_POOLS['/api'].max_in_flight must be an integer, not a boolean"),
        ('{"/api": {"max_in_flight": 2.5}}', "PREQUAL_POOLS['/api'].max_in_flight must be an integer, got 2.5"),
        ('{"/api": {"timeouts": 5}}', "PREQUAL_POOLS['/api'].timeouts must be an object, got 5"),
        ('{"/api": 5}', "PREQUAL_POOLS['/api'] must be a list of URLs or an object, got 5"),
        ('{"/api": ["http://127.0.0.1:1", 1]}', "PREQUAL_POOLS['/api'].upstreams[1] must be a string, got 1"),
        (
            '{"/api": {"prequal": {"fallback": "best"}}}',
            "PREQUAL_POOLS['/api'].prequal.fallback must be 'least_in_flight' or 'random', got 'best'",
        ),
    ],
)
def test_wrong_types_name_the_key(pools: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        pools_from_env({"PREQUAL_POOLS": pools})
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREQUAL_LEASE_TTL_S": "inf"}, "PREQUAL_LEASE_TTL_S: AdminSettings.default_ttl_s must be a finite number"),
        ({"PREQUAL_ADMIN_PATH": "admin/"}, "PREQUAL_ADMIN_PATH must be a path like /_prequal, got 'admin/'"),
        ({"PREQUAL_PROBE_PATH": "probe"}, "PREQUAL_PROBE_PATH: ProbeSettings.path must be a path starting with '/'"),
        ({"PREQUAL_DNS": "perhaps"}, "PREQUAL_DNS must be a boolean"),
    ],
)
def test_more_bad_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        gateway_kwargs_from_env(env)
    assert str(raised.value).startswith(message)


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings reads os.environ by default: a mapping passed in must be the whole environment.
    monkeypatch.setenv("PREQUAL_TRANSPORT", "carrier-pigeon")
    monkeypatch.setenv("PREQUAL_POOLS", '{"/from-os": []}')
    assert [p.prefix for p in pools_from_env({})] == ["/api"]
    assert "transport" not in gateway_kwargs_from_env({})
    with pytest.raises(ConfigurationError, match="PREQUAL_TRANSPORT must be"):
        gateway_kwargs_from_env()  # None: the process environment


@pytest.mark.parametrize(
    ("value", "fmt"), [(None, None), ("", None), ("off", None), ("json", "json"), (" Plain ", "plain")]
)
def test_the_access_log_variable(value: str | None, fmt: str | None) -> None:
    gateway = Gateway.from_env({} if value is None else {"PREQUAL_ACCESS_LOG": value})
    access_log = gateway.observe.access_log
    assert (access_log.settings.format if access_log is not None else None) == fmt


@pytest.mark.parametrize(
    ("value", "header"),
    [(None, b"x-request-id"), ("on", b"x-request-id"), ("", None), ("off", None), ("false", None),
     ("X-Correlation-ID", b"x-correlation-id")],
)  # fmt: skip
def test_the_request_id_variable(value: str | None, header: bytes | None) -> None:
    gateway = Gateway.from_env({} if value is None else {"PREQUAL_REQUEST_ID_HEADER": value})
    assert gateway.observe.request_id == header


def test_tracing_and_history_variables() -> None:
    gateway = Gateway.from_env(
        {
            "PREQUAL_TRACING": "yes",
            "PREQUAL_HISTORY_WINDOW_S": "60",
            "PREQUAL_HISTORY_STEP_S": "2",
            "PREQUAL_HISTORY_MAX_BACKENDS": "3",
        }
    )
    assert gateway.observe.tracing is not None
    assert gateway.history.settings == HistorySettings(window_s=60, step_s=2, max_backends=3)
    assert Gateway.from_env({"PREQUAL_TRACING": "off"}).observe.tracing is None
    assert Gateway.from_env({}).history.settings == HistorySettings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREQUAL_ACCESS_LOG": "xml"}, "PREQUAL_ACCESS_LOG must be 'off', 'json' or 'plain', got 'xml'"),
        ({"PREQUAL_REQUEST_ID_HEADER": "x id"}, "PREQUAL_REQUEST_ID_HEADER must be a header name, or off, got 'x id'"),
        ({"PREQUAL_TRACING": "sometimes"}, "PREQUAL_TRACING must be a boolean"),
        ({"PREQUAL_HISTORY_STEP_S": "0"}, "PREQUAL_HISTORY_STEP_S: HistorySettings.step_s must be a number >= 0.1"),
        ({"PREQUAL_HISTORY_MAX_BACKENDS": "2.5"}, "PREQUAL_HISTORY_MAX_BACKENDS must be an integer, got '2.5'"),
        ({"PREQUAL_HISTORY_MAX_BACKENDS": "99"}, "PREQUAL_HISTORY_MAX_BACKENDS: HistorySettings.max_backends must be"),
        ({"PREQUAL_CONFIG_POLL_S": "-1"}, "PREQUAL_CONFIG_POLL_S must be >= 0"),
        ({"PREQUAL_CONFIG_POLL_S": "inf"}, "PREQUAL_CONFIG_POLL_S must be a finite number, got 'inf'"),
    ],
)
def test_bad_values_of_the_new_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        gateway_kwargs_from_env(env)
    assert str(raised.value).startswith(message)


def test_the_config_poll_interval() -> None:
    assert poll_interval({}) == 1.0
    assert poll_interval({"PREQUAL_CONFIG_POLL_S": "0"}) == 0.0
    assert poll_interval({"PREQUAL_CONFIG_POLL_S": " 2.5 "}) == 2.5


def test_the_new_keys_in_the_file_are_their_variables(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    make_ca(tmp_path, "ca")
    ca = tmp_path / "ca.pem"
    config = tmp_path / "prequal.toml"
    config.write_text(
        textwrap.dedent(f"""
            [gateway]
            access_log = "plain"
            request_id_header = false
            tracing = true
            config_poll_s = 0
            history_step_s = 1
            history_window_s = 120

            [pools."/api"]
            upstreams = ["https://127.0.0.1:8443"]
            required_for_ready = false
            tls = {{ ca_file = "{ca}", server_name = "api.internal", min_version = "TLSv1.3" }}
        """)
    )
    env, _ = environ_from_file(config)
    gateway = Gateway.from_env(env)
    assert gateway.observe.access_log is not None and gateway.observe.access_log.settings.format == "plain"
    assert gateway.observe.request_id is None
    assert gateway.observe.tracing is not None
    assert poll_interval(env) == 0.0
    assert gateway.history.settings == HistorySettings(window_s=120, step_s=1)
    pool = gateway.pools["/api"].config
    assert pool.required_for_ready is False
    assert pool.tls == UpstreamTLS(ca_file=str(ca), server_name="api.internal", min_version="TLSv1.3")

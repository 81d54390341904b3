"""``prequal-gateway`` and ``python -m prequal_middleware``: configuration from the environment and a TOML
file, one-line errors with exit status 2, and a real gateway served by the console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.apps import make_backend
from tests.helpers import consecutive_free_ports, wait_http
from tests.servers import serve
from tests.test_upstream_tls import _ca as make_ca, _signed as make_signed

SCRIPT = Path(sys.executable).parent / "prequal-gateway"
HEX32 = re.compile(r"[0-9a-f]{32}")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREQUAL_") and k != "WEB_CONCURRENCY"}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], *, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "prequal_middleware", *args] if module else [str(SCRIPT), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
def test_check_accepts_a_good_environment(module: bool) -> None:
    env = _clean_env(PREQUAL_POOLS=json.dumps({"/api": ["http://127.0.0.1:9"], "/b": []}))
    done = _run(["--check"], env, module=module)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "prequal-gateway: configuration ok: pools /api (1 upstreams), /b (0 upstreams); registry memory;"
        " admin at /_prequal"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREQUAL_POOLS": "{not json"}, "PREQUAL_POOLS is not valid JSON"),
        ({"PREQUAL_POOLS": '{"/api": ["ftp://x"]}'}, "PREQUAL_POOLS['/api']: UpstreamPool('/api').upstreams[0]"),
        (
            {"PREQUAL_ADMIN_TRUST_LOOPBACK": "maybe"},
            "PREQUAL_ADMIN_TRUST_LOOPBACK must be a boolean (true/false, 1/0, yes/no, on/off), got 'maybe'",
        ),
        ({"PREQUAL_TRANSPORT": "carrier-pigeon"}, "PREQUAL_TRANSPORT must be 'h1' or 'aiohttp'"),
        ({"PREQUAL_REGISTRY": "memory", "PREQUAL_WORKERS": "3"}, "the server runs 3 workers"),
        ({"PREQUAL_WORKERS": "zero"}, "PREQUAL_WORKERS must be a whole number"),
    ],
)
def test_a_bad_environment_is_one_line_and_status_2(env: dict[str, str], message: str) -> None:
    done = _run(["--check"], _clean_env(**env))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("prequal-gateway: error: ")
    assert message in lines[0]
    assert "Traceback" not in done.stderr


GOOD_TOML = """
[server]
port = 8123
workers = 2

[gateway]
registry = "sqlite:{db}"
registration_token = "a-long-random-secret"
allowed_upstreams = ["127.0.0.1", "10.0.0.0/8"]
admin_trust_loopback = false

[pools."/api"]
upstreams = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
policy = "round_robin"
timeouts = {{ connect_s = 0.5 }}
"""


def test_check_reads_a_toml_file_and_the_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    config.write_text(GOOD_TOML.format(db=tmp_path / "r.db"))
    done = _run(["--config", str(config), "--check"], _clean_env())
    assert done.returncode == 0, done.stderr
    assert "pools /api (2 upstreams); registry sqlite; admin at /_prequal" in done.stdout

    overridden = _run(["--config", str(config), "--check"], _clean_env(PREQUAL_POOLS='{"/other": []}'))
    assert overridden.returncode == 0, overridden.stderr
    assert "pools /other (0 upstreams)" in overridden.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 'eighty'\n", "[server].port must be an integer, got 'eighty'"),
        ("[server]\nthreads = 4\n", "[server] has an unknown key 'threads'"),
        ("[gateway]\nregistery = 'memory'\n", "[gateway] has an unknown key 'registery'"),
        ("[gateway]\npolicy = { name = 1 }\n", "[gateway].policy must be a string, number, boolean or list"),
        ("[gatway]\n", "unknown table 'gatway'"),
        ("[pools.\"/api\"]\nupstreams = 'http://x:1'\n", "PREQUAL_POOLS['/api'].upstreams must be a list"),
        ("[server\nport = 1\n", "invalid TOML"),
        ("[server]\nworkers = 0\n", "[server].workers must be >= 1, got 0"),
        ("[server]\nport = true\n", "[server].port must be an integer, got True"),
        ("[server]\nport = 70000\n", "[server].port must be <= 65535, got 70000"),
        ("[server]\nlog_level = 'loud'\n", "[server].log_level must be 'critical', 'error', 'warning', 'info' or"),
        ("[server]\nadmin_path = 'admin'\n", "[server].admin_path must be a path like /_prequal, got 'admin'"),
        ("server = 5\n", "[server] must be a table, got 5"),
        ("[pools.\"/api\"]\nstrip_prefix = 'yes please'\n", "PREQUAL_POOLS['/api'].strip_prefix must be a boolean"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    done = _run(["--config", str(config), "--check"], _clean_env())
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    done = _run(["--config", str(tmp_path / "nope.toml"), "--check"], _clean_env())
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"prequal-gateway: error: {tmp_path / 'nope.toml'}: cannot read the file (No such file or directory)"
    )


@contextmanager
def _gateway(args: list[str], env: dict[str, str]) -> Iterator[str]:
    port = consecutive_free_ports(1)
    process = subprocess.Popen(
        [str(SCRIPT), "--port", str(port), "--log-level", "warning", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/_prequal/healthz", timeout_s=30)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        finally:
            assert process.stderr is not None
            process.stderr.close()


def one_pool_config(tmp_path: Path, upstream: str) -> Path:
    """A configuration file with one pool, ``/api``, of one upstream."""
    config = tmp_path / "prequal.toml"
    config.write_text(
        textwrap.dedent(f"""
            [pools."/api"]
            upstreams = ["{upstream}"]
        """)
    )
    return config


def test_the_console_script_serves_a_gateway(tmp_path: Path) -> None:
    app, state = make_backend("b1")
    with serve(app) as backend:
        config = one_pool_config(tmp_path, backend.url)
        with _gateway(["--config", str(config)], _clean_env()) as url, httpx.Client() as client:
            proxied = client.get(url + "/api/hello?x=1")
            missing = client.get(url + "/elsewhere")
            backends = client.get(url + "/_prequal/backends")
    assert proxied.status_code == 200
    assert proxied.json()["backend"] == "b1"
    assert proxied.json()["raw_path"] == "/hello"
    # uvicorn adds neither header of its own: the backend's pass through, once each.
    assert len(proxied.headers.get_list("server")) <= 1
    assert len(proxied.headers.get_list("date")) == 1
    assert state.requests == 1
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    assert backends.status_code == 200
    assert backend.url in json.dumps(backends.json())


def test_workers_started_by_the_console_script_share_registrations() -> None:
    app, state = make_backend("late")
    with serve(app) as backend:
        env = _clean_env(PREQUAL_POOLS=json.dumps({"/api": []}), PREQUAL_ADMIN_TRUST_LOOPBACK="1")
        with _gateway(["--workers", "2"], env) as url:
            with httpx.Client() as client:
                answer = client.post(url + "/_prequal/register", json={"pool": "/api", "url": backend.url})
            assert answer.status_code in (200, 201), answer.text
            statuses, vias = [], set()
            for _ in range(60):
                with httpx.Client() as client:  # a new connection each time: the kernel spreads them
                    response = client.get(url + "/api/x")
                statuses.append(response.status_code)
                if response.status_code == 200:
                    vias.add(dict(response.json()["headers"])["via"])
    assert statuses[10:] == [200] * 50, statuses
    assert len(vias) >= 2, vias
    assert state.requests == statuses.count(200)


def test_the_readme_configuration_file_checks(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "prequal.toml"
    config.write_text(block)
    done = _run(["--config", str(config), "--check"], _clean_env(PREQUAL_REGISTRY_PATH=str(tmp_path / "r.db")))
    assert done.returncode == 0, done.stderr
    assert "pools /api (2 upstreams); registry sqlite" in done.stdout


def test_a_toml_pool_with_routes_checks(tmp_path: Path) -> None:
    config = tmp_path / "routes.toml"
    config.write_text(
        textwrap.dedent("""
            [pools.users]
            upstreams = ["http://127.0.0.1:9001"]
            routes = ["/v1/users", { prefix = "/v2/users", strip_prefix = false }]
        """)
    )
    done = _run(["--config", str(config), "--check"], _clean_env())
    assert done.returncode == 0, done.stderr
    assert "users" in done.stdout and "/v1/users" in done.stdout and "/v2/users" in done.stdout


# --- the features configured from the environment and the file, through the console script -----------


@dataclass
class Served:
    url: str
    out: Path  # the console script's stdout
    err: Path  # and stderr, complete once the block is left (the server stopped)


@contextmanager
def _served(args: list[str], env: dict[str, str], tmp_path: Path, *, log_level: str = "info") -> Iterator[Served]:
    """The console script with its stdout and stderr in files; stopped (SIGTERM) when the block ends."""
    port = consecutive_free_ports(1)
    out, err = tmp_path / f"{port}.out", tmp_path / f"{port}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "--port", str(port), "--log-level", log_level, *args], env=env, stdout=stdout, stderr=stderr
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/_prequal/healthz", timeout_s=30)
        yield Served(url, out, err)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _upstream_headers(response: httpx.Response) -> dict[str, str]:
    """The headers the echo backend received."""
    return {name: value for name, value in response.json()["headers"]}


needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None and not os.environ.get("CI"), reason="needs the openssl CLI"
)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA (``ca.pem``) and a server certificate it signed for 127.0.0.1 (``server.pem``, ``.key``)."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_signed(d, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    return d


@needs_openssl
def test_a_toml_pool_with_tls_reaches_an_https_backend_through_its_ca(tmp_path: Path, private_ca: Path) -> None:
    app, state = make_backend("tls")
    with serve(app, ssl_certfile=str(private_ca / "server.pem"), ssl_keyfile=str(private_ca / "server.key")) as up:
        backend = f"https://127.0.0.1:{up.port}"
        config = tmp_path / "tls.toml"
        config.write_text(
            textwrap.dedent(f"""
                [pools."/trusted"]
                upstreams = ["{backend}"]
                tls = {{ ca_file = "{private_ca / "ca.pem"}", server_name = "localhost", min_version = "TLSv1.2" }}

                [pools."/system"]             # the system's CAs: the private CA is not among them
                upstreams = ["{backend}"]
            """)
        )
        env = _clean_env(PREQUAL_HEALTH_PATH="")  # no health checks: the failing pool's member stays eligible
        with _served(["--config", str(config)], env, tmp_path) as gw, httpx.Client() as client:
            trusted = client.get(gw.url + "/trusted/x")
            system = client.get(gw.url + "/system/x")
    assert trusted.status_code == 200, trusted.text
    assert trusted.json()["backend"] == "tls" and trusted.json()["raw_path"] == "/x"
    assert state.paths == ["/x"]  # probes aside, only the trusted pool's request arrived
    assert system.status_code == 502, system.text
    assert system.json()["error"] == "upstream_tls_error" and system.json()["pool"] == "/system"


@needs_openssl
@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ('{ ca_file = "<missing>" }', "PREQUAL_POOLS['/api'].tls.ca_file must name an existing file, got '<missing>'"),
        (
            '{ ca_file = "<not-pem>" }',
            "PREQUAL_POOLS['/api'].tls.ca_file: cannot load '<not-pem>' as PEM CA certificates",
        ),
        (
            '{ ca_file = "<ca>", cert_file = "<ca>", key_file = "<key>" }',
            "PREQUAL_POOLS['/api'].tls.key_file: cannot load '<key>' as the PEM private key of '<ca>'",
        ),
        (
            '{ cafile = "<ca>" }',
            "PREQUAL_POOLS['/api'].tls has an unknown setting 'cafile'; known: ca_file, cert_file,",
        ),
        ("{ verify = 'maybe' }", "PREQUAL_POOLS['/api'].tls.verify must be a boolean"),
        ("{ min_version = 'TLSv1.0' }", "PREQUAL_POOLS['/api'].tls.min_version must be None, 'TLSv1.2' or 'TLSv1.3'"),
        ("'yes'", "PREQUAL_POOLS['/api'].tls must be an object, got 'yes'"),
    ],
)
def test_check_names_the_tls_key_that_is_wrong(tmp_path: Path, private_ca: Path, tls: str, message: str) -> None:
    (tmp_path / "not.pem").write_text("not a certificate\n")
    paths = {
        "<missing>": str(tmp_path / "missing.pem"),
        "<not-pem>": str(tmp_path / "not.pem"),
        "<ca>": str(private_ca / "ca.pem"),
        "<key>": str(private_ca / "server.key"),  # a key, but not the CA certificate's
    }
    for placeholder, path in paths.items():
        tls, message = tls.replace(placeholder, path), message.replace(placeholder, path)
    config = tmp_path / "bad.toml"
    config.write_text(f'[pools."/api"]\nupstreams = ["https://127.0.0.1:9"]\ntls = {tls}\n')
    as_json = json.dumps({"/api": tomllib.loads(config.read_text())["pools"]["/api"]})
    for done in (
        _run(["--config", str(config), "--check"], _clean_env()),
        _run(["--check"], _clean_env(PREQUAL_POOLS=as_json)),
    ):
        assert done.returncode == 2
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"prequal-gateway: error: {message}"), lines[0]


ACCESS_PLAIN = re.compile(
    r'127\.0\.0\.1:\d+ http "GET (?P<path>\S+)" (?P<status>\d+) pool=(?P<pool>\S+) backend=(?P<backend>\S+)'
    r" attempts=1 upstream_ms=\S+ total_ms=\S+ bytes_in=0 bytes_out=\d+ request_id=(?P<request_id>\S+)"
)


@pytest.mark.parametrize(
    ("fmt", "where", "log_level"),
    [("json", "environment", "info"), ("plain", "file", "info"), ("json", "file", "warning")],
)
def test_the_access_log_is_one_line_per_proxied_request_on_stdout(
    tmp_path: Path, fmt: str, where: str, log_level: str
) -> None:
    app, _ = make_backend("b1")
    with serve(app) as backend:
        config = tmp_path / "prequal.toml"
        gateway_table = f'[gateway]\naccess_log = "{fmt}"\n' if where == "file" else ""
        config.write_text(f'{gateway_table}[pools."/api"]\nupstreams = ["{backend.url}"]\n')
        env = _clean_env(PREQUAL_ACCESS_LOG=fmt) if where == "environment" else _clean_env()
        with _served(["--config", str(config)], env, tmp_path, log_level=log_level) as gw:
            with httpx.Client() as client:
                answers = [client.get(gw.url + f"/api/hello?n={i}") for i in range(3)]
                answers.append(client.get(gw.url + "/api/given", headers={"x-request-id": "client-chosen-1"}))
                assert client.get(gw.url + "/elsewhere").status_code == 404  # not proxied: no line
    assert [a.status_code for a in answers] == [200] * 4
    lines = gw.out.read_text().splitlines()
    assert len(lines) == 4, lines
    if fmt == "json":
        records = [json.loads(line) for line in lines]
    else:
        records = [m.groupdict() for m in map(ACCESS_PLAIN.fullmatch, lines) if m is not None]
    assert [r["path"] for r in records] == ["/api/hello?n=0", "/api/hello?n=1", "/api/hello?n=2", "/api/given"]
    assert [str(r["status"]) for r in records] == ["200"] * 4
    assert {(r["pool"], r["backend"]) for r in records} == {("/api", backend.url)}
    assert [r["request_id"] for r in records] == [a.headers["x-request-id"] for a in answers]
    assert records[-1]["request_id"] == "client-chosen-1"
    # uvicorn's own access line ('127.0.0.1:5123 - "GET /api/hello?n=0 HTTP/1.1" 200') is not written.
    assert "HTTP/1.1" not in gw.out.read_text() + gw.err.read_text()


def test_event_logs_reach_stderr_at_info_and_no_access_log_by_default(tmp_path: Path) -> None:
    app, _ = make_backend("late")
    with serve(app) as backend:
        env = _clean_env(PREQUAL_POOLS=json.dumps({"/api": []}), PREQUAL_ADMIN_TRUST_LOOPBACK="1")
        with _served([], env, tmp_path) as gw, httpx.Client() as client:
            registered = client.post(gw.url + "/_prequal/register", json={"pool": "/api", "url": backend.url})
            client.get(gw.url + "/api/x")
    assert registered.status_code in (200, 201), registered.text
    assert f"INFO:     backend {backend.url} registered in pool /api" in gw.err.read_text()
    assert gw.out.read_text() == ""


@pytest.mark.parametrize(
    ("value", "sent"),
    [(None, "x-request-id"), ("off", None), ("", None), ("X-Correlation-ID", "x-correlation-id")],
)
def test_the_request_id_header_from_the_environment(tmp_path: Path, value: str | None, sent: str | None) -> None:
    app, _ = make_backend("b1")
    with serve(app) as backend:
        env = _clean_env(PREQUAL_POOLS=json.dumps({"/api": [backend.url]}))
        if value is not None:
            env["PREQUAL_REQUEST_ID_HEADER"] = value
        with _served([], env, tmp_path) as gw, httpx.Client() as client:
            answer = client.get(gw.url + "/api/x")
    upstream = _upstream_headers(answer)
    ids = {"x-request-id", "x-correlation-id"}
    assert {name for name in upstream if name in ids} == ({sent} if sent else set())
    assert {name for name in answer.headers if name in ids} == ({sent} if sent else set())
    if sent:
        assert HEX32.fullmatch(upstream[sent]) and answer.headers[sent] == upstream[sent]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize("tracing", ["true", "false"])
def test_tracing_from_the_environment_sends_the_gateways_span_upstream(tmp_path: Path, tracing: str) -> None:
    app, _ = make_backend("b1")
    with serve(app) as backend:
        env = _clean_env(
            PREQUAL_POOLS=json.dumps({"/api": [backend.url]}),
            PREQUAL_TRACING=tracing,
            # The OpenTelemetry SDK's provider as the global one, so spans have real ids (no exporter).
            OTEL_PYTHON_TRACER_PROVIDER="sdk_tracer_provider",
        )
        with _served([], env, tmp_path) as gw, httpx.Client() as client:
            answer = client.get(gw.url + "/api/x", headers={"traceparent": CLIENT_TRACEPARENT})
    traceparent = _upstream_headers(answer)["traceparent"]
    if tracing == "true":  # the gateway's span, a child in the client's trace
        assert traceparent.startswith(f"00-{TRACE_ID}-") and traceparent != CLIENT_TRACEPARENT
    else:  # an end-to-end header, passed through untouched
        assert traceparent == CLIENT_TRACEPARENT


BLOCK_OPENTELEMETRY = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Blocked())
from prequal_middleware.cli import main
sys.exit(main(["--check"]))
"""


@pytest.mark.parametrize("tracing", ["true", "false"])
def test_tracing_without_opentelemetry_is_one_line(tracing: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_OPENTELEMETRY],
        env=_clean_env(PREQUAL_TRACING=tracing),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if tracing == "false":  # off, OpenTelemetry is never looked for
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2
    assert done.stderr == (
        "prequal-gateway: error: PREQUAL_TRACING is on but OpenTelemetry is not installed:"
        " pip install 'prequal-middleware[otel]'\n"
    )


CAPTURE_UVICORN_RUN = """
import inspect, json, sys
import uvicorn

def run(app, **kwargs):
    accepted = inspect.signature(uvicorn.Config).parameters
    print(json.dumps({"unknown": sorted(k for k in kwargs if k not in accepted),
                      "settings": {k: v for k, v in kwargs.items() if isinstance(v, (int, str, bool, float))}}))

uvicorn.run = run
from prequal_middleware.cli import main
sys.exit(main(["--workers", "2", "--port", "0"]))
"""


def test_the_supervisor_waits_for_a_slow_worker_before_abandoning_a_restart() -> None:
    """uvicorn's 5 s is less than a worker's start on a busy host: a SIGHUP restart would be abandoned."""
    done = subprocess.run(
        [sys.executable, "-c", CAPTURE_UVICORN_RUN],
        env=_clean_env(PREQUAL_POOLS='{"/api": ["http://127.0.0.1:9"]}'),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    passed = json.loads(done.stdout.strip().splitlines()[-1])
    assert passed["unknown"] == [], "every setting passed to uvicorn.run is one uvicorn.Config takes"
    assert passed["settings"]["workers"] == 2
    assert passed["settings"]["timeout_worker_healthcheck"] == 30

"""``prequal-gateway`` and ``python -m prequal_middleware``: configuration from the environment and a TOML
file, one-line errors with exit status 2, and a real gateway served by the console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.apps import make_backend
from tests.helpers import consecutive_free_ports, wait_http
from tests.servers import serve

SCRIPT = Path(sys.executable).parent / "prequal-gateway"


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


def test_the_console_script_serves_a_gateway(tmp_path: Path) -> None:
    app, state = make_backend("b1")
    with serve(app) as backend:
        config = tmp_path / "prequal.toml"
        config.write_text(
            textwrap.dedent(f"""
                [pools."/api"]
                upstreams = ["{backend.url}"]
            """)
        )
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

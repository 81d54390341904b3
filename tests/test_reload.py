"""``prequal-gateway`` reloads its pools and routes on SIGHUP and when its file changes, dropping no request.

Each test runs the real entry point (``python -m prequal_middleware --config FILE``, importing this tree)
as a subprocess on a free loopback port, in front of real backends, and ends it by its PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.apps import make_backend
from tests.helpers import consecutive_free_ports, wait_for, wait_http
from tests.servers import ServerThread, serve
from tests.test_cli import _clean_env

# Within this, a change is served (the file is looked at every second).
APPLIED_WITHIN_S = 6.0


@dataclass
class Running:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def lines(self, containing: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if containing in line]


@contextmanager
def gateway(config: Path, *args: str, **env: str) -> Iterator[Running]:
    """``python -m prequal_middleware --config config``; SIGTERM (then SIGKILL) to its PID at the end."""
    port = consecutive_free_ports(1)
    log = config.with_suffix(".log")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "prequal_middleware", "--config", str(config), "--port", str(port), *args],
            env=_clean_env(**env),
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/_prequal/healthz", timeout_s=30)
        yield Running(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def write(config: Path, pools: dict[str, list[str]], **extra: str) -> None:
    """A configuration file with these pools (each ``extra`` a TOML line added to every pool)."""
    text = ""
    for prefix, upstreams in pools.items():
        text += f'[pools."{prefix}"]\nupstreams = {json.dumps(upstreams)}\n'
        text += "".join(f"{key} = {value}\n" for key, value in extra.items()) + "\n"
    config.write_text(text)


def backend_of(url: str, path: str) -> str | int:
    """The name of the backend that answered ``path``, or the gateway's status when none did."""
    with httpx.Client(timeout=10) as client:  # a new connection: under --workers it may reach any worker
        response = client.get(url + path)
    return response.json()["backend"] if response.status_code == 200 else response.status_code


def eventually(url: str, path: str, expected: str | int, what: str) -> float:
    """Seconds until ``path`` answers from ``expected`` (a backend name, or a status)."""
    started = time.monotonic()
    wait_for(lambda: backend_of(url, path) == expected, timeout_s=APPLIED_WITHIN_S, what=what)
    return time.monotonic() - started


@contextmanager
def backends(*names: str) -> Iterator[dict[str, ServerThread]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(serve(make_backend(name)[0])) for name in names}


def test_a_changed_file_is_applied_pool_added_upstreams_changed_pool_removed(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    with backends("a", "b", "c") as up:
        write(config, {"/a": [up["a"].url]})
        with gateway(config) as gw:
            assert backend_of(gw.url, "/a/x") == "a"
            assert backend_of(gw.url, "/b/x") == 404
            write(config, {"/a": [up["c"].url], "/b": [up["b"].url]})
            took = eventually(gw.url, "/b/x", "b", "the added pool to serve")
            assert [backend_of(gw.url, "/a/x") for _ in range(10)] == ["c"] * 10, "the new upstreams, only"
            write(config, {"/a": [up["c"].url]})
            eventually(gw.url, "/b/x", 404, "the removed pool to be gone")
            assert backend_of(gw.url, "/a/x") == "c"
            assert gw.lines("refused") == []
    assert took < APPLIED_WITHIN_S


@pytest.mark.parametrize("where", ["environment", "file"])
def test_sighup_applies_a_change_the_watch_was_told_to_ignore(tmp_path: Path, where: str) -> None:
    config = tmp_path / "prequal.toml"
    no_watch = "[gateway]\nconfig_poll_s = 0\n\n" if where == "file" else ""  # no watch: only SIGHUP reloads

    def write_pool(upstream: str) -> None:
        write(config, {"/a": [upstream]})
        config.write_text(no_watch + config.read_text())

    with backends("a", "b") as up:
        write_pool(up["a"].url)
        with gateway(config, **({"PREQUAL_CONFIG_POLL_S": "0"} if where == "environment" else {})) as gw:
            write_pool(up["b"].url)
            time.sleep(2.5)
            assert backend_of(gw.url, "/a/x") == "a", "without SIGHUP nothing changed"
            gw.process.send_signal(signal.SIGHUP)
            eventually(gw.url, "/a/x", "b", "SIGHUP to apply the file")
            assert gw.process.poll() is None, "SIGHUP reloads, it does not stop the server"


def test_a_slow_request_on_a_removed_pool_completes_and_no_request_fails_during_the_reload(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    with backends("a", "b", "c") as up:
        write(config, {"/slow": [up["a"].url], "/busy": [up["b"].url]})
        with gateway(config) as gw:
            slow: dict[str, object] = {}
            first_chunk = threading.Event()

            def slow_request() -> None:
                with httpx.Client(timeout=30) as client, client.stream("GET", gw.url + "/slow/stream?pause=5") as r:
                    body = b""
                    for chunk in r.iter_bytes():
                        body += chunk
                        first_chunk.set()
                    slow.update(status=r.status_code, body=body)

            outcomes: list[int | str] = []
            stop = threading.Event()

            def steady_loop() -> None:
                with httpx.Client(timeout=10) as client:
                    while not stop.is_set():
                        try:
                            response = client.get(gw.url + "/busy/x")
                            outcomes.append(
                                response.json()["backend"] if response.status_code == 200 else response.status_code
                            )
                        except httpx.HTTPError as exc:
                            outcomes.append(repr(exc))

            threads = [threading.Thread(target=slow_request), threading.Thread(target=steady_loop)]
            for thread in threads:
                thread.start()
            try:
                assert first_chunk.wait(10), "the slow request is under way"
                # Polled: enough requests on the old pool before the change (a file look may come at once).
                wait_for(lambda: outcomes.count("b") > 10, timeout_s=5, what="more than 10 requests on the old pool")
                # /slow goes; /busy changes its upstreams and its policy (a fresh pool; the old one drains).
                write(config, {"/busy": [up["c"].url]}, policy='"round_robin"')
                wait_for(lambda: backend_of(gw.url, "/slow/x") == 404, timeout_s=APPLIED_WITHIN_S, what="the reload")
                assert "status" not in slow, "the reload happened while the slow request was in flight"
                wait_for(lambda: outcomes[-1:] == ["c"], timeout_s=APPLIED_WITHIN_S, what="the steady loop to move")
                # Polled, not slept: enough requests on the new pool to tell it never goes back.
                wait_for(lambda: outcomes.count("c") > 10, timeout_s=5, what="more than 10 requests on the new pool")
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=15)
    assert slow == {"status": 200, "body": b"first chunk\nsecond chunk\n"}
    errors = [o for o in outcomes if o not in ("b", "c")]
    assert errors == [], f"{len(errors)} of {len(outcomes)} requests failed during the reload: {errors[:5]}"
    assert outcomes.count("b") > 10 and outcomes.count("c") > 10, (outcomes.count("b"), outcomes.count("c"))
    # Once moved, the loop never goes back to the old pool.
    assert "b" not in outcomes[outcomes.index("c") :]


def test_an_invalid_file_is_refused_whole_with_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    with backends("a", "b") as up:
        write(config, {"/a": [up["a"].url]})
        with gateway(config) as gw:
            # A good new pool next to a bad upstream: nothing of it may be applied.
            config.write_text(
                textwrap.dedent(f"""
                    [pools."/a"]
                    upstreams = ["{up["b"].url}"]
                    [pools."/b"]
                    upstreams = ["ftp://127.0.0.1:9"]
                """)
            )
            wait_for(lambda: gw.lines("refused") != [], timeout_s=APPLIED_WITHIN_S, what="the refusal")
            time.sleep(2.5)  # two more looks at the unchanged file: no second line
            refused = gw.lines("refused")
            assert len(refused) == 1, refused
            assert "PREQUAL_POOLS['/b']" in refused[0] and "upstreams[0]" in refused[0], refused[0]
            assert "Traceback" not in gw.log.read_text()
            assert [backend_of(gw.url, "/a/x") for _ in range(5)] == ["a"] * 5, "the old configuration serves"
            assert backend_of(gw.url, "/b/x") == 404
            write(config, {"/a": [up["b"].url]})  # fixed: applied
            eventually(gw.url, "/a/x", "b", "the fixed file to apply")


def test_a_registered_member_survives_a_reload(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    with backends("a", "late", "c", "d") as up:
        # Random choice, so that 20 requests reach both members (Prequal may rightly keep choosing the
        # faster one of two idle backends for a sole client's sequential requests: CI saw 20 of 20 to one).
        write(config, {"/kept": [up["a"].url], "/changed": [up["a"].url]}, policy='"random"')
        with gateway(config, PREQUAL_ADMIN_TRUST_LOOPBACK="1") as gw:
            with httpx.Client() as client:
                for pool in ("/kept", "/changed"):
                    answer = client.post(gw.url + "/_prequal/register", json={"pool": pool, "url": up["late"].url})
                    assert answer.status_code in (200, 201), answer.text
            for pool in ("/kept", "/changed"):
                wait_for(_serves(gw.url, pool, "late"), timeout_s=10, what=f"the registered member to serve {pool}")
            # /kept is unchanged; /changed gets another policy (a fresh pool); /c is added.
            config.write_text(
                f'[pools."/kept"]\nupstreams = ["{up["a"].url}"]\npolicy = "random"\n\n'
                f'[pools."/changed"]\nupstreams = ["{up["a"].url}"]\npolicy = "round_robin"\n\n'
                f'[pools."/c"]\nupstreams = ["{up["d"].url}"]\n'
            )
            eventually(gw.url, "/c/x", "d", "the reload")
            for pool in ("/kept", "/changed"):
                # At once: a registered member of a replaced pool keeps the health verdict it had.
                seen = [backend_of(gw.url, f"{pool}/x") for _ in range(20)]
                assert "late" in seen and set(seen) <= {"a", "late"}, (pool, seen)
            described = httpx.get(gw.url + "/_prequal/backends").json()
            listed = {p["prefix"]: {m["url"] for m in p["members"]} for p in described["pools"]}
            assert listed["/kept"] == listed["/changed"] == {up["a"].url, up["late"].url}, listed
            states = {(p["prefix"], m["url"]): m["state"] for p in described["pools"] for m in p["members"]}
            assert states[("/kept", up["late"].url)] == states[("/changed", up["late"].url)] == "healthy", states


def _serves(url: str, pool: str, name: str) -> Callable[[], bool]:
    return lambda: name in {backend_of(url, f"{pool}/x") for _ in range(20)}


def test_every_worker_applies_a_change(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    with backends("a", "b") as up:
        write(config, {"/a": [up["a"].url]})
        with gateway(config, "--workers", "2", PREQUAL_REGISTRY_PATH=str(tmp_path / "registry.db")) as gw:
            # Both workers up before the change: a worker still starting would read the new file at start.
            started: set[str] = set()

            def both_workers_serve() -> bool:
                with httpx.Client(timeout=10) as client:  # a new connection each time: the kernel spreads them
                    response = client.get(gw.url + "/a/x")
                if response.status_code == 200:
                    started.add(dict(response.json()["headers"])["via"])
                return len(started) >= 2

            wait_for(both_workers_serve, timeout_s=30, what="both workers to serve")
            write(config, {"/a": [up["a"].url], "/b": [up["b"].url]})
            eventually(gw.url, "/b/x", "b", "one worker to apply the change")
            last: dict[str, object] = {}

            def every_worker_serves_b() -> bool:
                vias, seen = set(), []
                for _ in range(40):
                    with httpx.Client(timeout=10) as client:  # a new connection each time: the kernel spreads them
                        response = client.get(gw.url + "/b/x")
                    seen.append(response.json()["backend"] if response.status_code == 200 else response.status_code)
                    if response.status_code == 200:
                        vias.add(dict(response.json()["headers"])["via"])
                last.update(seen=seen, vias=vias)
                return seen == ["b"] * 40 and len(vias) >= 2

            # Polled: the other worker looks at the file once a second too, later on a loaded machine. A
            # worker that never applies the change keeps answering 404 and this times out.
            try:
                wait_for(every_worker_serves_b, timeout_s=APPLIED_WITHIN_S, what="both workers to serve the new pool")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last round: {last}") from None


# What a client sees when uvicorn's shutdown closes a connection it accepted but had not read a request
# from yet (``Server.shutdown`` closes every connection with no request in progress, as it closes idle
# keep-alive ones): the request reached neither the gateway's app nor a backend.
UNREAD = "RemoteProtocolError('Server disconnected without sending a response.')"


def test_sighup_to_the_supervisor_replaces_the_workers_without_failing_a_request(tmp_path: Path) -> None:
    config = tmp_path / "prequal.toml"
    made = {name: make_backend(name) for name in ("a", "b")}
    with ExitStack() as stack:
        up = {name: stack.enter_context(serve(app)) for name, (app, _) in made.items()}
        write(config, {"/a": [up["a"].url]})
        env = {"PREQUAL_REGISTRY_PATH": str(tmp_path / "registry.db"), "PREQUAL_CONFIG_POLL_S": "0"}
        with gateway(config, "--workers", "2", **env) as gw:
            outcomes: list[tuple[str, str | int]] = []  # (the request's own path, its outcome)
            stop = threading.Event()

            def steady_loop() -> None:
                sent = 0
                while not stop.is_set():
                    sent += 1
                    path = f"/r{sent}"  # each request named, so the backends' logs tell which arrived
                    try:
                        outcomes.append((path, backend_of(gw.url, "/a" + path)))
                    except httpx.HTTPError as exc:
                        outcomes.append((path, repr(exc)))

            loop = threading.Thread(target=steady_loop)
            loop.start()
            try:
                write(config, {"/a": [up["b"].url]})
                time.sleep(0.5)
                gw.process.send_signal(signal.SIGHUP)  # uvicorn replaces the workers one by one
                wait_for(
                    lambda: [o for _, o in outcomes[-30:]] == ["b"] * 30, timeout_s=30, what="every worker to serve b"
                )
            finally:
                stop.set()
                loop.join(timeout=15)
            assert gw.process.poll() is None
    arrived = {path for _, state in made.values() for path in state.paths}
    assert all(path in arrived for path, o in outcomes if o in ("a", "b")), "every answer came from a backend's log"
    errors = [(path, o) for path, o in outcomes if o not in ("a", "b")]
    # Not lost: a request a stopping worker closed unread (uvicorn's race between accepting a connection
    # and reading it; README, "Reloading the pools"), at most one per replaced worker. Anything else, or
    # such a failure for a request a backend did receive, is a request the reload lost.
    lost = [(path, o) for path, o in errors if o != UNREAD or path in arrived]
    assert lost == [], f"{len(lost)} of {len(outcomes)} requests lost: {lost[:5]}"
    assert len(errors) <= 2, f"{len(errors)} of {len(outcomes)} requests closed unread: {errors[:5]}"

"""Hypothesis fuzzing of request targets through real gateway processes (``request_target``).

Targets are drawn from the characters that matter (``/ . % @ : \\ ? # *``, hex digits, letters) and sent
as raw bytes to gateways under uvicorn's httptools and h11 parsers, on both upstream transports, with a
pool at ``/api`` (prefix stripped). Whatever the target:

- nothing reaches the *elsewhere* server (no target names another host);
- a request the backend receives is exactly the client's raw path less ``/api``, query unchanged, and
  its decoded path has no dot segment (nothing climbs out of the prefix);
- a target the pool did not take reached no backend (a 400 from the gateway or uvicorn, or the host
  app's 404).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.reliability.procs import HttpProc
from tests.reliability.rawclient import exchange
from tests.reliability.rawservers import LoopThread, Recorder
from tests.security.hostile_clients import COMBINATIONS, gateway_procs

PIECES = ["/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "@", ":", "?", "#", "*", "%", "%61", "a"]
PIECES += ["api", "/api", "x", "127.0.0.1", "%25", ";", "=", "&", "~", "%00", "%40", "//"]


@dataclass
class Setup:
    backend: Recorder
    elsewhere: Recorder
    gateways: dict[tuple[str, str], HttpProc]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    log_dir = tmp_path_factory.mktemp("fuzz-targets")
    loop = LoopThread().start()
    backend, elsewhere = Recorder(loop).start(), Recorder(loop).start()
    pool = {"upstreams": [backend.url], "health": {"path": None}}
    try:
        with gateway_procs("fuzz", log_dir, {"/api": pool}) as gateways:
            yield Setup(backend, elsewhere, gateways)
    finally:
        backend.stop()
        elsewhere.stop()
        loop.stop()


def has_dot_segment(raw_path: bytes) -> bool:
    decoded = unquote_to_bytes(raw_path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in decoded.split(b"/"))


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    start = draw(st.sampled_from(["/api", "/api/", "", "@127.0.0.1:", "/", "*", "http://127.0.0.1:", "//"]))
    rest = "".join(draw(st.lists(st.sampled_from(PIECES), max_size=12)))
    return (start + rest).encode("ascii")


@pytest.mark.parametrize(("http", "transport"), COMBINATIONS)
def test_fuzzed_targets_stay_in_their_pool(setup: Setup, http: str, transport: str) -> None:
    proc = setup.gateways[(http, transport)]
    outcomes: dict[int, int] = {}

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(target=targets())
    def case(target: bytes) -> None:
        if target.startswith((b"@127.0.0.1:", b"http://127.0.0.1:")):  # name the elsewhere server's port
            target = target.replace(b"127.0.0.1:", b"127.0.0.1:%d/" % setup.elsewhere.port, 1)
        before = len(setup.backend.requests)
        payload = b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        responses, _ = exchange(proc.port, payload, idle_s=0.3, total_s=5.0)
        finals = [r.status for r in responses if r.status >= 200]
        status = finals[0] if finals else 0
        outcomes[status] = outcomes.get(status, 0) + 1
        assert not setup.elsewhere.requests, f"{target!r} reached another host"
        arrived = setup.backend.requests[before:]
        assert status != 500 and all(b"Traceback" not in r.body for r in responses), (target, responses)
        if status == 200 and arrived:
            (request,) = arrived
            path, _, query = request.target.partition(b"?")
            sent_path, _, sent_query = target.partition(b"?")
            sent_path = sent_path.partition(b"#")[0]
            if sent_path.startswith(b"/api"):
                assert path == (sent_path[4:] or b"/"), (target, request.target)
                assert query == sent_query.partition(b"#")[0], (target, request.target)
            else:  # httptools reduces an absolute-form target to its path; it must still be under /api
                assert http == "httptools" and target.startswith(b"http://"), (target, request.target)
            assert path.startswith(b"/") and not has_dot_segment(path), (target, request.target)
        else:
            assert not arrived, f"{target!r}: {status}, yet {len(arrived)} request(s) reached the backend"

    case()
    assert outcomes.get(200, 0) > 5 and outcomes.get(400, 0) > 5, outcomes

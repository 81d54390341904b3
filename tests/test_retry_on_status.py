"""``RetrySettings.retry_on_status``: a listed 5xx *answer* is retried on another backend.

Through real servers: a uvicorn gateway in front of uvicorn backends. A "sinkhole" answers 503 at once
and reports itself idle (RIF 0): each of its answers is closed unread and the request goes to another
backend, when the method is idempotent, attempts, another backend and the retry budget allow. When one
of them does not, the client gets the last backend's own answer (status, headers, body), never a
gateway-made error.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prequal_middleware import ConfigurationError, Gateway, HealthSettings, OutlierSettings, RetrySettings, UpstreamPool
from prequal_middleware.backend.load_reporting import LoadReportingMiddleware
from prequal_middleware.cli import environ_from_file
from prequal_middleware.core import Outcome, PrequalSettings
from prequal_middleware.core.load_report import encode_report
from prequal_middleware.envconfig import pools_from_env
from prequal_middleware.transports.base import UpstreamResponse
from tests.helpers import gateway_app, wait_for
from tests.servers import ServerThread, serve
from tests.test_attempt_handle import Recording, RecordingRoundRobin, settled

OFF = HealthSettings(path=None)
NO_EJECTION = OutlierSettings(consecutive_failures=0)  # every backend stays selectable: exact counts


class Backend:
    """A backend app answering ``status`` to every path; ``/endless`` (not 200) streams a body that never ends."""

    def __init__(self, name: str, status: int) -> None:
        self.name = name
        self.status = status
        self.requests = 0
        self.app = Starlette(routes=[Route("/{path:path}", self._answer, methods=["GET", "POST", "PUT"])])

    async def _answer(self, request: Request) -> Response:
        self.requests += 1
        await request.body()
        headers = dict((k.decode(), v.decode()) for k, v in encode_report(0, 0.0))  # "idle"
        headers["x-backend"] = self.name
        if request.url.path == "/endless" and self.status != 200:

            async def forever() -> AsyncIterator[bytes]:
                while True:
                    yield b"x" * 1024
                    await asyncio.sleep(0.005)

            return StreamingResponse(forever(), status_code=self.status, headers=headers)
        if self.status != 200:
            return Response(f"{self.name} busy", status_code=self.status, headers=headers)
        return JSONResponse({"backend": self.name}, headers=headers)


class Reporting(RecordingRoundRobin):
    """Recording round robin that also takes piggybacked reports (so the gateway reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_reports = True


def gateway_of(backends: list[ServerThread], retry: RetrySettings, **config: Any) -> Gateway:
    pool = UpstreamPool(
        "/api",
        upstreams=[b.url for b in backends],
        policy=Reporting,
        health=OFF,
        outliers=NO_EJECTION,
        retry=retry,
        **config,
    )
    return Gateway(pools=[pool])


def recording(gateway: Gateway) -> Recording:
    (policy,) = gateway.pools["/api"].clients
    assert isinstance(policy, Reporting)
    return policy.record


def retries(gateway: Gateway) -> float:
    return gateway.metrics.registry.get_sample_value("prequal_retries_total", {"pool": "/api"}) or 0.0


ON_503 = RetrySettings(retry_on_status=frozenset({503}))


def sink_and_honest() -> tuple[Backend, Backend]:
    return Backend("sink", 503), Backend("ok", 200)


# --- (a) the sinkhole's answers are retried --------------------------------------------------------


def test_a_sinkhole_503_is_retried_on_the_other_backend() -> None:
    sink, ok = sink_and_honest()
    seen: list[tuple[str, int]] = []  # (backend, attempt) of every answer relayed, as on_response saw it

    def relayed(response: UpstreamResponse) -> None:
        seen.append((response.backend, response.attempt))

    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], ON_503, on_response=relayed)
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            for i in range(8):
                reply = client.get(f"/api/x/{i}")
                assert reply.status_code == 200 and reply.json() == {"backend": "ok"}, reply.text
            settled(gateway)
    record = recording(gateway)
    finishes = record.finishes()
    assert sink.requests >= 3, "round robin sent its turns to the sinkhole"
    assert finishes.count((s.url, Outcome.FAILURE)) == sink.requests, "each 503 a failure for the policy"
    assert finishes.count((o.url, Outcome.SUCCESS)) == 8
    assert retries(gateway) == sink.requests, "every sinkhole attempt counted as a retry"
    reports = [c for c in record.calls if c[0] == "report" and c[1] == s.url]
    assert len(reports) == sink.requests and {c[3] for c in reports} == {0}, "its reports still read"
    assert len(seen) == 8 and {b for b, _ in seen} == {o.url}, "on_response only on the answer relayed"
    assert sorted({n for _, n in seen}) == [1, 2], "a retried request's answer is its second attempt"


def test_in_sync_mode_the_retry_is_chosen_the_sync_way() -> None:
    sink, ok = sink_and_honest()
    with serve(LoadReportingMiddleware(sink.app)) as s, serve(LoadReportingMiddleware(ok.app)) as o:
        pool = UpstreamPool(
            "/api",
            upstreams=[s.url, o.url],
            health=OFF,
            outliers=NO_EJECTION,
            retry=ON_503,
            prequal=PrequalSettings(mode="sync", sync_probes=2, sync_wait_s=0.2),
        )
        gateway = Gateway(pools=[pool])
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            assert [client.get(f"/api/{i}").status_code for i in range(10)] == [200] * 10
            runtime = gateway.pools["/api"]
            wait_for(lambda: runtime.in_flight == 0, what="in flight back to 0")
    assert sink.requests >= 1 and retries(gateway) == sink.requests


def test_the_default_retries_502_503_504_of_idempotent_requests() -> None:
    assert RetrySettings().retry_on_status == frozenset({502, 503, 504})
    sink, ok = Backend("sink", 502), Backend("ok", 200)
    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], RetrySettings())
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            assert [client.get(f"/api/{i}").status_code for i in range(4)] == [200] * 4
            settled(gateway)
    assert sink.requests >= 1 and retries(gateway) == sink.requests


# --- (b) to (e): the backend's own answer is relayed when a retry is not possible -------------------


def assert_sink_answer(reply: httpx.Response, name: str = "sink") -> None:
    assert reply.status_code == 503, reply.text
    assert reply.text == f"{name} busy" and reply.headers["x-backend"] == name
    assert "x-prequal-pool" not in reply.headers, "the backend's answer, not a gateway-made error"


def test_a_post_is_not_retried() -> None:
    sink, ok = sink_and_honest()
    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], ON_503)
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            replies = [client.post("/api/x", content=b"order") for _ in range(4)]
            settled(gateway)
    refused = [r for r in replies if r.status_code != 200]
    assert len(refused) == sink.requests == 2, [r.status_code for r in replies]
    for reply in refused:
        assert_sink_answer(reply)
    assert retries(gateway) == 0 and ok.requests == 2


def test_a_status_not_listed_is_relayed() -> None:
    sink, ok = Backend("sink", 502), Backend("ok", 200)
    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], ON_503)
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            replies = [client.get(f"/api/{i}") for i in range(4)]
            settled(gateway)
    assert sorted(r.status_code for r in replies) == [200, 200, 502, 502] and retries(gateway) == 0


def test_a_put_is_retried_only_while_its_body_can_be_replayed() -> None:
    sink, ok = sink_and_honest()
    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], ON_503)
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            small = [client.put("/api/x", content=b"small") for _ in range(2)]  # read whole before sending
            sink_small = sink.requests
            big = b"x" * 300_000  # beyond buffer_body_bytes (64 KiB): streamed upstream, read once
            streamed = [client.put("/api/x", content=big) for _ in range(2)]
            settled(gateway)
    assert [r.status_code for r in small] == [200, 200] and sink_small >= 1
    assert retries(gateway) == sink_small, "every small PUT the sinkhole got was retried; no streamed one"
    assert sorted(r.status_code for r in streamed) == [200, 503]
    assert_sink_answer(next(r for r in streamed if r.status_code == 503))


@pytest.mark.parametrize(("sinks", "attempts"), [(2, 3), (3, 2)], ids=["no-other-backend", "last-attempt"])
def test_the_last_answer_is_relayed_as_the_backend_sent_it(sinks: int, attempts: int) -> None:
    backends = [Backend(f"sink{i}", 503) for i in range(sinks)]
    with serve(backends[0].app) as s0, serve(backends[1].app) as s1, serve(backends[-1].app) as s2:
        servers = [s0, s1, s2][:sinks]
        gateway = gateway_of(servers, RetrySettings(attempts=attempts, retry_on_status=frozenset({503})))
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            reply = client.get("/api/x")
            settled(gateway)
    finishes = recording(gateway).finishes()
    assert len(finishes) == 2 and {o for _, o in finishes} == {Outcome.FAILURE}, finishes
    last = servers.index(next(t for t in servers if t.url == finishes[-1][0]))
    assert_sink_answer(reply, f"sink{last}")
    assert retries(gateway) == 1


def test_no_retry_once_the_budget_is_spent() -> None:
    sink, ok = sink_and_honest()
    # One retry in the window (0.1/s over 10 s), none per request: the second sinkhole answer is relayed.
    budget = RetrySettings(retry_on_status=frozenset({503}), budget_ratio=0.0, budget_min_per_s=0.1)
    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], budget)
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            replies = [client.get(f"/api/{i}") for i in range(6)]
            settled(gateway)
    refused = [r for r in replies if r.status_code != 200]
    assert retries(gateway) == 1 and sink.requests >= 2
    assert len(refused) == sink.requests - 1
    for reply in refused:
        assert_sink_answer(reply)


def test_an_endless_503_body_does_not_hold_the_retry() -> None:
    sink, ok = sink_and_honest()
    with serve(sink.app) as s, serve(ok.app) as o:
        gateway = gateway_of([s, o], ON_503)
        with serve(gateway_app(gateway), proxy_headers=False) as g, httpx.Client(base_url=g.url, timeout=5) as client:
            started = time.monotonic()
            replies = [client.get("/api/endless") for _ in range(4)]
            elapsed = time.monotonic() - started
            settled(gateway)
    assert [r.status_code for r in replies] == [200] * 4 and sink.requests >= 2
    assert elapsed < 2.0, f"{elapsed:.2f} s: the endless body was read instead of closed"


# --- (g) configuration ------------------------------------------------------------------------------


def test_settings_check_each_status() -> None:
    assert RetrySettings(retry_on_status=[502]).retry_on_status == frozenset({502})  # type: ignore[arg-type]
    for bad in ({499}, {600}, {True}, "503", {"503"}):
        with pytest.raises(ConfigurationError, match=r"^RetrySettings\.retry_on_status must be"):
            RetrySettings(retry_on_status=bad)  # type: ignore[arg-type]


def test_pools_accept_the_key_and_a_bad_status_names_it(tmp_path: Path) -> None:
    (pool,) = pools_from_env({"PREQUAL_POOLS": '{"/api": {"retry": {"retry_on_status": [502, 503]}}}'})
    assert pool.retry.retry_on_status == frozenset({502, 503}) and pool.retry.attempts == 3
    (pool,) = pools_from_env({"PREQUAL_POOLS": '{"/api": {"retry": {"retry_on_status": []}}}'})
    assert pool.retry.retry_on_status == frozenset()
    for value, message in [
        ("[503, 600]", "PREQUAL_POOLS['/api'].retry: RetrySettings.retry_on_status must be a set of 5xx"),
        ('["x"]', "PREQUAL_POOLS['/api'].retry.retry_on_status[0] must be an integer, got 'x'"),
        ("503", "PREQUAL_POOLS['/api'].retry.retry_on_status must be a list, got 503"),
        ("[true]", "PREQUAL_POOLS['/api'].retry.retry_on_status must be a list without booleans"),
    ]:
        with pytest.raises(ConfigurationError) as raised:
            pools_from_env({"PREQUAL_POOLS": '{"/api": {"retry": {"retry_on_status": ' + value + "}}}"})
        assert str(raised.value).startswith(message), str(raised.value)
    config = tmp_path / "prequal.toml"
    config.write_text(
        textwrap.dedent("""
            [pools."/api"]
            upstreams = ["http://127.0.0.1:8001"]
            retry = { attempts = 2, retry_on_status = [503] }
        """)
    )
    env, _ = environ_from_file(config)
    (pool,) = pools_from_env(env)
    assert (pool.retry.attempts, pool.retry.retry_on_status) == (2, frozenset({503}))
    bad = tmp_path / "bad.toml"
    bad.write_text('[pools."/api"]\nretry = { retry_on_status = [404] }\n')
    env, _ = environ_from_file(bad)
    with pytest.raises(ConfigurationError, match="retry_on_status must be a set of 5xx"):
        pools_from_env(env)

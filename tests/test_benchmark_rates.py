"""The logic of ``python -m benchmarks.overhead --rates`` and of the testbed's reports on/off pair, untimed.

    pytest tests/test_benchmark_rates.py

Open-loop schedules, the generator's summary and its HTTP exchange (against an in-process server; the
assertions are on counts and statuses, never on how long anything took), CPU-per-request arithmetic,
the ratios and tables, the command line, and the testbed's ``prequal_noreports`` contender.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import openloop, overhead, overhead_rates
from benchmarks.openloop import (
    STATUS_ERROR,
    STATUS_TIMEOUT,
    STATUS_UNSENT,
    LoadSpec,
    OpenLoopClient,
    arrival_times,
    summarize,
)
from benchmarks.overhead import CpuStat, Settings, parse_args
from benchmarks.overhead_rates import (
    RateSample,
    Snapshot,
    per_request_us,
    rate_sample,
    rates_against_baseline_rev,
    rates_table,
    round_robin_twin,
    summarize_rates,
    versus_table,
)

# --- schedules ---------------------------------------------------------------------------------------------


def test_poisson_schedule_is_seeded_sorted_and_near_the_rate() -> None:
    times = arrival_times(1000.0, 10.0, "poisson", seed=7)
    assert times == arrival_times(1000.0, 10.0, "poisson", seed=7)  # every target of a round: the same
    assert times != arrival_times(1000.0, 10.0, "poisson", seed=8)
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 10.0
    assert 9_500 <= len(times) <= 10_500  # deterministic for this seed; a Poisson count of mean 10,000
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.00095 < sum(gaps) / len(gaps) < 0.00105


def test_uniform_schedule_is_evenly_spaced() -> None:
    assert arrival_times(4.0, 2.5, "uniform") == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    assert arrival_times(100.0, 1.0, "uniform", seed=3) == arrival_times(100.0, 1.0, "uniform", seed=4)
    assert len(arrival_times(1600.0, 10.0, "uniform")) == 16_000
    assert arrival_times(10.0, 0.0) == []


@pytest.mark.parametrize(("rate", "seconds", "arrivals"), [(0.0, 1.0, "poisson"), (-1.0, 1.0, "uniform"),
                                                            (float("inf"), 1.0, "poisson"), (10.0, -1.0, "poisson"),
                                                            (10.0, 1.0, "bursty")])  # fmt: skip
def test_schedule_rejects_bad_arguments(rate: float, seconds: float, arrivals: str) -> None:
    with pytest.raises(ValueError):
        arrival_times(rate, seconds, arrivals)


def test_load_spec_checks_its_fields_and_names_the_window() -> None:
    spec = LoadSpec(host="127.0.0.1", port=1, rate=100.0, warmup_s=2.0, duration_s=10.0)
    assert spec.window == (2.0, 12.0)
    assert (spec.arrivals, spec.timeout_s, spec.max_connections) == ("poisson", 5.0, 256)
    for bad in ({"rate": 0.0}, {"duration_s": 0.0}, {"warmup_s": -1.0}, {"arrivals": "x"}, {"max_connections": 0}):
        fields: dict[str, Any] = {"host": "h", "port": 1, "rate": 1.0, "warmup_s": 0.0, "duration_s": 1.0, **bad}
        with pytest.raises(ValueError):
            LoadSpec(**fields)


# --- the generator's summary -----------------------------------------------------------------------------


def test_summary_counts_only_the_window_and_every_kind_of_failure() -> None:
    times = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    statuses = [200, 200, 200, 503, STATUS_TIMEOUT, STATUS_ERROR, STATUS_UNSENT, 200]
    latencies = [0.1, 0.001, 0.002, 0.003, 5.0, 0.0, 0.0, 0.9]
    lags = [0.5, 0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.0, 0.7]
    s = summarize(times, statuses, latencies, lags, (1.0, 4.0))  # 1.0 ... 3.5: six requests
    assert s["scheduled"] == 6
    assert (s["answered"], s["ok"], s["non_2xx"]) == (3, 2, 1)
    assert (s["timeouts"], s["connection_errors"], s["unsent"], s["errors"]) == (1, 1, 1, 4)
    assert s["scheduled_rps"] == 2.0 and s["answered_rps"] == 1.0
    assert s["p50_ms"] == pytest.approx(2.0) and s["p99_ms"] == pytest.approx(3.0) and s["max_ms"] == 3.0
    assert s["lag_max_ms"] == pytest.approx(0.5)  # the unsent request has no lag; the window's others do
    empty = summarize([], [], [], [], (0.0, 1.0))
    assert empty["scheduled"] == 0 and empty["p99_ms"] is None and empty["lag_p99_ms"] is None


# --- the generator's exchange, against an in-process server (counts only, no timing) ---------------------


@contextlib.asynccontextmanager
async def tiny_server(mode: str) -> AsyncIterator[int]:
    """``ok``: 200 keep-alive; ``close``: 200 and Connection: close; ``silent``: reads and never answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
                if mode == "silent":
                    continue
                extra = b"connection: close\r\n" if mode == "close" else b""
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + extra + b"\r\nok")
                await writer.drain()
                if mode == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _drive(mode: str, timeout_s: float = 5.0, port: int | None = None) -> dict[str, Any]:
    async with tiny_server(mode) as server_port:
        spec = LoadSpec(
            host="127.0.0.1",
            port=port or server_port,
            path="/x",
            rate=400.0,
            warmup_s=0.05,
            duration_s=0.1,
            arrivals="uniform",
            timeout_s=timeout_s,
        )
        client = OpenLoopClient(spec)
        await client.run(time.time())
        return client.result()


@pytest.mark.parametrize("mode", ["ok", "close"])
def test_client_sends_the_whole_schedule_and_counts_the_answers(mode: str) -> None:
    result = asyncio.run(_drive(mode))
    assert result["total_requests"] == 60  # uniform, 400 req/s over 0.15 s
    assert result["scheduled"] == result["answered"] == result["ok"] == 40  # the 0.1 s window
    assert result["errors"] == 0 and result["connect_failures"] == 0
    if mode == "close":  # a connection closed after each answer is never reused
        assert result["connections_opened"] >= 60


def test_client_counts_timeouts_and_refused_connections() -> None:
    silent = asyncio.run(_drive("silent", timeout_s=0.1))
    assert silent["scheduled"] == silent["timeouts"] == 40 and silent["answered"] == 0

    with contextlib.closing(__import__("socket").socket()) as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    refused = asyncio.run(_drive("ok", timeout_s=0.5, port=closed_port))
    assert refused["answered"] == 0 and refused["errors"] == refused["scheduled"] == 40
    assert refused["connect_failures"] > 0


# --- CPU per request ------------------------------------------------------------------------------------


def _snapshot(target: float, upstream: float, client: float, busy: int, probes: int, wall: float) -> Snapshot:
    cpu = CpuStat(total=int(wall * 100), busy=busy, steal=0)
    return Snapshot(target, upstream, client, cpu, cpu, probes, probes * 10, wall)


def test_cpu_per_request_is_the_window_cpu_over_the_answers() -> None:
    assert per_request_us(1.0, 1.5, 1000) == pytest.approx(500.0)
    assert per_request_us(1.0, 1.5, 0) is None
    # 10 s window; target 1.2 s, 4 backends 0.8 s, client 0.4 s; 1,600 answers; 80 probes.
    before = _snapshot(10.0, 20.0, 5.0, busy=1000, probes=100, wall=100.0)
    after = _snapshot(11.2, 20.8, 5.4, busy=1000 + 150, probes=180, wall=110.0)
    generator = {"scheduled": 1600, "answered": 1600, "answered_rps": 160.0, "non_2xx": 0, "timeouts": 0,
                 "connection_errors": 0, "p50_ms": 1.0, "p99_ms": 2.0, "lag_p99_ms": 1.5}  # fmt: skip
    s = rate_sample("gateway_prequal", 160.0, 1, before, after, generator, proxies=True)
    assert s.cpu_us_per_req == pytest.approx(750.0)
    assert s.upstream_cpu_us_per_req == pytest.approx(500.0)
    assert s.client_cpu_us_per_req == pytest.approx(250.0)
    assert (s.cpu_pct, s.upstream_cpu_pct, s.client_cpu_pct) == pytest.approx((12.0, 8.0, 4.0))
    # The proxy CPU was busy 150 ticks of 1,000; the target took 120 of them: others 3%.
    assert s.others_pct == pytest.approx(max(0.0, 100.0 * (150 - round(1.2 * overhead.CLK_TCK)) / 1000))
    assert (s.probes, s.probes_per_req, s.upstream_requests_per_req) == (80, 0.05, 0.5)
    assert s.errors == 0 and not s.late
    late = rate_sample("direct", 160.0, 1, before, after, {**generator, "lag_p99_ms": 50.0, "answered": 1590},
                       proxies=False)  # fmt: skip
    assert late.late and late.errors == 10 and late.probes is None and late.probes_per_req is None


def test_process_cpu_is_read_for_a_live_process() -> None:
    first = overhead_rates.process_cpu_s(os.getpid())
    sum(i * i for i in range(200_000))
    assert overhead_rates.process_cpu_s(os.getpid()) >= first > 0


# --- summaries and tables ----------------------------------------------------------------------------


def _sample(target: str, rate: float, round_no: int, cpu: float, upstream: float) -> RateSample:
    return RateSample(
        target=target, rate=rate, round=round_no, scheduled=100, answered=100, achieved_rps=rate,
        p50_ms=1.0, p99_ms=3.0, lag_p99_ms=1.0, cpu_us_per_req=cpu, cpu_pct=5.0,
        upstream_cpu_us_per_req=upstream, upstream_cpu_pct=4.0, client_cpu_us_per_req=90.0, client_cpu_pct=1.0,
        steal_pct=0.0, others_pct=0.0, load_cpu_busy_pct=10.0, probes=10, upstream_requests=100,
        probes_per_req=0.1, upstream_requests_per_req=1.0, non_2xx=0, timeouts=0, connection_errors=0,
        generator={},
    )  # fmt: skip


def test_round_robin_twin_keeps_transport_and_revision() -> None:
    assert round_robin_twin("gateway_prequal") == "gateway_round_robin"
    assert round_robin_twin("gateway_prequal_aiohttp") == "gateway_round_robin_aiohttp"
    assert round_robin_twin("gateway_prequal@95f9084") == "gateway_round_robin@95f9084"
    assert round_robin_twin("gateway_round_robin") is None and round_robin_twin("nginx") is None


def test_summary_ratios_are_medians_of_same_round_pairs() -> None:
    targets = ["gateway_round_robin", "gateway_round_robin@old", "gateway_prequal", "gateway_prequal@old"]
    settings = Settings(3, 10, 2, [16], list(targets), 0, 1, rates=[100.0, 1600.0])
    samples = []
    for r, (rr, pq, rr_old, pq_old) in enumerate([(100, 150, 200, 250), (110, 130, 220, 260), (90, 180, 180, 270)], 1):
        samples += [_sample("gateway_round_robin", 100.0, r, rr, 50), _sample("gateway_prequal", 100.0, r, pq, 60)]
        samples += [_sample("gateway_round_robin@old", 100.0, r, rr_old, 100)]
        samples += [_sample("gateway_prequal@old", 100.0, r, pq_old, 120)]
    samples.append(_sample("gateway_round_robin", 1600.0, 1, 40, 20))  # no Prequal at 1600: no ratio
    results = {(x["target"], x["rate"]): x for x in summarize_rates(samples, settings)}
    prequal = results[("gateway_prequal", 100.0)]
    assert prequal["cpu_us_per_req"] == 150 and (prequal["cpu_us_per_req_min"], prequal["cpu_us_per_req_max"]) == (
        130,
        180,
    )
    # Per round 1.5, 130/110, 2.0: the median of the ratios, not the ratio of the medians.
    assert prequal["vs_round_robin"] == "gateway_round_robin"
    assert prequal["cpu_vs_round_robin"] == pytest.approx(1.5)
    assert prequal["upstream_cpu_vs_round_robin"] == pytest.approx(1.2)
    assert results[("gateway_prequal@old", 100.0)]["cpu_vs_round_robin"] == pytest.approx(1.25)
    assert results[("gateway_round_robin", 100.0)]["cpu_vs_round_robin"] is None
    assert results[("gateway_round_robin", 1600.0)]["rounds"] == 1
    assert ("gateway_prequal", 1600.0) not in results
    assert not any(r["flagged"] for r in results.values())

    versus = {(v["target"], v["rate"]): v for v in rates_against_baseline_rev(samples, settings)}
    assert versus[("gateway_round_robin", 100.0)]["cpu_ratio"] == pytest.approx(0.5)
    assert versus[("gateway_prequal", 100.0)]["cpu_ratio"] == pytest.approx(0.6)  # 0.6, 0.5, 0.667
    assert versus[("gateway_prequal", 100.0)]["upstream_cpu_ratio"] == pytest.approx(0.5)
    assert versus[("gateway_prequal", 100.0)]["rounds"] == 3
    assert versus[("gateway_prequal", 1600.0)]["cpu_ratio"] is None

    table = rates_table(list(results.values()))
    assert "| gateway_prequal | 100 (100) | 150 (130-180) | 5.0 | 60 | 1.50×, 1.20× | 0.10 |" in table
    assert "| gateway_round_robin | 1,600 (1,600) | 40 (40-40) |" in table
    assert "| gateway_prequal vs @old | 100 | 0.600 | 0.500 | 3 |" in versus_table(list(versus.values()))


def test_errors_and_a_late_generator_flag_the_result() -> None:
    settings = Settings(1, 10, 2, [16], ["gateway_round_robin"], 0, 1, rates=[400.0])
    late = _sample("gateway_round_robin", 400.0, 1, 100, 50)
    late.lag_p99_ms = 80.0
    late.answered = 97
    (result,) = summarize_rates([late], settings)
    assert result["flagged"] and result["errors"] == 3 and result["late_rounds"] == 1
    assert "**3** (late generator)" in rates_table([result])


# --- the command line --------------------------------------------------------------------------------------


def test_rates_mode_defaults() -> None:
    args, settings = parse_args(["--rates", "100,400,1600"])
    assert settings.rates == [100.0, 400.0, 1600.0]
    assert settings.targets == ["gateway_round_robin", "gateway_prequal"]
    assert (settings.backends, settings.rounds, settings.duration_s, settings.arrivals) == (4, 3, 10, "poisson")
    assert args.json == overhead.DEFAULT_RATES_JSON
    quick_args, quick = parse_args(["--rates", "1600", "--quick", "--backends", "2", "--arrivals", "uniform"])
    assert (quick.rounds, quick.duration_s, quick.backends, quick.arrivals) == (1, 3, 2, "uniform")
    _, chosen = parse_args(["--rates", "50", "--targets", "gateway_prequal_aiohttp,nginx", "--json", "/tmp/x.json"])
    assert chosen.targets == ["gateway_prequal_aiohttp", "nginx"]


def test_saturated_mode_keeps_its_defaults() -> None:
    args, settings = parse_args([])
    assert settings.rates == [] and settings.backends == overhead.UPSTREAMS == 2
    assert args.json == overhead.DEFAULT_JSON and settings.connections == [16, 64]
    assert "gateway_round_robin_h1" not in settings.targets
    assert parse_args(["--backends", "3"])[1].backends == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--rates", "0"],
        ["--rates", "-5"],
        ["--rates", "abc"],
        ["--rates", "100,100"],
        ["--rates", ""],
        ["--rates", "100", "--connections", "16"],
        ["--rates", "100", "--profile", "/tmp/p"],
        ["--backends", "0"],
    ],
)
def test_bad_command_lines_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_generator_module_is_the_one_the_mode_starts() -> None:
    assert openloop.ARRIVALS == ("poisson", "uniform")
    assert overhead_rates.LATE_LAG_P99_MS > openloop.MIN_SLEEP_S * 1000  # its timer alone never flags a run


# --- the testbed: piggybacked reports on and off -------------------------------------------------------


def test_noreports_contender_runs_the_gateway_with_report_max_age_zero(tmp_path: Path) -> None:
    from benchmarks.testbed.cli import build_parser
    from benchmarks.testbed.contenders import contender, gateway_app, gateway_counters, plan

    off = contender("prequal_noreports")
    assert (off.kind, off.method, off.reports, off.cross_check, off.q_rif, off.fallback) == (
        "gateway",
        "prequal",
        False,
        True,
        None,
        None,
    )
    assert contender("prequal").reports is True and contender("prequal_nocheck").reports is True
    every = contender("prequal_q0.84_random_nocheck_noreports")
    assert (every.q_rif, every.fallback, every.cross_check, every.reports) == (0.84, "random", False, False)

    argv = plan(off, 2, [9001], [8001, 8002], tmp_path, seed=1).commands
    assert [a[a.index("--report-max-age-s") + 1] for a in argv] == ["0", "0"]
    assert "--report-max-age-s" not in plan(contender("prequal"), 1, [9001], [8001], tmp_path, seed=1).commands[0]

    app = gateway_app(["http://127.0.0.1:9"], "prequal", 1, report_max_age_s=0.0)
    pool = app.gateway.pools["/work"]
    assert pool.config.prequal.report_max_age_s == 0.0
    assert pool.clients[0].reads_reports is False  # the gateway does not even parse the reports
    on = gateway_app(["http://127.0.0.1:9"], "prequal", 1)
    assert on.gateway.pools["/work"].clients[0].reads_reports is True
    assert gateway_counters(app.gateway)["draws"] == {"from_reports": 0.0, "reused": 0.0, "pending": 0.0}

    parser = build_parser()
    assert parser.parse_args(["--contenders", "prequal,prequal_noreports"]).contenders == [
        "prequal",
        "prequal_noreports",
    ]
    for bad in ("prequal_noreport", "prequal_noreports_nocheck", "noreports", "round_robin_noreports"):
        with pytest.raises(ValueError, match="unknown contender"):
            contender(bad)
        with pytest.raises(SystemExit):
            parser.parse_args(["--contenders", bad])


def _aggregated(policy: str, load: float, p99s: list[float], p999s: list[float], probes: float) -> dict[str, Any]:
    runs = [{"round": r, "p99_ms": a, "p999_ms": b} for r, (a, b) in enumerate(zip(p99s, p999s, strict=True))]
    return {
        "policy": policy, "setting": "fleet", "load": load, "p99_ms": sorted(p99s)[len(p99s) // 2],
        "p999_ms": sorted(p999s)[len(p999s) // 2], "probes_per_req": probes, "errors": 0, "valid": True,
        "runs": runs,
    }  # fmt: skip


def test_reports_pair_table_puts_on_and_off_side_by_side() -> None:
    from benchmarks.testbed.report import reports_pair_table

    results = [
        _aggregated("prequal", 0.5, [200, 220, 240], [300, 330, 360], 0.4),
        _aggregated("prequal_noreports", 0.5, [210, 200, 300], [330, 330, 360], 3.0),
        _aggregated("round_robin", 0.5, [400, 400, 400], [500, 500, 500], 0.0),
        _aggregated("prequal", 1.2, [5000, 5000, 5000], [5000, 5000, 5000], 0.2),  # no partner at 1.2
    ]
    table = reports_pair_table(results, deadline_ms=5000.0)
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, one pair
    # Per-round ratios off / on: 1.05, 0.91, 1.25 -> 1.05; p99.9: 1.1, 1.0, 1.0 -> 1.0.
    assert lines[2] == ("| fleet | 0.5 | prequal | 220 / 210 | 330 / 330 | 0.40 / 3.00 | 1.05 | 1.00 | 0 / 0 | yes |")
    assert reports_pair_table(results[2:], deadline_ms=5000.0) == ""


def test_a_baseline_revision_gets_twins_only_of_the_targets_it_has(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    known = 'APPS = {"gateway_round_robin": 1, "gateway_prequal": 2}'
    (tmp_path / "benchmarks" / "overhead_targets.py").write_text(known)
    names = ["aiohttp_raw", "gateway_round_robin", "gateway_prequal", "gateway_prequal_agebound"]
    twins = overhead.baseline_targets(names, "abc123", tmp_path)
    assert [t.name for t in twins] == ["gateway_round_robin@abc123", "gateway_prequal@abc123"]
    assert all(t.cwd == tmp_path for t in twins)


def test_the_agebound_variant_is_compared_with_the_plain_round_robin() -> None:
    assert overhead_rates.round_robin_twin("gateway_prequal_agebound") == "gateway_round_robin"
    assert overhead_rates.round_robin_twin("gateway_prequal_aiohttp") == "gateway_round_robin_aiohttp"
    assert overhead_rates.round_robin_twin("gateway_prequal@95f9084") == "gateway_round_robin@95f9084"

"""Case 7: Redis stopped and restarted under load, two gateway processes sharing one real redis-server.

Three backend processes register themselves (``SelfRegistration``: lease 10 s, heartbeat every 1 s),
two with the first gateway and one with the second; each gateway learns the others' through Redis.
Under load on both gateways, Redis is stopped (SIGTERM by PID) for 2.5 s and started again:

- with ``appendonly yes`` (what the README recommends) it comes back with its data: no request may
  fail at any point, and membership converges;
- without persistence it comes back empty: no request may fail during the outage; afterwards the
  members are gone until each backend's next heartbeat gets a 404 and it registers again (documented:
  within one heartbeat interval), then membership converges.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.load import OpenLoop, describe_failures
from tests.reliability.procs import RedisProc, backend_proc, gateway_proc, running
from tests.reliability.report import Report
from tests.reliability.support import by_status, member_urls, ms, pools_env, seconds_until

RATE = 100  # per gateway
OUTAGE_S = 2.5
AFTER_S = 6.0
TTL_S = 10.0
HEARTBEAT_S = 1.0
# One jittered heartbeat, then registration and sync (about 1 s), and 2 s of room for a loaded machine.
# Backends that never registered again would fail requests until the load ends, AFTER_S after the restart,
# and membership would never converge (the wait below gives up after 10 s).
GAP_BOUND_S = HEARTBEAT_S * 1.2 + 3.0
CONVERGE_BOUND_S = GAP_BOUND_S + 2.0


def stale(gateway_url: str) -> bool:
    return bool(httpx.get(gateway_url + "/_prequal/backends", timeout=5).json()["registry"]["stale"])


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_redis_stopped_and_restarted_under_load(
    persistent: bool, log_dir: Path, tmp_path: Path, report: Report
) -> None:
    data = tmp_path / "redis-data"
    data.mkdir()
    redis = RedisProc(log_dir, data, persistent=persistent).start()
    env = pools_env({"/api": []}, PREQUAL_REGISTRY=redis.url)
    g1, g2 = gateway_proc("g1", log_dir, env), gateway_proc("g2", log_dir, env)
    backends = [
        backend_proc(f"b{i}", log_dir, register=gw.url + "/_prequal", ttl_s=TTL_S, interval_s=HEARTBEAT_S)
        for i, gw in enumerate((g1, g1, g2))
    ]
    everyone = sorted(b.url for b in backends)
    try:
        with running(g1, g2, ready_path="/_prequal/healthz"), running(*backends):
            seconds_until(
                lambda: member_urls(g1.url) == member_urls(g2.url) == everyone, 10, "both gateways to see every backend"
            )
            loads = [OpenLoop(g.url, rate=RATE, duration_s=2 + OUTAGE_S + AFTER_S).start() for g in (g1, g2)]
            time.sleep(2)
            stopped_at = time.time()
            redis.stop()
            # Seen within a refresh (1 s); the deadline only guards against never (2.3 s on a loaded machine).
            seconds_until(lambda: stale(g1.url) and stale(g2.url), 10, "both gateways to notice the outage")
            noticed_s = time.time() - stopped_at
            refused = httpx.post(g1.url + "/_prequal/register", json={"url": "http://127.0.0.1:9/"}).status_code
            time.sleep(max(0.0, OUTAGE_S - (time.time() - stopped_at)))
            restarted_at = time.time()
            redis.start()
            converged_s = seconds_until(
                lambda: (
                    not stale(g1.url) and not stale(g2.url) and member_urls(g1.url) == member_urls(g2.url) == everyone
                ),
                10,
                "membership to converge after the restart",
            )
            results = [r for load in loads for r in load.join()]
    finally:
        redis.stop()

    during = [r for r in results if r.start < restarted_at]
    after = [r for r in results if r.start >= restarted_at]
    failed_during = [r for r in during if not r.ok]
    failed_after = [r for r in after if not r.ok]
    gap = (max(r.start for r in failed_after) - restarted_at) if failed_after else 0.0
    kind = "appendonly yes" if persistent else "no persistence"
    report.record(
        7,
        f"Redis ({kind}) stopped for {OUTAGE_S:g} s and restarted; 2 gateway processes, 3 self-registered "
        f"backends (lease {TTL_S:g} s, heartbeat {HEARTBEAT_S:g} s)",
        load=f"{RATE} req/s GET on each gateway for {2 + OUTAGE_S + AFTER_S:g} s ({len(results)} requests)",
        happened=(
            f"outage seen as stale by both gateways within {ms(noticed_s)} (registration meanwhile: {refused}); "
            f"{len(failed_during)} failed requests during the outage; after the restart "
            + (
                f"{len(failed_after)} failed ({by_status(failed_after)}) for {ms(gap)} until the backends "
                "registered again"
                if failed_after
                else "none failed"
            )
        ),
        figure=(
            f"membership converged {ms(converged_s)} after the restart (bound < {ms(CONVERGE_BOUND_S)}); "
            + ("errors 0 throughout (bound 0)" if persistent else f"error gap {ms(gap)} (bound < {ms(GAP_BOUND_S)})")
        ),
        order=0 if persistent else 1,
    )
    assert refused == 503
    assert not failed_during, describe_failures(failed_during)
    assert converged_s < CONVERGE_BOUND_S
    if persistent:
        assert not failed_after, describe_failures(failed_after)
    else:
        assert all(r.status == 503 for r in failed_after), describe_failures(failed_after)
        assert gap < GAP_BOUND_S
    assert len(results) == 2 * int(RATE * (2 + OUTAGE_S + AFTER_S))

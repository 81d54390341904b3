"""The balancers compared, and how each is started in the ``single`` and ``fleet`` settings.

- ``prequal``, ``round_robin``, ``random``, ``least_request``, ``peak_ewma``: our gateway, a small ASGI app
  (404 for anything outside the pool) with ``PrequalMiddleware`` and one ``UpstreamPool("/work")`` over
  the replicas, every other setting at its default, under uvicorn (uvloop, httptools, no access log). The
  process is ``python -m benchmarks.testbed.contenders gateway --port P --policy NAME --upstreams ...``.
  Prequal variants (``contender``): ``prequal_q<Q_RIF>[_random][_nocheck][_noreports]``, ``prequal_nocheck``
  and ``prequal_noreports``, the same gateway with another Q_RIF, the paper's random fallback,
  ``PrequalSettings.cross_check`` off, or piggybacked reports off (``report_max_age_s=0``: every probe the
  sampler draws goes on the network, as in the paper; the replicas still attach their reports to
  responses, which the gateway then ignores).
  ``fleet``: 4 such processes, each on its own port with its own state; the load generator spreads the
  requests over them. (``clients_per_pool=4`` in one process would give 4 independent policy states
  too, but one event loop and one connection pool carrying the whole load: processes are what
  independent gateway instances are, they match nginx's and haproxy's fleets, and the 70%-of-a-core
  rule then applies to each instance.)
- ``nginx_least_conn``, ``nginx_round_robin``: one nginx, ``worker_processes 1`` (single) or ``4``
  (fleet) with ``listen ... reuseport`` (the kernel spreads the load generator's connections over the
  workers), no ``zone`` in the upstream block (so each worker keeps its own counters), keepalive to the
  upstreams, ``keepalive_requests`` raised, access log off.
- ``haproxy_leastconn``: haproxy 2.x, ``nbthread 1``, ``http-reuse always``. Fleet: 4 haproxy processes
  on 4 ports. (``nbthread 4`` in one process would share the servers' connection counts between the
  threads: leastconn state is per process, not per thread, and ``nbproc`` is gone since 2.5.)

Configuration files go to a temporary directory; every process runs in the foreground so the
benchmark can stop it by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GATEWAY_POLICIES = ("prequal", "round_robin", "random", "least_request", "peak_ewma")
ALL_CONTENDERS = (*GATEWAY_POLICIES, "nginx_least_conn", "nginx_round_robin", "haproxy_leastconn")
SETTINGS = ("single", "fleet")
DEFAULT_FLEET_INSTANCES = 4
POOL_PREFIX = "/work"  # the load generator's path; the replicas serve any path


@dataclass(frozen=True, slots=True)
class Contender:
    """A balancer under test."""

    name: str
    kind: str  # gateway, nginx or haproxy
    method: str  # the gateway policy, or the nginx / haproxy balancing method
    q_rif: float | None = None  # a Prequal variant's Q_RIF (``prequal_q0.6``); None: the run's setting
    fallback: str | None = None  # a Prequal variant's fallback (``prequal_q0.84_random``); None: the default
    cross_check: bool = True  # False: a Prequal variant that pools probe reports unchecked (``prequal_nocheck``)
    reports: bool = True  # False: piggybacked reports unused, every probe on the network (``prequal_noreports``)

    @property
    def binary(self) -> str | None:
        """The executable it needs besides Python, if any."""
        return None if self.kind == "gateway" else self.kind

    def available(self) -> bool:
        return self.binary is None or find_binary(self.binary) is not None


CONTENDERS: dict[str, Contender] = {
    **{name: Contender(name, "gateway", name) for name in GATEWAY_POLICIES},
    "nginx_least_conn": Contender("nginx_least_conn", "nginx", "least_conn"),
    "nginx_round_robin": Contender("nginx_round_robin", "nginx", "round_robin"),
    "haproxy_leastconn": Contender("haproxy_leastconn", "haproxy", "leastconn"),
}


VARIANT_GRAMMAR = "prequal_q<Q_RIF in [0, 1]>[_random][_nocheck][_noreports], prequal_nocheck, prequal_noreports"


def contender(name: str) -> Contender:
    """The contender called ``name``: one of ``ALL_CONTENDERS`` or a Prequal variant (``VARIANT_GRAMMAR``).

    ``prequal_q<Q_RIF>`` runs our gateway's Prequal with that Q_RIF; ``_random`` adds the paper's random
    fallback; ``_nocheck`` (alone: ``prequal_nocheck``, the defaults otherwise) turns
    ``PrequalSettings.cross_check`` off, so reports are pooled as the backends send them; ``_noreports``
    (alone: ``prequal_noreports``) sets ``PrequalSettings.report_max_age_s=0``: the gateway ignores the
    reports piggybacked on responses and sends every probe its sampler draws (the paper's rule, and the
    simulator's ``prequal_probeall``). Settings can then be compared side by side, interleaved in one run
    (``--contenders prequal,prequal_q0.84_random``, ``--contenders prequal,prequal_nocheck``,
    ``--contenders prequal,prequal_noreports``). Raises ``ValueError`` otherwise.
    """
    if name in CONTENDERS:
        return CONTENDERS[name]
    match = re.fullmatch(r"prequal(?:_q(\d+(?:\.\d+)?)(_random)?)?(_nocheck)?(_noreports)?", name)
    if match is None or (match.group(1) is None and match.group(3) is None and match.group(4) is None):
        raise ValueError(f"unknown contender {name!r}")
    q_rif = None if match.group(1) is None else float(match.group(1))
    if q_rif is not None and not 0.0 <= q_rif <= 1.0:
        raise ValueError(f"unknown contender {name!r}")
    fallback = "random" if match.group(2) else None
    cross_check = match.group(3) is None
    reports = match.group(4) is None
    return Contender(
        name, "gateway", "prequal", q_rif=q_rif, fallback=fallback, cross_check=cross_check, reports=reports
    )


def find_binary(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories Debian installs nginx and haproxy into."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """The processes one contender needs: argv of each, and the ports the load generator targets."""

    commands: list[list[str]]
    ports: list[int]


def plan(
    contender: Contender,
    instances: int,
    upstreams: Sequence[int],
    ports: Sequence[int],
    workdir: Path,
    seed: int,
    q_rif: float | None = None,
) -> LaunchPlan:
    """How to start ``instances`` independent instances of ``contender``; ``ports``: free ports, one per instance.

    ``q_rif`` overrides Prequal's ``Q_RIF`` in our gateway (the library's default otherwise); a variant's
    own ``Q_RIF`` wins over it. A ``_nocheck`` variant's gateway gets ``--no-cross-check``, a ``_noreports``
    variant's ``--report-max-age-s 0``.
    """
    if contender.kind == "gateway":
        variant_q_rif = q_rif if contender.q_rif is None else contender.q_rif
        commands = []
        for k in range(instances):
            commands.append(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.testbed.contenders",
                    "gateway",
                    "--port",
                    str(ports[k]),
                    "--policy",
                    contender.method,
                    "--seed",
                    str(seed * 101 + k),
                    "--upstreams",
                    ",".join(f"http://127.0.0.1:{p}" for p in upstreams),
                    "--stats",
                    str(workdir / f"gateway-{k}.json"),
                    *([] if variant_q_rif is None else ["--q-rif", repr(variant_q_rif)]),
                    *([] if contender.fallback is None else ["--fallback", contender.fallback]),
                    *([] if contender.cross_check else ["--no-cross-check"]),
                    *([] if contender.reports else ["--report-max-age-s", "0"]),
                ]
            )
        return LaunchPlan(commands, list(ports[:instances]))
    if contender.kind == "nginx":
        binary = find_binary("nginx")
        assert binary is not None
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_config(contender.method, instances, ports[0], upstreams, workdir), encoding="utf-8")
        return LaunchPlan([[binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]], [ports[0]])
    if contender.kind == "haproxy":
        binary = find_binary("haproxy")
        assert binary is not None
        commands = []
        for k in range(instances):
            conf = workdir / f"haproxy-{k}.cfg"
            conf.write_text(haproxy_config(contender.method, ports[k], upstreams), encoding="utf-8")
            commands.append([binary, "-db", "-f", str(conf)])
        return LaunchPlan(commands, list(ports[:instances]))
    raise ValueError(f"unknown contender kind {contender.kind!r}")


def nginx_config(method: str, workers: int, port: int, upstreams: Sequence[int], workdir: Path) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    balance = "        least_conn;\n" if method == "least_conn" else ""
    temp = "\n".join(
        f"    {name}_temp_path {workdir / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# generated by benchmarks.testbed
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
{temp}
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    upstream replicas {{
{balance}{servers}
        keepalive 512;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 2s;
            # A 503 is retried on another server, as our gateway's default retry_on_status does (only the
            # sinkhole case answers 503; a deadline 504 is not retried).
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 3;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


def haproxy_config(method: str, port: int, upstreams: Sequence[int]) -> str:
    servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(upstreams))
    return f"""# generated by benchmarks.testbed
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s
    http-reuse always
    retries 2
    retry-on conn-failure empty-response 503
    option redispatch 1
frontend fe
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance {method}
{servers}
"""


# --- the gateway process -----------------------------------------------------------------------------


def gateway_app(
    upstreams: Sequence[str],
    policy: str,
    seed: int,
    stats_path: str | None = None,
    q_rif: float | None = None,
    fallback: str | None = None,
    cross_check: bool = True,
    report_max_age_s: float | None = None,
) -> Any:
    """A bare ASGI app behind ``PrequalMiddleware`` with one pool at ``/work`` over ``upstreams``.

    ``q_rif``, ``fallback``, ``report_max_age_s``: Prequal's, when not None (``report_max_age_s=0``:
    piggybacked reports unused); ``cross_check=False``: probe reports unchecked.
    At shutdown the gateway's counters (probes by result, selections by reason, upstream attempts by
    outcome, retries, Prequal's cross-check corrections) are written to ``stats_path`` as JSON.
    """
    from prequal_middleware import Gateway, PrequalMiddleware, PrequalSettings, UpstreamPool

    overrides: dict[str, Any] = {}
    if q_rif is not None:
        overrides["q_rif"] = q_rif
    if fallback is not None:
        overrides["fallback"] = fallback
    if not cross_check:
        overrides["cross_check"] = False
    if report_max_age_s is not None:
        overrides["report_max_age_s"] = report_max_age_s
    prequal = PrequalSettings(**overrides)
    pool = UpstreamPool(POOL_PREFIX, upstreams=list(upstreams), policy=policy, strip_prefix=False, prequal=prequal)
    gateway = Gateway(pools=[pool], rng=random.Random(seed))

    async def host_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # PrequalMiddleware starts and stops the gateway on these
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if stats_path:
                        Path(stats_path).write_text(json.dumps(gateway_counters(gateway)), encoding="utf-8")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    return PrequalMiddleware(host_app, gateway=gateway)


def gateway_counters(gateway: Any) -> dict[str, dict[str, float]]:
    """The gateway's Prometheus counters of interest, summed over pools and backends, by their enum label.

    Plus ``cross_check``: the reports Prequal's cross-check raised (``rif``, ``latency``), summed over
    the pools' Prequal clients (zeros when it is off).
    """
    wanted = {
        "prequal_probes_total": "result",
        "prequal_selections_total": "reason",
        "prequal_upstream_requests_total": "outcome",
        "prequal_retries_total": "pool",
        "prequal_gateway_errors_total": "error",
        "prequal_ejections_total": "pool",
    }
    out: dict[str, dict[str, float]] = {}
    for family in gateway.metrics.registry.collect():
        for sample in family.samples:
            label = wanted.get(sample.name)
            if label is not None:
                bucket = out.setdefault(sample.name.removeprefix("prequal_").removesuffix("_total"), {})
                key = sample.labels.get(label, "")
                bucket[key] = bucket.get(key, 0.0) + sample.value
    checks = [c for pool in gateway.pools.values() for c in pool.clients if hasattr(c, "rif_corrections")]
    if checks:
        out["cross_check"] = {
            "rif": float(sum(c.rif_corrections for c in checks)),
            "latency": float(sum(c.latency_corrections for c in checks)),
        }
        # How the sampler's draws were answered besides probes on the network (piggybacked reports).
        out["draws"] = {
            key: float(sum(getattr(c, attr, 0) for c in checks))
            for key, attr in (
                ("from_reports", "probes_from_reports"),
                ("reused", "probes_reused"),
                ("pending", "probes_pending"),
            )
        }
    return out


def gateway_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.testbed.contenders gateway")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--policy", required=True, choices=GATEWAY_POLICIES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--upstreams", required=True, help="comma-separated URLs")
    parser.add_argument("--stats", help="write the gateway's counters here (JSON) at shutdown")
    parser.add_argument("--q-rif", type=float, help="Prequal's Q_RIF [the library's default]")
    parser.add_argument("--fallback", choices=("least_in_flight", "random"), help="[the library's default]")
    parser.add_argument("--no-cross-check", action="store_true", help="PrequalSettings(cross_check=False)")
    parser.add_argument(
        "--report-max-age-s", type=float, help="Prequal's report_max_age_s; 0: piggybacked reports unused [default]"
    )
    args = parser.parse_args(argv)
    import uvicorn

    upstreams = [u for u in args.upstreams.split(",") if u]
    app = gateway_app(
        upstreams,
        args.policy,
        args.seed,
        args.stats,
        args.q_rif,
        args.fallback,
        cross_check=not args.no_cross_check,
        report_max_age_s=args.report_max_age_s,
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "gateway":
        print("usage: python -m benchmarks.testbed.contenders gateway --port P --policy NAME --upstreams URLS")
        sys.exit(2)
    sys.exit(gateway_main(sys.argv[2:]))

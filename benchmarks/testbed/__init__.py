"""Load-balancing quality on real processes: ``python -m benchmarks.testbed``.

The real-process twin of the simulator (docs/simulator.md), on one machine, after the paper's testbed
(Prequal, NSDI '24, section 5; prequal-spec.md sections 11 and 13):

- ``fleet``: the replicas' model (private, heterogeneous, time-varying capacity; antagonists);
- ``replica``: replica processes, several uvicorn servers each, behind ``LoadReportingMiddleware``;
- ``loadgen``: the open-loop Poisson load generator (latency from the scheduled send time);
- ``contenders``: our gateway with each policy, nginx and haproxy, in the ``single`` and ``fleet`` settings;
- ``runner``: one fresh contender and load generator per run, CPU and counters over the measured window;
- ``metrics``, ``report``, ``plots``: percentiles and aggregation, the tables, the PNGs;
- ``cli``: the command line. Processes (pinning, stopping by PID), ports, /proc accounting and the
  percentile come from ``benchmarks.harness`` (``procs`` here only re-exports them for old imports).

    python -m benchmarks.testbed --setup         # apt-get install nginx haproxy when missing
    python -m benchmarks.testbed --quick         # about a minute
    python -m benchmarks.testbed                 # the full ramp, both settings, every contender
"""

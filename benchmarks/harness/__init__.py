"""What every benchmark needs besides its own measurement, once: ``benchmarks.harness``.

- ``procs``: start processes (pinned with ``taskset``, in their own session, tied to our life) and the
  guarantee that each one is stopped, by PID, in reverse order, a recycled PID never signalled;
- ``procfs``: ``/proc/<pid>/stat`` (parent, start time, CPU ticks) and a process's descendants;
- ``cpu``: CPU accounting, per process (ticks, schedstat nanoseconds, with descendants) and per CPU;
- ``ports``: free loopback ports and waiting for one to accept;
- ``stats``: the one percentile definition (nearest rank) and the median of the values present;
- ``rounds``: the contenders' order, rotated each round;
- ``progress``: progress lines on stderr (stdout keeps the tables).

Standard library only, and nothing imported here: a load generator child imports ``stats`` alone.
"""

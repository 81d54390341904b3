"""CPU accounting from /proc: per process (and its descendants), and per CPU.

Per process, two clocks: ``/proc/<pid>/stat`` ticks (``utime + stime + cutime + cstime``, 10 ms
granularity, waited-for children included) and ``/proc/<pid>/task/*/schedstat`` (nanoseconds on the
CPU, every live thread; ``process_cpu_s`` uses it when the kernel has it). Per CPU, ``/proc/stat``'s
jiffies: a benchmark pinned to one CPU compares what that CPU did with what its own processes took, the
rest being other load on a shared machine (or the hypervisor's steal).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .procfs import CLK_TCK, descendants, read_stat

__all__ = [
    "CLK_TCK",
    "CPU_CLOCK",
    "SCHEDSTAT",
    "CpuStat",
    "cpu_jiffies",
    "cpu_ticks",
    "cpu_times",
    "process_cpu_s",
]


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid``, in clock ticks; ProcessLookupError if it is gone."""
    stat = read_stat(pid)
    if stat is None:
        raise ProcessLookupError(f"no process {pid}")
    return stat.cpu_ticks


def cpu_times(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds (children included) of each process in ``pids`` and of their descendants, by PID."""
    out: dict[int, float] = {}
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            stat = read_stat(p)
            if stat is not None:
                out[p] = stat.cpu_s
    return out


def _schedstat_ok() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/schedstat") as f:
            return len(f.read().split()) >= 1
    except OSError:
        return False


SCHEDSTAT = _schedstat_ok()
CPU_CLOCK = "schedstat (ns, all threads)" if SCHEDSTAT else "stat ticks (utime + stime + children)"


def process_cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` has used: the sum over its live threads' schedstat run time (ns), else ticks."""
    if SCHEDSTAT:
        total = 0
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
        if tids:
            return total / 1e9
    return cpu_ticks(pid) / CLK_TCK


def _cpu_stat(cpu: int) -> CpuStat | None:
    """One CPU's line of /proc/stat, or None when there is no such CPU."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                values = [int(x) for x in line.split()[1:9]]
                values += [0] * (8 - len(values))  # old kernels have fewer columns
                user, nice, system, _idle, _iowait, irq, softirq, steal = values
                return CpuStat(sum(values), user + nice + system + irq + softirq, steal)
    return None


@dataclass(frozen=True)
class CpuStat:
    """Jiffies (clock ticks) of one CPU from /proc/stat (guest time is already inside user)."""

    total: int  # user + nice + system + idle + iowait + irq + softirq + steal
    busy: int  # user + nice + system + irq + softirq: work by any process on this CPU
    steal: int  # taken by the hypervisor for other guests

    @classmethod
    def read(cls, cpu: int) -> CpuStat:
        stat = _cpu_stat(cpu)
        if stat is None:
            raise RuntimeError(f"CPU {cpu} not in /proc/stat")
        return stat

    def pct_since(self, before: CpuStat, ticks: int) -> float:
        """``ticks`` as % of this CPU's time since ``before``."""
        total = self.total - before.total
        return 100.0 * ticks / total if total > 0 else 0.0


def cpu_jiffies(cpu: int) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of one CPU since boot; zeros when there is no such CPU.

    Here busy is everything but idle and iowait, *steal included* (``CpuStat.busy`` leaves it out): the
    testbed counts what the hypervisor took as interference together with other processes' work.
    """
    stat = _cpu_stat(cpu) or CpuStat(0, 0, 0)
    return (stat.busy + stat.steal) / CLK_TCK, stat.steal / CLK_TCK, stat.total / CLK_TCK

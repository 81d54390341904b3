"""Moved to ``benchmarks.harness`` (``procs``, ``procfs``, ``cpu``, ``ports``); this name is kept for old imports."""

from __future__ import annotations

from ..harness.cpu import CLK_TCK, cpu_jiffies, cpu_times
from ..harness.ports import free_port, wait_port
from ..harness.procfs import ProcStat, descendants, read_stat
from ..harness.procs import TASKSET, Supervisor

__all__ = [
    "CLK_TCK",
    "TASKSET",
    "ProcStat",
    "Supervisor",
    "cpu_jiffies",
    "cpu_times",
    "descendants",
    "free_port",
    "read_stat",
    "wait_port",
]

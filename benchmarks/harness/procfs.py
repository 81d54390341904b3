"""``/proc/<pid>/stat``: a process's parent, start time and CPU ticks, and its descendants (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/<pid>/stat says about one process."""

    pid: int
    ppid: int
    start_ticks: int  # since boot: with the PID, what identifies a process (PIDs are recycled)
    cpu_ticks: int  # utime + stime + cutime + cstime
    state: str  # R, S, D, ..., Z: a zombie has exited and only waits for its parent to reap it

    @property
    def cpu_s(self) -> float:
        """``cpu_ticks`` in seconds."""
        return self.cpu_ticks / CLK_TCK


def read_stat(pid: int) -> ProcStat | None:
    """``pid``'s /proc/<pid>/stat, or None when there is no such process (any more)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'. Fields after
    # "(comm)" start at field 3 (state): ppid is field 4, utime..cstime 14-17, starttime 22.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ProcStat(pid, int(fields[1]), int(fields[19]), ticks, fields[0])


def descendants(pid: int) -> list[int]:
    """``pid``'s live descendants (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                children.setdefault(stat.ppid, []).append(stat.pid)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out

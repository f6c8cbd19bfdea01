"""CPU time of processes and of the whole machine, from /proc (Linux): for the benches' notes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from devstack.processes import process_tree

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` so far (all its threads); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime and stime, fields 14 and 15 of stat


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds used so far by `pid` and its living descendants (a replica's workers)."""
    return sum(process_cpu_s(member) for member in process_tree(pid))


def named_cpu_s(names: Sequence[str]) -> float:
    """CPU seconds so far of every process on the machine whose command name is one of `names`."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8") as comm:
                if comm.read().strip() not in names:
                    continue
        except OSError:
            continue
        total += process_cpu_s(int(entry))
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / _TICKS


def shares(before: Mapping[str, float], after: Mapping[str, float], wall_s: float) -> dict[str, float]:
    """CPU seconds used between two readings, as a share of one core over `wall_s`."""
    return {name: round(max(0.0, after[name] - before[name]) / wall_s, 2) for name in before}

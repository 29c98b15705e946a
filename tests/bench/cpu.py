"""CPU time a set of running processes used: a figure the machine's noise moves far less
than a rate (other load on shared cores slows a run down, it does not add CPU to it)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from shared.pipeline_runner import ROOT

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds so far of `pid`; None once it has ended."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (14, 15)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds so far of every process in `pids` still alive."""
    return sum(seconds for pid in pids if (seconds := process_cpu_seconds(pid)) is not None)


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every core summed (/proc/stat):
    how saturated the machine was over a run tells why its latency was what it was."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # user .. steal (guest time is already in user)
    return (total - idle) / _TICKS_PER_S, total / _TICKS_PER_S


def stack_pid(name: str) -> int | None:
    """The pid of the stack's `name` (kafka, redis) from the pid file scripts/stack.py
    writes, if it runs here (None for one elsewhere, e.g. under docker-compose)."""
    try:
        pid = int((ROOT / ".run" / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None

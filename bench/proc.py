"""CPU time and resident memory of processes, read from /proc (Linux only).

CPU is utime + stime of ``/proc/PID/stat`` (all threads of the process), in
seconds. The RabbitMQ server is every process whose ``comm`` is ``beam.smp``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BROKER_COMM = "beam.smp"


def pids_named(comm: str) -> list[int]:
    """Pids whose /proc/PID/comm is exactly ``comm``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue  # the process went away while we looked
    return sorted(found)


def broker_pids() -> list[int]:
    pids = pids_named(BROKER_COMM)
    if not pids:
        raise RuntimeError("no beam.smp process found: is RabbitMQ running on this machine?")
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process; 0.0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: split after its closing paren.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / CLOCK_TICKS


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")

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


def broker_pids(amqp_port: int = 5672) -> list[int]:
    """The RabbitMQ server measured: the ``beam.smp`` listening on ``amqp_port``.

    ``rabbitmqctl`` and ``rabbitmq-plugins`` run short-lived ``beam.smp``
    processes of their own, and a test may run a second broker on other
    ports; neither is counted.
    """
    servers = [pid for pid in pids_named(BROKER_COMM) if _boots_rabbit(pid)]
    inodes = _listening_inodes(amqp_port)
    listening = [pid for pid in servers if inodes & _socket_inodes(pid)]
    if listening:
        return listening
    if not servers:
        raise RuntimeError("no RabbitMQ server (beam.smp) found: is RabbitMQ running here?")
    if len(servers) > 1:
        raise RuntimeError(f"several RabbitMQ servers and none found listening on {amqp_port}")
    return servers


def redis_pids(port: int = 6379) -> list[int]:
    """The Redis server measured for Socket.IO: the ``redis-server`` listening on ``port``."""
    inodes = _listening_inodes(port)
    found = [pid for pid in pids_named("redis-server") if inodes & _socket_inodes(pid)]
    if not found:
        raise RuntimeError(f"no redis-server found listening on {port}: is Redis running here?")
    return found


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[8:-1])
    except OSError:
        pass
    return found


def _boots_rabbit(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(args[i : i + 3] == [b"-s", b"rabbit", b"boot"] for i in range(len(args)))


class ProcessGone(RuntimeError):
    """A process measured over a window ended during it: the window is void."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process; raises ProcessGone if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        raise ProcessGone(f"process {pid} has ended") from None
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


def open_files(pid: int) -> tuple[int, int]:
    """(descriptors open now, soft limit) of a process."""
    count = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return count, (2**31 if soft == "unlimited" else int(soft))
    raise RuntimeError(f"no open-files limit for pid {pid}")

"""What this machine charges a process for being woken: CPU per round trip.

    .venv/bin/python -m bench.wakeup --trips 500

Two processes ping-pong one byte over a socketpair: the parent sends, the
child answers, and the parent waits ``--gap`` between round trips (or not
at all). Each side's CPU (user + system, from ``getrusage``) per round trip
is printed for every gap, and with both processes on one core as well as on
two (``os.sched_setaffinity``). The work per round trip is the same in every
row (a send and a receive on each side), so what grows with the gap is the
price of sleeping and being woken.

Why this exists: the gateway wakes ~3 times per message (the client's
publish, RabbitMQ's confirm, the stream delivery), Socket.IO's Redis adapter
twice and a bare broadcast once, so at tens or hundreds of messages a
second the ``bench.load`` ratios follow this figure more than the code
(docs/performance.md, "Issue 18, fifth session"). Print it next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from typing import Any

GAPS_MS = (0.0, 1.0, 10.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wakeup", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--trips", type=int, default=500, help="round trips per row")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.trips < 1:
        parser.error("--trips must be positive")
    return args


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def round_trips(trips: int, gap_s: float, cores: tuple[int, int] | None) -> dict[str, Any]:
    """CPU per round trip of each side; ``cores`` pins parent and child (None: free)."""
    parent_end, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: answer every byte, then leave without cleanup
        try:
            parent_end.close()
            if cores is not None:
                os.sched_setaffinity(0, {cores[1]})
            start = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
            for _ in range(trips):
                child_end.sendall(child_end.recv(1))
            spent = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - start
            child_end.sendall(repr(spent).encode())
        finally:
            os._exit(0)
    child_end.close()
    try:
        if cores is not None:
            os.sched_setaffinity(0, {cores[0]})
        start = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
        for _ in range(trips):
            parent_end.sendall(b"x")
            parent_end.recv(1)
            if gap_s:
                time.sleep(gap_s)
        spent = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - start
        child_spent = float(parent_end.recv(64).decode())
    finally:
        parent_end.close()
        os.waitpid(pid, 0)
        if cores is not None:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {
        "gap_ms": gap_s * 1000,
        "cores": "one" if cores is not None and cores[0] == cores[1] else "two",
        "parent_us_per_trip": 1e6 * spent / trips,
        "child_us_per_trip": 1e6 * child_spent / trips,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    placements: list[tuple[int, int]] = [(0, 0)]
    if (os.cpu_count() or 1) > 1:
        placements.append((0, 1))
    return [
        round_trips(args.trips, gap_ms / 1000, cores) for cores in placements for gap_ms in GAPS_MS
    ]


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "CPU per round trip over a socketpair (a send and a receive on each side)",
        f"{'cores':6} {'gap ms':>7} {'parent µs':>10} {'child µs':>9}",
    ]
    for row in rows:
        lines.append(
            f"{row['cores']:6} {row['gap_ms']:>7g} {row['parent_us_per_trip']:>10.1f} "
            f"{row['child_us_per_trip']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        print(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=2))
    else:
        print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

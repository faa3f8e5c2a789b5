"""Concurrent authenticated connections on one gateway process.

    .venv/bin/python -m bench.connections --connections 10000

Starts a gateway (TLS on unless ``--no-tls``), then client worker processes
that each open their share of the connections: TLS handshake, WebSocket
upgrade with ``Authorization: Bearer`` (a token per connection, each for its
own user, minted before the clock starts), up to ``welcome``. Reports the
handshake-plus-auth rate (connections/s, first start to last ``welcome``),
per-connection setup latency, the gateway's CPU seconds per connection, and
its resident memory (VmRSS) before and after, as KiB per idle connection.
Raises the open-files limit (soft to hard) in the clients and the gateway.

``--base-src DIR`` adds the copy of the code in DIR as a second target and
``--variant NAME,python=EXE,VAR=VALUE`` this code run with another
interpreter or environment; all targets are measured one after the other in
each of ``--rounds`` rounds, a fresh gateway each time:

    .venv/bin/python -m bench.connections --connections 10000 --rounds 2 \
        --base-src /tmp/rg-base --variant py312,python=/path/to/py312-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.clients import Connector, gather_limited
from bench.pool import Pool
from bench.proc import cpu_seconds, rss_kib
from bench.profiling import start_profiler, stop_profiler
from bench.target import raise_nofile_limit, start_gateway
from bench.wire import WsClient

CONNECTIONS_PER_WORKER = 2500
WARMUP_CONNECTIONS = 50
SETTLE_SECONDS = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.connections", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--connections", type=int, default=10_000, help="connections to open")
    parser.add_argument("--no-tls", action="store_true", help="plain ws:// (TLS is on by default)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help=f"client processes (default: one per {CONNECTIONS_PER_WORKER})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="handshakes in progress at once, over all client processes (default 64: below "
        "the listen backlog of 100, so no SYN is dropped and retried a second later)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=SETTLE_SECONDS,
        help="seconds the connections idle before RSS and idle CPU are read (use more than "
        "limits.heartbeat_seconds, 20, to include heartbeats)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the gateway with py-spy while connections open (FILE.svg or FILE.txt)",
    )
    parser.add_argument(
        "--gateway-src",
        type=Path,
        metavar="DIR",
        help="run the gateway package found in DIR (a copy with a change to measure)",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=10.0, help="how long --profile records"
    )
    parser.add_argument("--base-src", type=Path, metavar="DIR", help="also run the one in DIR")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[,python=EXE][,VAR=VALUE...]",
        help="one more target: this code with another interpreter and/or environment "
        "(e.g. mmap,MALLOC_MMAP_THRESHOLD_=131072); repeatable",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds (each runs every target)")
    args = parser.parse_args(argv)
    args.variants = []
    for spec in args.variant:
        name, *pairs = spec.split(",")
        if not name or name in ("gateway", "base") or any("=" not in p for p in pairs):
            parser.error(f"--variant wants NAME[,python=EXE][,VAR=VALUE...], got {spec!r}")
        settings = dict(pair.split("=", 1) for pair in pairs)
        python = settings.pop("python", None)
        args.variants.append((name, python, settings))
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be between 1 and 10")
    if args.connections < 1 or args.connections > 50_000:
        parser.error("--connections must be between 1 and 50000")
    return args


# --- the client worker -------------------------------------------------------------


def connections_worker(pipe: Connection, spec: dict[str, Any]) -> None:
    raise_nofile_limit()
    try:
        import uvloop

        uvloop.run(_connections(pipe, spec))
    except ImportError:  # pragma: no cover
        asyncio.run(_connections(pipe, spec))


async def _connections(pipe: Connection, spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
    os.set_blocking(pipe.fileno(), True)
    connector = Connector(spec["endpoint"])
    name = spec["name"]
    tokens = [connector.token(f"{name}-c{i}") for i in range(spec["count"])]
    pipe.send(("ready", {"subscribers": 0, "publishers": 0, "failures": {}}))
    opened: list[WsClient] = []
    while True:
        command = (await commands.get())[0]
        if command == "open":
            setup_ns: list[int] = []

            async def one(i: int, setup_ns: list[int] = setup_ns) -> WsClient:
                started = time.time_ns()
                client = await connector.open(f"{name}-c{i}", tokens[i])
                setup_ns.append(time.time_ns() - started)
                return client

            first = time.time()
            opened, failures = await gather_limited(spec["count"], spec["concurrency"], one)
            last = time.time()
            pipe.send(
                (
                    "opened",
                    {
                        "opened": len(opened),
                        "failures": dict(failures),
                        "first": first,
                        "last": last,
                        "setup_ns": np.array(setup_ns, dtype=np.int64).tobytes(),
                    },
                )
            )
        elif command == "count":
            pipe.send(("count", sum(1 for c in opened if c.is_open)))
        elif command == "exit":
            break
    for client in opened:
        client.close()
    await asyncio.sleep(0.5)
    pipe.send(("bye",))


# --- the controller ----------------------------------------------------------------


# Descriptors the gateway needs besides one per client connection.
GATEWAY_FD_MARGIN = 200


def run(
    args: argparse.Namespace,
    log: Any,
    source: Path | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    hard = raise_nofile_limit()
    if args.connections + WARMUP_CONNECTIONS + GATEWAY_FD_MARGIN > hard:
        raise RuntimeError(
            f"{args.connections} connections need about "
            f"{args.connections + WARMUP_CONNECTIONS + GATEWAY_FD_MARGIN} open files in the "
            f"gateway, but the hard limit (ulimit -Hn) is {hard}"
        )
    tls = not args.no_tls
    gateway = start_gateway(tls=tls, source=source, python=python, env_extra=env)
    try:
        endpoint = gateway.endpoint()
        # Warm up: first connections load code and caches that any gateway has.
        warm = Pool(
            connections_worker,
            [
                {
                    "endpoint": endpoint,
                    "name": "warm",
                    "count": WARMUP_CONNECTIONS,
                    "concurrency": 10,
                }
            ],
        )
        try:
            warm.wait_ready(60)
            warm.ask("open", timeout=120)
        finally:
            warm.close()
        time.sleep(1.0)
        workers = args.workers or max(1, math.ceil(args.connections / CONNECTIONS_PER_WORKER))
        share, extra = divmod(args.connections, workers)
        specs = [
            {
                "endpoint": endpoint,
                "name": f"w{i}",
                "count": share + (1 if i < extra else 0),
                "concurrency": max(1, args.concurrency // workers),
            }
            for i in range(workers)
        ]
        log(f"minting {args.connections} tokens in {workers} client process(es)")
        pool = Pool(connections_worker, specs)
        try:
            pool.wait_ready(300)
            rss_before = rss_kib(gateway.pid)
            cpu_before = cpu_seconds(gateway.pid)
            log(f"opening {args.connections} connections (TLS {'on' if tls else 'off'})")
            profiler = None
            if args.profile:
                profiler = start_profiler(args.profile, gateway.pid, args.profile_seconds)
            answers = [a[1] for a in pool.ask("open", timeout=600)]
            cpu_setup = cpu_seconds(gateway.pid) - cpu_before
            if profiler is not None:
                stop_profiler(profiler, log)
            cpu_hold_start = cpu_seconds(gateway.pid)
            time.sleep(args.hold)
            cpu_idle = (cpu_seconds(gateway.pid) - cpu_hold_start) / args.hold
            rss_after = rss_kib(gateway.pid)
            still_open = sum(a[1] for a in pool.ask("count"))
            gateway_alive = gateway.process.poll() is None
        finally:
            pool.close()
    finally:
        gateway.stop()
    opened = sum(a["opened"] for a in answers)
    failures: dict[str, int] = {}
    for a in answers:
        for reason, count in a["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
    span = max(a["last"] for a in answers) - min(a["first"] for a in answers)
    setup_ms = np.concatenate([np.frombuffer(a["setup_ns"], dtype=np.int64) for a in answers]) / 1e6
    return {
        "tls": tls,
        "requested": args.connections,
        "opened": opened,
        "failures": failures,
        "still_open_after_hold": still_open,
        "seconds_to_open": span,
        "connections_per_s": opened / span if span > 0 else float("nan"),
        "setup_ms": {
            "p50": float(np.percentile(setup_ms, 50)) if opened else float("nan"),
            "p99": float(np.percentile(setup_ms, 99)) if opened else float("nan"),
            "max": float(setup_ms.max()) if opened else float("nan"),
        },
        "gateway_cpu_seconds_opening": cpu_setup,
        "gateway_cpu_ms_per_connection": cpu_setup / opened * 1e3 if opened else float("nan"),
        # Heartbeats (a ping every limits.heartbeat_seconds per connection) and
        # timers: hold longer than the heartbeat interval to see them.
        "gateway_cpu_while_idle": cpu_idle,
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_kib_per_connection": (rss_after - rss_before) / opened if opened else float("nan"),
        "gateway_alive": gateway_alive,
        "client_processes": len(specs),
        "hold_seconds": args.hold,
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"bench.connections: {r['requested']} connections, TLS {'on' if r['tls'] else 'off'}, "
            f"{r['client_processes']} client process(es)",
            "",
            f"opened (welcome received)        {r['opened']}",
            f"still open after the hold        {r['still_open_after_hold']}",
            f"handshake+auth rate              {r['connections_per_s']:.0f} connections/s "
            f"({r['seconds_to_open']:.1f} s)",
            f"setup latency p50 / p99 / max    {r['setup_ms']['p50']:.1f} / "
            f"{r['setup_ms']['p99']:.1f} / {r['setup_ms']['max']:.1f} ms",
            f"gateway CPU per connection       {r['gateway_cpu_ms_per_connection']:.2f} ms",
            f"gateway CPU while they idle      {r['gateway_cpu_while_idle'] * 100:.1f} % of a core "
            f"(over {r['hold_seconds']:g} s)",
            f"gateway RSS before / after       {r['rss_kib_before'] / 1024:.1f} / "
            f"{r['rss_kib_after'] / 1024:.1f} MiB",
            f"RSS per idle connection          {r['rss_kib_per_connection']:.1f} KiB  "
            "(issue 18: target <= 30)",
        ]
        + ([f"failures                         {r['failures']}"] if r["failures"] else [])
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    targets: list[tuple[str, Path | None, str | None, dict[str, str]]] = [
        ("gateway", args.gateway_src, None, {})
    ]
    if args.base_src is not None:
        targets.append(("base", args.base_src, None, {}))
    targets += [(name, args.gateway_src, python, env) for name, python, env in args.variants]
    if len(targets) == 1 and args.rounds == 1:
        try:
            result = run(args, log, args.gateway_src)
        except (RuntimeError, OSError) as exc:
            print(f"bench.connections: error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"args": vars(args), **result}, indent=2, default=str))
        else:
            print(render(result))
        return 0
    rows: list[tuple[int, str, dict[str, Any]]] = []
    try:
        for number in range(args.rounds):
            for name, src, python, env in targets:
                log(f"round {number + 1}: {name} (load {_load()})")
                rows.append((number + 1, name, run(args, log, src, python, env)))
    except (RuntimeError, OSError) as exc:
        print(f"bench.connections: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        found = [{"round": n, "target": name, **r} for n, name, r in rows]
        print(json.dumps({"args": vars(args), "runs": found}, indent=2, default=str))
    else:
        print(render_table(rows))
    return 0


def render_table(rows: list[tuple[int, str, dict[str, Any]]]) -> str:
    lines = [
        f"{'round':>5} {'target':12} {'KiB/conn':>9} {'handshakes/s':>13} "
        f"{'CPU ms/conn':>12} {'setup p99 ms':>13} {'opened':>7}"
    ]
    for number, name, r in rows:
        lines.append(
            f"{number:>5} {name:12} {r['rss_kib_per_connection']:>9.1f} "
            f"{r['connections_per_s']:>13.0f} {r['gateway_cpu_ms_per_connection']:>12.2f} "
            f"{r['setup_ms']['p99']:>13.1f} {r['opened']:>7}"
        )
    lines.append(f"load at the end {_load()}")
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())

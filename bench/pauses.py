"""Event-loop pauses of one gateway holding many TLS connections with churn and fan-out.

    .venv/bin/python -m bench.pauses --connections 10000 --churn 100 --rate 100
    .venv/bin/python -m bench.pauses --connections 10000 --base-src /tmp/rg-base --rounds 3

Opens ``--connections`` authenticated connections (TLS unless ``--no-tls``) to
a gateway run under ``bench/probe.py``; ``--subscribers`` of them subscribe
to one channel that a publisher sends ``--rate`` messages/s to (confirmed,
as always), the others idle. Then, while measuring for ``--seconds``, client
workers close ``--churn`` connections a second and open as many new ones
(each a full TLS handshake, upgrade and token check). Reported from inside
the gateway: the event loop's lag p99, p99.9 and max (a 5 ms timer's
lateness) and the longest garbage collection (``gc.callbacks``) with counts
per generation; from outside: deliveries, their latency, the churn rate
reached and the gateway's RSS and CPU.

``--base-src DIR`` adds the copy of the code in DIR as a second target,
measured alternately with this one in each of ``--rounds`` rounds.
``--python EXE`` runs the gateway with another interpreter (one that has
the gateway's dependencies), ``--env NAME=VALUE`` adds to its environment.
``--variant NAME,python=EXE,VAR=VALUE`` adds this code run that way as one
more target, interleaved with the others in each round:

    .venv/bin/python -m bench.pauses --base-src /tmp/rg-base \
        --variant nofreeze,RABBITGATE_GC_FREEZE_SECONDS=0 \
        --variant py313,python=/path/to/py313-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.clients import Connector, Stats, gather_limited, worker_main
from bench.pool import Pool
from bench.proc import cpu_seconds, rss_kib
from bench.target import CHANNEL, raise_nofile_limit, start_gateway
from bench.wire import WsClient

CONNECTIONS_PER_WORKER = 2500
SETUP_TIMEOUT_SECONDS = 600.0
PROBE_TIMEOUT_SECONDS = 60.0
PING = b'{"type":"ping"}'
PING_TICK_SECONDS = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pauses", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--connections", type=int, default=10_000, help="connections held")
    parser.add_argument(
        "--subscribers", type=int, default=100, help="of them subscribed to the fan-out channel"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s published")
    parser.add_argument("--size", type=int, default=100, help="message body bytes")
    parser.add_argument(
        "--churn", type=float, default=100.0, help="connections closed (and as many opened) per s"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=3.0, help="churn before measuring")
    parser.add_argument("--no-tls", action="store_true", help="plain ws:// (TLS is the default)")
    parser.add_argument("--workers", type=int, default=0, help="client processes")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes at once")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (each runs every target)")
    parser.add_argument("--gateway-src", type=Path, metavar="DIR", help="run the gateway in DIR")
    parser.add_argument("--base-src", type=Path, metavar="DIR", help="also run the one in DIR")
    parser.add_argument("--python", metavar="EXE", help="interpreter for the gateway")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="added to the gateway's environment (repeatable)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[,python=EXE][,VAR=VALUE...]",
        help="one more target, this code run with another interpreter and/or environment "
        "(e.g. nofreeze,RABBITGATE_GC_FREEZE_SECONDS=0); repeatable, interleaved per round",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    args.variants = []
    for spec in args.variant:
        name, *pairs = spec.split(",")
        if not name or name in ("gateway", "base") or any("=" not in p for p in pairs):
            parser.error(f"--variant wants NAME[,python=EXE][,VAR=VALUE...], got {spec!r}")
        settings = dict(pair.split("=", 1) for pair in pairs)
        python = settings.pop("python", None)
        args.variants.append((name, python, settings))
    if not 1 <= args.connections <= 50_000:
        parser.error("--connections must be between 1 and 50000")
    if not 0 <= args.subscribers <= args.connections:
        parser.error("--subscribers must be between 0 and --connections")
    if args.churn < 0 or args.rate < 0 or args.seconds <= 0 or not 1 <= args.rounds <= 10:
        parser.error("--churn and --rate >= 0, --seconds > 0, --rounds 1..10")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
    return args


# --- the client worker -------------------------------------------------------------


def pauses_worker(pipe: Connection, spec: dict[str, Any]) -> None:
    raise_nofile_limit()
    try:
        import uvloop

        uvloop.run(_pauses_worker(pipe, spec))
    except ImportError:  # pragma: no cover
        asyncio.run(_pauses_worker(pipe, spec))


async def keep_alive(clients: Callable[[], list[WsClient]]) -> None:
    """Send ``{"type":"ping"}`` on each connection every ``heartbeat`` seconds of its
    welcome, as a client that only listens must (docs/security.md): otherwise the
    gateway's idle timeout (``limits.idle_timeout_seconds``, 300 s) closes them
    all, with 1000, once a window outlasts it. Each connection's first ping comes
    at a random point of its first interval, so they are spread, not in step."""
    loop = asyncio.get_running_loop()
    due: dict[WsClient, float] = {}
    tick = PING_TICK_SECONDS
    while True:
        await asyncio.sleep(tick)
        now = loop.time()
        current = clients()
        for client in current:
            heartbeat = client.heartbeat
            if heartbeat is None:
                continue  # not a rabbitgate connection: nothing to keep alive
            tick = min(tick, heartbeat / 4)  # a short heartbeat (a test's) is kept too
            when = due.get(client)
            if when is None:
                due[client] = now + random.uniform(0, heartbeat)
            elif when <= now:
                if client.on_text is None:
                    client.on_text = _ignore  # its pongs: nobody reads an idle inbox
                client.send_text(PING)
                due[client] = now + heartbeat
        if len(due) > 2 * len(current):  # forget the closed ones now and then
            alive = set(current)
            due = {c: t for c, t in due.items() if c in alive}


def _ignore(buf: bytearray, start: int, end: int, now_ns: int) -> None:
    return None


async def _pauses_worker(pipe: Connection, spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
    os.set_blocking(pipe.fileno(), True)
    connector = Connector(spec["endpoint"])
    name = spec["name"]
    stats = Stats()
    serial = 0

    async def open_idle(i: int) -> WsClient:
        return await connector.open(f"{name}-i{i}")

    async def open_subscriber(i: int) -> WsClient:
        client = await connector.open(f"{name}-s{i}")
        await connector.subscribe(client, CHANNEL, stats.on_message)
        return client

    limit = spec["concurrency"]
    subscribers, failures = await gather_limited(spec["subscribers"], limit, open_subscriber)
    idle, idle_failures = await gather_limited(spec["idle"], limit, open_idle)
    failures.update(idle_failures)
    keeping_alive = asyncio.create_task(keep_alive(lambda: subscribers + idle))
    pipe.send(
        ("ready", {"subscribers": len(subscribers), "idle": len(idle), "failures": dict(failures)})
    )
    churn = {"opened": 0, "closed": 0, "failed": 0, "setup_ns": []}
    churning: asyncio.Task[None] | None = None
    rng = random.Random(name)

    async def churn_loop(rate: float) -> None:
        nonlocal serial
        interval = 1.0 / rate
        due = loop.time()
        pending: set[asyncio.Task[None]] = set()

        async def replace() -> None:
            nonlocal serial
            if idle:
                victim = idle.pop(rng.randrange(len(idle)))
                victim.close()
                churn["closed"] += 1
            serial += 1
            started = time.monotonic_ns()
            try:
                idle.append(await connector.open(f"{name}-n{serial}"))
            except Exception:
                churn["failed"] += 1
                return
            churn["opened"] += 1
            churn["setup_ns"].append(time.monotonic_ns() - started)

        while True:
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            if len(pending) < limit:  # never more handshakes at once than at setup
                task = asyncio.create_task(replace())
                pending.add(task)
                task.add_done_callback(pending.discard)

    while True:
        command = await commands.get()
        kind = command[0]
        if kind == "churn_on" and spec["churn"] > 0:
            churning = asyncio.create_task(churn_loop(spec["churn"]))
            pipe.send(("ok",))
        elif kind == "measure_on":
            stats.reset()
            stats.measuring = True
            churn = {"opened": 0, "closed": 0, "failed": 0, "setup_ns": []}
            pipe.send(("ok",))
        elif kind == "measure_off":
            stats.measuring = False
            report = stats.report()
            report["churn"] = {
                **{k: v for k, v in churn.items() if k != "setup_ns"},
                "setup_ns": np.array(churn["setup_ns"], dtype=np.int64).tobytes(),
            }
            report["open"] = sum(1 for c in idle + subscribers if c.is_open)
            pipe.send(("stats", report))
        elif kind in ("churn_on",):
            pipe.send(("ok",))
        elif kind == "exit":
            break
    if churning is not None:
        churning.cancel()
    keeping_alive.cancel()
    for client in idle + subscribers:
        client.close()
    await asyncio.sleep(0.3)
    pipe.send(("bye",))


# --- the controller ----------------------------------------------------------------


def _probe(gateway: Any, probe_file: Path) -> dict[str, Any]:
    probe_file.unlink(missing_ok=True)
    os.kill(gateway.pid, signal.SIGUSR2)
    deadline = time.monotonic() + PROBE_TIMEOUT_SECONDS
    while not probe_file.exists():
        if time.monotonic() > deadline or gateway.process.poll() is not None:
            raise RuntimeError("the gateway's probe did not answer")
        time.sleep(0.05)
    found: dict[str, Any] = json.loads(probe_file.read_text())
    return found


def run_target(
    name: str,
    source: Path | None,
    args: argparse.Namespace,
    log: Any,
    python: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict:
    tls = not args.no_tls
    workdir = Path(tempfile.mkdtemp(prefix="rabbitgate-pauses-"))
    probe_file = workdir / "probe.json"
    env = dict(item.split("=", 1) for item in args.env)
    env.update(extra_env or {})
    gateway = start_gateway(
        tls=tls, source=source, probe_file=probe_file, python=python or args.python, env_extra=env
    )
    pool = publisher = None
    try:
        endpoint = gateway.endpoint()
        workers = args.workers or max(1, math.ceil(args.connections / CONNECTIONS_PER_WORKER))
        idle_total = args.connections - args.subscribers
        specs = [
            {
                "endpoint": endpoint,
                "name": f"{name}{i}",
                "subscribers": args.subscribers // workers + (i < args.subscribers % workers),
                "idle": idle_total // workers + (i < idle_total % workers),
                "churn": args.churn / workers,
                "concurrency": max(1, args.concurrency // workers),
            }
            for i in range(workers)
        ]
        log(f"[{name}] opening {args.connections} connections in {workers} worker(s)")
        started = time.monotonic()
        pool = Pool(pauses_worker, specs)
        ready = pool.wait_ready(SETUP_TIMEOUT_SECONDS)
        log(f"[{name}] opened in {time.monotonic() - started:.1f}s; publishing, churning")
        publisher = Pool(
            worker_main,
            [
                {
                    "endpoint": endpoint,
                    "channel": CHANNEL,
                    "size": args.size,
                    "window": 64,
                    "rate": args.rate,
                    "connect_concurrency": 1,
                    "name": "pub",
                    "subscribers": 0,
                    "publishers": 1 if args.rate > 0 else 0,
                }
            ],
        )
        publisher.wait_ready(SETUP_TIMEOUT_SECONDS)
        if args.rate > 0:
            publisher.ask("publish_on")
        pool.ask("churn_on")
        time.sleep(args.warmup)
        pool.ask("measure_on")
        publisher.ask("measure_on")
        os.kill(gateway.pid, signal.SIGUSR1)
        cpu_before = cpu_seconds(gateway.pid)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        inside = _probe(gateway, probe_file)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(gateway.pid) - cpu_before
        stats = [a[1] for a in pool.ask("measure_off", timeout=120)]
        pub = [a[1] for a in publisher.ask("measure_off")]
        rss = rss_kib(gateway.pid)
        if args.rate > 0:
            publisher.ask("publish_off")
        alive = gateway.process.poll() is None
    finally:
        for p in (publisher, pool):
            if p is not None:
                p.close()
        gateway.stop()
        probe_file.unlink(missing_ok=True)
        workdir.rmdir()
    latencies = np.concatenate([np.frombuffer(s["latencies_ns"], dtype=np.int64) for s in stats])
    latencies = latencies / 1e6
    setup = np.concatenate([np.frombuffer(s["churn"]["setup_ns"], dtype=np.int64) for s in stats])
    setup = setup / 1e6
    delivered = int(sum(s["received"] for s in stats))
    failures: dict[str, int] = {}
    for r in ready:
        for reason, count in r["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
    return {
        "target": name,
        "tls": tls,
        "connections": sum(r["subscribers"] + r["idle"] for r in ready),
        "open_at_end": sum(s["open"] for s in stats),
        "setup_failures": failures,
        "seconds": elapsed,
        "loop": inside,
        "published_per_s": sum(p["sent"] for p in pub) / elapsed,
        "delivered_per_s": delivered / elapsed,
        "delivery_latency_ms": {
            "p99": float(np.percentile(latencies, 99)) if delivered else float("nan"),
            "max": float(latencies.max()) if delivered else float("nan"),
        },
        "churn": {
            "opened_per_s": sum(s["churn"]["opened"] for s in stats) / elapsed,
            "closed_per_s": sum(s["churn"]["closed"] for s in stats) / elapsed,
            "failed": sum(s["churn"]["failed"] for s in stats),
            "setup_p99_ms": float(np.percentile(setup, 99)) if len(setup) else float("nan"),
        },
        "gateway_cpu_share": cpu / elapsed,
        "gateway_rss_mib": rss / 1024,
        "errors": sum(s["errors"] for s in stats),
        "gateway_alive": alive,
        "load_average_1m": os.getloadavg()[0],
    }


ROWS = [
    ("python", lambda r: r["loop"]["python"]),
    ("connections (open at end)", lambda r: f"{r['connections']} ({r['open_at_end']})"),
    ("loop lag p99 ms", lambda r: f"{r['loop']['lag_ms']['p99']:.1f}"),
    ("loop lag p99.9 ms", lambda r: f"{r['loop']['lag_ms']['p999']:.1f}"),
    ("loop lag max ms  (target <= 50)", lambda r: f"{r['loop']['lag_ms']['max']:.1f}"),
    ("longest GC pause ms", lambda r: f"{r['loop']['gc_pause_max_ms']:.1f}"),
    (
        "GC runs gen0/gen1/gen2",
        lambda r: "/".join(
            str(r["loop"]["gc_by_generation"].get(str(g), {}).get("count", 0)) for g in range(3)
        ),
    ),
    (
        "longest gen2 GC ms",
        lambda r: f"{r['loop']['gc_by_generation'].get('2', {}).get('max_ms', 0.0):.1f}",
    ),
    ("top 5 lags ms", lambda r: "/".join(f"{x:.0f}" for x in r["loop"]["lag_top_ms"])),
    ("top 5 GC ms", lambda r: "/".join(f"{x:.0f}" for x in r["loop"]["gc_pauses_top_ms"])),
    (
        "tracked objects (frozen)",
        lambda r: f"{r['loop']['gc_tracked_objects']} ({r['loop']['gc_frozen_objects']})",
    ),
    ("delivered msg/s", lambda r: f"{r['delivered_per_s']:.0f}"),
    ("delivery latency p99 ms", lambda r: f"{r['delivery_latency_ms']['p99']:.1f}"),
    ("delivery latency max ms", lambda r: f"{r['delivery_latency_ms']['max']:.1f}"),
    (
        "churn opened/closed per s",
        lambda r: f"{r['churn']['opened_per_s']:.0f}/{r['churn']['closed_per_s']:.0f}",
    ),
    ("churn failures", lambda r: f"{r['churn']['failed']}"),
    ("churn setup p99 ms", lambda r: f"{r['churn']['setup_p99_ms']:.0f}"),
    ("gateway CPU (share of a core)", lambda r: f"{r['gateway_cpu_share']:.2f}"),
    ("gateway RSS MiB", lambda r: f"{r['gateway_rss_mib']:.0f}"),
    ("machine load average (1 min)", lambda r: f"{r['load_average_1m']:.2f}"),
]


def render(args: argparse.Namespace, rounds: list[dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"bench.pauses: {args.connections} connections (TLS {'off' if args.no_tls else 'on'}), "
        f"{args.subscribers} subscribed, {args.rate:g} msg/s, churn {args.churn:g}/s, "
        f"{args.seconds:g} s"
    ]
    width = max(len(label) for label, _ in ROWS)
    for number, results in enumerate(rounds):
        lines += [
            "",
            f"round {number + 1}",
            f"{'':{width}}  " + "  ".join(f"{n:>12}" for n in results),
        ]
        for label, cell in ROWS:
            lines.append(
                f"{label:{width}}  " + "  ".join(f"{cell(r):>12}" for r in results.values())
            )
    if len(rounds) > 1:
        lines += ["", "over rounds: median [min, max]"]
        for name in rounds[0]:
            for key, read in (
                ("loop lag max ms", lambda r: r["loop"]["lag_ms"]["max"]),
                ("loop lag p99.9 ms", lambda r: r["loop"]["lag_ms"]["p999"]),
                ("longest GC pause ms", lambda r: r["loop"]["gc_pause_max_ms"]),
            ):
                values = [read(r[name]) for r in rounds]
                lines.append(
                    f"  {name:10} {key:22} {float(np.median(values)):8.1f}  "
                    f"[{min(values):.1f}, {max(values):.1f}]"
                )
    return "\n".join(lines)


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
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for number in range(args.rounds):
            if args.rounds > 1:
                log(f"round {number + 1} of {args.rounds}")
            rounds.append(
                {
                    name: run_target(name, src, args, log, python, env)
                    for name, src, python, env in targets
                }
            )
    except (RuntimeError, OSError) as exc:
        print(f"bench.pauses: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"args": vars(args), "rounds": rounds}, indent=2, default=str))
    else:
        print(render(args, rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

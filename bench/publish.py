"""Publish throughput with confirms: one gateway process against a bare aio-pika
publisher on the same broker, in one run.

    .venv/bin/python -m bench.publish --connections 4 --window 64 --seconds 10

rabbitgate: ``--connections`` client connections publish flat out, each
keeping ``--window`` publishes with an ``id`` unanswered at most; a publish
counts when its ack (sent after RabbitMQ's confirm) arrives. Bare: one
aio-pika connection with publisher confirms, ``connections x window``
publishes awaiting their confirm at any time, same exchange (so the same
history stream behind it), same body size. The ratio gateway / bare is what
the issue asks to be at least 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.clients import body_padding, make_body, worker_main
from bench.pool import Pool
from bench.proc import broker_pids, cpu_seconds
from bench.profiling import start_profiler, stop_profiler
from bench.target import AMQP_URL, CHANNEL, start_gateway

SETUP_TIMEOUT_SECONDS = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.publish", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--connections", type=int, default=4, help="publishing connections")
    parser.add_argument("--window", type=int, default=64, help="unconfirmed publishes each")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--size", type=int, default=200, help="message body bytes (JSON)")
    parser.add_argument("--tls", action="store_true", help="wss:// to the gateway")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--gateway-src",
        type=Path,
        metavar="DIR",
        help="run the gateway package found in DIR (a copy with a change to measure)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the gateway with py-spy during its window (FILE.svg or FILE.txt)",
    )
    args = parser.parse_args(argv)
    if min(args.connections, args.window, args.size) < 1 or args.seconds <= 0:
        parser.error("--connections, --window, --size and --seconds must be positive")
    if args.connections > 1000 or args.window > 10000:
        parser.error("--connections is capped at 1000 and --window at 10000")
    return args


# --- the bare aio-pika publisher (its own process) ------------------------------


def bare_worker(pipe: Connection, spec: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.run(_bare(pipe, spec))
    except ImportError:  # pragma: no cover
        asyncio.run(_bare(pipe, spec))


async def _bare(pipe: Connection, spec: dict[str, Any]) -> None:
    import aio_pika

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
    os.set_blocking(pipe.fileno(), True)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(spec["exchange"], ensure=False)
    padding = body_padding(spec["size"])
    counts = {"confirmed": 0, "failed": 0}
    measuring = False
    stop = asyncio.Event()

    async def publish_loop() -> None:
        while not stop.is_set():
            message = aio_pika.Message(
                make_body(padding),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            try:
                await exchange.publish(message, CHANNEL, timeout=10)
            except Exception:
                if measuring:
                    counts["failed"] += 1
                await asyncio.sleep(0.01)
                continue
            if measuring:
                counts["confirmed"] += 1

    pipe.send(("ready", {"subscribers": 0, "publishers": 1, "failures": {}}))
    tasks: list[asyncio.Task[None]] = []
    while True:
        command = (await commands.get())[0]
        if command == "publish_on":
            tasks = [asyncio.create_task(publish_loop()) for _ in range(spec["inflight"])]
            pipe.send(("ok",))
        elif command == "measure_on":
            counts.update(confirmed=0, failed=0)
            measuring = True
            pipe.send(("ok",))
        elif command == "measure_off":
            measuring = False
            pipe.send(("stats", {"acked": counts["confirmed"], "errors": counts["failed"]}))
        elif command == "publish_off":
            stop.set()
            await asyncio.wait(tasks, timeout=15)
            pipe.send(("ok",))
        elif command == "exit":
            break
    await connection.close()
    pipe.send(("bye",))


# --- the controller ----------------------------------------------------------------


def _measure(
    pool: Pool, server_pids: list[int], args: argparse.Namespace, profile_pid: int | None = None
) -> dict[str, Any]:
    pool.wait_ready(SETUP_TIMEOUT_SECONDS)
    pool.ask("publish_on")
    time.sleep(args.warmup)
    before = {pid: cpu_seconds(pid) for pid in server_pids}
    clients_before = pool.cpu_seconds()
    profiler = None
    if profile_pid is not None and args.profile:
        profiler = start_profiler(args.profile, profile_pid, args.seconds)
    pool.ask("measure_on")
    started = time.monotonic()
    time.sleep(args.seconds)
    if profiler is not None:
        stop_profiler(profiler, lambda text: print(text, file=sys.stderr))
    stats = [answer[1] for answer in pool.ask("measure_off")]
    elapsed = time.monotonic() - started
    after = {pid: cpu_seconds(pid) for pid in server_pids}
    clients = pool.cpu_seconds() - clients_before
    pool.ask("publish_off")
    confirmed = sum(s["acked"] for s in stats)
    return {
        "confirmed": confirmed,
        "confirmed_per_s": confirmed / elapsed,
        "errors": sum(s["errors"] for s in stats),
        "seconds": round(elapsed, 3),
        "cpu_seconds": {str(pid): after[pid] - before[pid] for pid in server_pids},
        "client_cpu_seconds": clients,
    }


def run(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    brokers = broker_pids()
    gateway = start_gateway(tls=args.tls, source=args.gateway_src)
    try:
        spec = {
            "endpoint": gateway.endpoint(),
            "channel": CHANNEL,
            "size": args.size,
            "window": args.window,
            "rate": 0.0,
            "name": "pub",
            "subscribers": 0,
            "publishers": args.connections,
            "connect_concurrency": 100,
        }
        log(f"[gateway] {args.connections} connections x window {args.window}, flat out")
        pool = Pool(worker_main, [spec])
        try:
            through_gateway = _measure(pool, brokers + [gateway.pid], args, gateway.pid)
        finally:
            pool.close()
        inflight = args.connections * args.window
        log(f"[bare aio-pika] one connection, {inflight} publishes in flight")
        bare_spec = {"exchange": gateway.exchange, "size": args.size, "inflight": inflight}
        pool = Pool(bare_worker, [bare_spec])
        try:
            bare = _measure(pool, brokers, args)
        finally:
            pool.close()
    finally:
        gateway.stop()
    gateway_cpu = through_gateway["cpu_seconds"].pop(str(gateway.pid))
    through_gateway["gateway_cpu_seconds"] = gateway_cpu
    through_gateway["gateway_us_per_publish"] = _per_publish(gateway_cpu, through_gateway)
    for result in (through_gateway, bare):
        result["broker_cpu_seconds"] = sum(result.pop("cpu_seconds").values())
        result["broker_us_per_publish"] = _per_publish(result["broker_cpu_seconds"], result)
        result["client_us_per_publish"] = _per_publish(result["client_cpu_seconds"], result)
    ratio = through_gateway["confirmed_per_s"] / bare["confirmed_per_s"] if bare["confirmed"] else 0
    return {"gateway": through_gateway, "bare_aio_pika": bare, "ratio": ratio}


def _per_publish(cpu_seconds: float, result: dict[str, Any]) -> float | None:
    """CPU microseconds per confirmed publish (None when nothing was confirmed)."""
    return cpu_seconds * 1e6 / result["confirmed"] if result["confirmed"] else None


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(args: argparse.Namespace, result: dict[str, Any]) -> str:
    gw, bare = result["gateway"], result["bare_aio_pika"]
    lines = [
        f"bench.publish: {args.connections} connection(s) x window {args.window}, "
        f"{args.size} B, {args.seconds:g} s, gateway TLS {'on' if args.tls else 'off'}",
        "",
        f"{'':28}{'gateway':>14}{'bare aio-pika':>16}",
        f"{'confirmed msg/s':28}{gw['confirmed_per_s']:>14.0f}{bare['confirmed_per_s']:>16.0f}",
        f"{'errors':28}{gw['errors']:>14}{bare['errors']:>16}",
        f"{'gateway CPU s':28}{gw['gateway_cpu_seconds']:>14.2f}{'-':>16}",
        f"{'broker CPU s':28}{gw['broker_cpu_seconds']:>14.2f}{bare['broker_cpu_seconds']:>16.2f}",
        f"{'client CPU s (load tool)':28}{gw['client_cpu_seconds']:>14.2f}"
        f"{bare['client_cpu_seconds']:>16.2f}",
        f"{'gateway CPU us/publish':28}{_us(gw['gateway_us_per_publish']):>14}{'-':>16}",
        f"{'broker CPU us/publish':28}{_us(gw['broker_us_per_publish']):>14}"
        f"{_us(bare['broker_us_per_publish']):>16}",
        f"{'client CPU us/publish':28}{_us(gw['client_us_per_publish']):>14}"
        f"{_us(bare['client_us_per_publish']):>16}",
        "",
        f"ratio gateway / bare aio-pika: {result['ratio']:.3f}  (target >= 0.7)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        result = run(args, log)
    except (RuntimeError, OSError) as exc:
        print(f"bench.publish: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"args": vars(args), **result}, indent=2, default=str))
    else:
        print(render(args, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

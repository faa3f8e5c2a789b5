"""Flood benchmark: delivery latency of well-behaved clients, without and with
one flooding client.

    .venv/bin/python -m bench.flood --clients 200 --seconds 20

Each phase starts its own gateway (``rabbitgate serve`` on 127.0.0.1, one rule
``room.{r}`` with a per-user publish limit), connects ``--clients``
well-behaved clients in rooms of ``--room-size`` (each subscribes to its room
and publishes ``--rate`` messages a second to it, each with an id), warms up,
then measures for ``--seconds``: the latency from publish to receipt at every
subscriber (p50, p99, max), and what was lost (published in the window but
not received by every member of the room).

In the flood phase one more client, in a process of its own, publishes to
room 0 as fast as it can (or at ``--flood-rate`` frames a second), ignoring
every ``rate_limited`` answer; when the gateway closes it (4429) it reconnects
at once, and retries at once when refused with 429. The figure that matters is
the ratio of the two p99 latencies (target: at most 2).

Everything runs on this host and contacts 127.0.0.1 only; every phase has a
timeout. Clients share one address here, so the per-address connection limits
are raised to let them in; the per-address connect *rate* stays at its
default and still throttles the flooder's reconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.target import (
    AMQP_URL,
    AUDIENCE,
    HOST,
    ISSUER,
    READY_TIMEOUT_SECONDS,
    GatewayProcess,
    bench_settings,
    free_port,
    port_open,
    raise_nofile_limit,
)
from bench.wire import OP_TEXT, HandshakeRefused, WsClient, client_frame, open_ws
from gateway.config import JwtSettings
from gateway.devtools.devcerts import client_ssl_context, make_dev_certificates
from gateway.devtools.devtokens import mint_token

SETUP_TIMEOUT_SECONDS = 120.0
# After the window: wait for what is still in flight, until everything arrived
# or nothing more did for DRAIN_QUIET_SECONDS (at most DRAIN_MAX_SECONDS).
DRAIN_QUIET_SECONDS = 3.0
DRAIN_MAX_SECONDS = 30.0
_SEND_TIME = re.compile(rb'"t":(\d+)')
_MESSAGE = b'{"type":"message"'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=200, help="well-behaved clients")
    parser.add_argument("--room-size", type=int, default=10, help="clients per room")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="messages/s each well-behaved client publishes"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument(
        "--flood-rate", type=float, default=0.0, help="flooder frames/s (0: as fast as it can)"
    )
    parser.add_argument(
        "--publish-limit", default="10/second", help="the rule's per-user publish limit"
    )
    parser.add_argument("--burst", type=int, default=20, help="the rule's burst")
    parser.add_argument("--tls", action="store_true", help="wss:// (TLS) to the gateway")
    parser.add_argument("--phases", default="baseline,flood", help="which phases to run, in order")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the phases this many times, interleaved (the median ratio is reported)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


# --- the gateway ----------------------------------------------------------------


def start_gateway(args: argparse.Namespace) -> GatewayProcess:
    """A gateway for one phase: rule ``room.{r}`` with the publish limit under test."""
    workdir = Path(tempfile.mkdtemp(prefix="rabbitgate-flood-"))
    exchange = f"rgflood-{secrets.token_hex(4)}"
    policies = workdir / "policies"
    policies.mkdir()
    rule = {
        "channel": "room.{r}",
        "exchange": exchange,
        "subscribe": ["anyone"],
        "publish": ["anyone"],
        "limits": {"publish": args.publish_limit, "burst": args.burst},
    }
    (policies / "10-flood.yaml").write_text(
        yaml.safe_dump({"version": 1, "rules": [rule]}, sort_keys=False)
    )
    secret = secrets.token_hex(32)
    secret_file = workdir / "jwt.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    port = free_port()
    config: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "amqp_url": AMQP_URL,
        "policies_dir": str(policies),
        "stream_max_bytes": 64 * 1024 * 1024,
        "log_level": "WARNING",
        # Every client comes from 127.0.0.1: let them all in at once. The
        # connect rate per address keeps its default (it throttles the flooder).
        "limits": {
            "connects_burst": args.clients + 100,
            "max_connections_per_address": 2 * args.clients + 100,
        },
        **bench_settings(),
        "jwt": {
            "algorithms": ["HS256"],
            "secret_file": str(secret_file),
            "issuer": ISSUER,
            "audience": AUDIENCE,
        },
    }
    ca_file = None
    if args.tls:
        certs = make_dev_certificates(workdir / "certs")
        config["tls"] = {
            "enabled": True,
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
        }
        ca_file = certs.ca_cert
    else:
        config["tls"] = {"enabled": False}
    config_file = workdir / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log_file = workdir / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=raise_nofile_limit,
        )
    jwt = JwtSettings(algorithms=("HS256",), secret=secret, issuer=ISSUER, audience=AUDIENCE)
    gateway = GatewayProcess(process, port, args.tls, workdir, jwt, exchange, ca_file, log_file)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = gateway.log_tail()
            gateway.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"the gateway did not start listening on {port}:\n{tail}")
        time.sleep(0.1)
    return gateway


def endpoint(gateway: GatewayProcess) -> dict[str, Any]:
    return {
        "port": gateway.port,
        "ca_file": str(gateway.ca_file) if gateway.ca_file else None,
        "secret": gateway.jwt.secret,
    }


async def connect(ep: dict[str, Any], sub: str) -> WsClient:
    """A connection past ``welcome``; raises HandshakeRefused (429...), OSError."""
    jwt = JwtSettings(algorithms=("HS256",), secret=ep["secret"], issuer=ISSUER, audience=AUDIENCE)
    token = mint_token(jwt, sub=sub, roles=["bench"], ttl_seconds=3600)
    tls = ep["ca_file"] is not None
    client = await open_ws(
        HOST,
        ep["port"],
        "/ws",
        ssl_context=client_ssl_context(Path(ep["ca_file"])) if tls else None,
        server_hostname="localhost" if tls else None,
        subprotocol="rabbitgate.v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    welcome = await client.next_text()
    if not welcome.startswith(b'{"type":"welcome"'):
        client.close()
        raise ConnectionError(f"expected welcome, got {welcome[:120]!r}")
    return client


# --- the well-behaved clients ---------------------------------------------------


@dataclass
class Room:
    """Who is in a room, and every message of the window received by each member."""

    members: int
    received: dict[tuple[int, int], int] = field(default_factory=dict)


@dataclass
class Measure:
    measuring: bool = False
    window_start_ns: int = 0
    window_end_ns: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    sent_ns: list[int] = field(default_factory=list)  # send time of each latency sample
    published: dict[tuple[int, int], int] = field(default_factory=dict)  # (client, n) -> room
    acks: int = 0
    rate_limited: int = 0
    other_errors: int = 0
    closed: int = 0


def on_frame(measure: Measure, rooms: list[Room]) -> Any:
    def handle(buf: bytearray, start: int, end: int, now_ns: int) -> None:
        payload = bytes(buf[start:end])
        if payload.startswith(_MESSAGE):
            found = _SEND_TIME.search(payload)
            if found is None:
                return  # the flooder's: no send time
            sent = int(found.group(1))
            if measure.window_start_ns <= sent < measure.window_end_ns:
                measure.latencies_ns.append(now_ns - sent)
                measure.sent_ns.append(sent)
                data = orjson.loads(payload)["data"]
                key = (data["c"], data["n"])
                room = rooms[data["r"]]
                room.received[key] = room.received.get(key, 0) + 1
            return
        frame = orjson.loads(payload)
        if frame.get("type") == "ack":
            measure.acks += 1
        elif frame.get("code") == "rate_limited":
            measure.rate_limited += 1
        elif frame.get("type") == "error":
            measure.other_errors += 1

    return handle


async def publish_steadily(
    client: WsClient, index: int, room: int, rate: float, measure: Measure, stop: asyncio.Event
) -> None:
    interval = 1.0 / rate
    await asyncio.sleep(random.uniform(0, interval))  # spread the clients over the interval
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    n = 0
    while not stop.is_set() and client.is_open:
        sent = time.time_ns()
        data = {"t": sent, "c": index, "n": n, "r": room}
        frame = {"type": "publish", "id": n, "channel": f"room.{room}", "data": data}
        client.send_text(orjson.dumps(frame))
        if measure.window_start_ns <= sent < measure.window_end_ns:
            measure.published[(index, n)] = room
        n += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def run_phase(args: argparse.Namespace, flood: bool) -> dict[str, Any]:
    gateway = start_gateway(args)
    flooder: multiprocessing.process.BaseProcess | None = None
    stop_flood: Event | None = None
    results: Any = None
    clients: list[WsClient] = []
    try:
        ep = endpoint(gateway)
        rooms_count = max(1, args.clients // args.room_size)
        rooms = [Room(members=0) for _ in range(rooms_count)]
        measure = Measure()
        async with asyncio.timeout(SETUP_TIMEOUT_SECONDS):
            for i in range(args.clients):
                client = await connect(ep, f"user{i}")
                room = i % rooms_count
                client.send_text(
                    orjson.dumps({"type": "subscribe", "id": "s", "channel": f"room.{room}"})
                )
                ack = await client.next_text()
                if not ack.startswith(b'{"type":"ack"'):
                    raise RuntimeError(f"subscribe refused: {ack[:200]!r}")
                client.on_text = on_frame(measure, rooms)
                rooms[room].members += 1
                clients.append(client)
        if flood:
            context = multiprocessing.get_context("spawn")
            stop_flood = context.Event()
            results = context.Queue()
            flooder = context.Process(
                target=flood_main, args=(ep, args.flood_rate, stop_flood, results), daemon=True
            )
            flooder.start()
        stop = asyncio.Event()
        now = time.time_ns()
        measure.window_start_ns = now + int(args.warmup * 1e9)
        measure.window_end_ns = measure.window_start_ns + int(args.seconds * 1e9)
        publishers = [
            asyncio.create_task(publish_steadily(c, i, i % rooms_count, args.rate, measure, stop))
            for i, c in enumerate(clients)
        ]
        await asyncio.sleep(args.warmup + args.seconds)
        stop.set()
        await asyncio.gather(*publishers)
        await drain(measure, rooms)
        flood_stats: dict[str, Any] = {}
        if flooder is not None and stop_flood is not None:
            stop_flood.set()
            with contextlib.suppress(Exception):
                flood_stats = results.get(timeout=15)
        return summarize(measure, rooms, clients, flood_stats, flood)
    finally:
        for client in clients:
            client.close()
        if flooder is not None:
            flooder.join(timeout=10)
            if flooder.is_alive():
                flooder.kill()
        await asyncio.sleep(0.2)
        await asyncio.to_thread(gateway.stop)  # it runs a loop of its own to clean up


async def drain(measure: Measure, rooms: list[Room]) -> None:
    expected = sum(rooms[room].members for room in measure.published.values())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_MAX_SECONDS
    last, quiet_since = -1, loop.time()
    while loop.time() < deadline:
        received = sum(sum(room.received.values()) for room in rooms)
        if received >= expected:
            return
        if received != last:
            last, quiet_since = received, loop.time()
        elif loop.time() - quiet_since >= DRAIN_QUIET_SECONDS:
            return
        await asyncio.sleep(0.1)


def summarize(
    measure: Measure,
    rooms: list[Room],
    clients: list[WsClient],
    flood_stats: dict[str, Any],
    flood: bool,
) -> dict[str, Any]:
    expected = sum(rooms[room].members for room in measure.published.values())
    delivered = sum(sum(room.received.values()) for room in rooms)
    missing = sum(
        max(0, rooms[room].members - rooms[room].received.get(key, 0))
        for key, room in measure.published.items()
    )
    duplicates = sum(
        max(0, count - room.members) for room in rooms for count in room.received.values()
    )
    latencies = sorted(measure.latencies_ns)
    # The worst latency of each second of the window: shows stalls apart from noise.
    worst: dict[int, int] = {}
    for sent, latency in zip(measure.sent_ns, measure.latencies_ns, strict=True):
        second = (sent - measure.window_start_ns) // 1_000_000_000
        worst[second] = max(worst.get(second, 0), latency)

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e6

    return {
        "phase": "flood" if flood else "baseline",
        "published": len(measure.published),
        "expected_deliveries": expected,
        "delivered": delivered,
        "missing": missing,
        "duplicates": duplicates,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] / 1e6 if latencies else None,
        "max_ms_by_second": [round(worst[k] / 1e6, 1) for k in sorted(worst)],
        "well_behaved_rate_limited": measure.rate_limited,
        "well_behaved_other_errors": measure.other_errors,
        "well_behaved_closed": sum(not c.is_open for c in clients),
        "flooder": flood_stats,
    }


# --- the flooder (its own process) ------------------------------------------------


def flood_main(ep: dict[str, Any], rate: float, stop: Event, results: Any) -> None:
    # A real flooder's CPU is on another machine. Here it shares the host with
    # the gateway and RabbitMQ, so it yields the CPU to them whenever they need it.
    os.nice(19)
    stats = asyncio.run(flood(ep, rate, stop))
    results.put(stats)


async def flood(ep: dict[str, Any], rate: float, stop: Event) -> dict[str, Any]:
    """Publish to room 0 flat out (or at ``rate``), reconnecting whenever closed."""
    stats: dict[str, Any] = {
        "connections": 0,
        "refused_429": 0,
        "other_refusals": 0,
        "refusal_reasons": {},
        "frames_sent": 0,
        "acked": 0,
        "rate_limited": 0,
        "close_codes": {},
    }
    # Frames written in one go, prebuilt: the flooder must not need much CPU
    # of its own, since it shares this host with the gateway and RabbitMQ.
    batch = 50 if rate > 0 else 500
    blob = b"".join(
        client_frame(
            OP_TEXT,
            orjson.dumps({"type": "publish", "id": i, "channel": "room.0", "data": {"f": i}}),
        )
        for i in range(batch)
    )
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            client = await connect(ep, "flooder")
        except HandshakeRefused as exc:
            key = "refused_429" if " 429 " in f" {exc.status} " else "other_refusals"
            stats[key] += 1
            await asyncio.sleep(0.001)  # ignores Retry-After: an abusive client
            continue
        except (OSError, ConnectionError, TimeoutError) as exc:
            stats["other_refusals"] += 1
            why = str(exc)[:60] or type(exc).__name__
            stats["refusal_reasons"][why] = stats["refusal_reasons"].get(why, 0) + 1
            await asyncio.sleep(0.01)
            continue
        stats["connections"] += 1

        def count(buf: bytearray, start: int, end: int, now_ns: int) -> None:
            head = bytes(buf[start : min(end, start + 40)])
            if head.startswith(b'{"type":"ack"'):
                stats["acked"] += 1
            elif b"rate_limited" in bytes(buf[start:end]):
                stats["rate_limited"] += 1

        client.on_text = count
        started = loop.time()
        sent_here = 0
        while client.is_open and not stop.is_set():
            transport = client.transport
            assert transport is not None
            if transport.get_write_buffer_size() < 1 << 20:
                transport.write(blob)
                sent_here += batch
                stats["frames_sent"] += batch
            if rate > 0:
                await asyncio.sleep(max(0.0, started + sent_here / rate - loop.time()))
            else:
                await asyncio.sleep(0.001)  # as fast as the gateway takes it
        code = str(client.close_code)
        stats["close_codes"][code] = stats["close_codes"].get(code, 0) + 1
        if client.transport is not None:
            client.transport.abort()  # an abusive client does not say goodbye
    return stats


# --- report -------------------------------------------------------------------------


def report(phases: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "clients": args.clients,
        "room_size": args.room_size,
        "rate_per_client": args.rate,
        "seconds": args.seconds,
        "tls": args.tls,
        "publish_limit": f"{args.publish_limit} burst {args.burst}",
        "phases": phases,
    }
    # One ratio per round (a baseline and the flood phase run right after it).
    ratios = []
    for base, flood in zip(phases, phases[1:], strict=False):
        if base["phase"] == "baseline" and flood["phase"] == "flood":
            if base["p99_ms"] and flood["p99_ms"]:
                ratios.append(flood["p99_ms"] / base["p99_ms"])
    if ratios:
        result["p99_ratios"] = ratios
        result["p99_ratio"] = statistics.median(ratios)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['clients']} well-behaved clients in rooms of {result['room_size']}, "
        f"{result['rate_per_client']}/s each, {result['seconds']} s window, "
        f"TLS {'on' if result['tls'] else 'off'}, rule limit {result['publish_limit']}"
    )
    header = f"{'phase':<9} {'published':>9} {'delivered':>9} {'missing':>7} {'dup':>4} "
    header += f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'limited':>7}"
    print(header)
    for p in result["phases"]:
        print(
            f"{p['phase']:<9} {p['published']:>9} {p['delivered']:>9} {p['missing']:>7} "
            f"{p['duplicates']:>4} {p['p50_ms'] or 0:>7.1f} {p['p99_ms'] or 0:>7.1f} "
            f"{p['max_ms'] or 0:>7.1f} {p['well_behaved_rate_limited']:>7}"
        )
    for p in result["phases"]:
        if p["flooder"]:
            f = p["flooder"]
            print(
                f"flooder: {f['frames_sent']} frames sent over {f['connections']} connections, "
                f"{f['acked']} acked, {f['rate_limited']} rate_limited, closes "
                f"{f['close_codes']}, {f['refused_429']} handshakes refused with 429"
            )
    if "p99_ratio" in result:
        verdict = "within" if result["p99_ratio"] <= 2 else "ABOVE"
        each = ", ".join(f"{r:.2f}" for r in result["p99_ratios"])
        print(
            f"p99 with flooder / without: {result['p99_ratio']:.2f} "
            f"(median of {each}; {verdict} the 2x target)"
        )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile_limit()
    phases = []
    for _ in range(args.repeat):
        for name in args.phases.split(","):
            phases.append(await run_phase(args, flood=name.strip() == "flood"))
    return report(phases, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fan-out load test: N subscribers on one channel, P publishers, rabbitgate
against its peers on the same machine, in one run.

    .venv/bin/python -m bench.load --subscribers 100 --rate 100 --seconds 20 --size 200
    .venv/bin/python -m bench.load --target gateway,socketio,webstomp,floor --rounds 3
    .venv/bin/python -m bench.load --target gateway,base --base-src /tmp/rg-base --rounds 3

Targets (``--target``, comma-separated, measured in that order each round):

- ``gateway``: this rabbitgate (or the one in ``--gateway-src``) + RabbitMQ;
- ``base``: the rabbitgate found in ``--base-src`` (a copy before a change),
  for an A/B comparison interleaved with ``gateway`` in the same run;
- ``webstomp``: RabbitMQ's Web-STOMP plugin on the same broker;
- ``socketio``: Socket.IO (node) with its Redis adapter on the local Redis
  (``bench/peers.py``, ``bench/socketio/``);
- ``floor``: a bare ``websockets`` broadcast server (``bench/floor.py``): one
  send per subscriber per message and nothing else.

For each target: connect the subscribers (spread over client worker
processes), start publishing, let it warm up, then measure for ``--seconds``:
messages delivered per second, latency from publish to receipt (p50, p99,
max), and the CPU seconds the servers spent in that window (read from
/proc). In the JSON, ``cpu_seconds.gateway`` is the target's own process
(the gateway, node, the floor server; 0 for Web-STOMP) and
``cpu_seconds.broker`` its shared backend (RabbitMQ's ``beam.smp``, or
``redis-server`` for Socket.IO), whose CPU at rest is measured just before.
The figure compared is server CPU microseconds per delivered message (own +
backend); ratios are rabbitgate's over each other target's, and with
``--rounds`` also their median and range. ``--json`` prints one JSON object.

Only 127.0.0.1 is ever contacted; every phase has a timeout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.clients import worker_main
from bench.peers import start_floor, start_socketio
from bench.pool import Pool
from bench.proc import broker_pids, cpu_seconds, total_cpu_seconds
from bench.profiling import start_profiler, stop_profiler
from bench.target import CHANNEL, ensure_webstomp, start_gateway, webstomp_endpoint

TARGETS = ("gateway", "base", "webstomp", "socketio", "floor")
# What the gateway's CPU per delivery is aimed at, as a ratio to each peer
# (issue 18); the Web-STOMP one is for TLS to rabbitgate.
TARGET_RATIOS = {"webstomp": 0.5, "socketio": 0.8}

SUBSCRIBERS_PER_WORKER = 500
SETUP_TIMEOUT_SECONDS = 180.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--subscribers", type=int, default=100, help="subscriber connections")
    parser.add_argument("--publishers", type=int, default=1, help="publisher connections")
    parser.add_argument(
        "--rate", type=float, default=100.0, help="total messages/s published (0: flat out)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=3.0,
        help="how long the broker's CPU at rest is measured before each target",
    )
    parser.add_argument("--size", type=int, default=200, help="message body bytes (JSON)")
    parser.add_argument("--tls", action="store_true", help="wss:// to the gateway")
    parser.add_argument(
        "--target",
        default="gateway,webstomp",
        help=f"comma-separated, from {', '.join(TARGETS)} ('both': gateway,webstomp)",
    )
    parser.add_argument(
        "--base-src",
        type=Path,
        metavar="DIR",
        help="the rabbitgate copy the 'base' target runs (e.g. a git worktree before a change)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help=f"subscriber worker processes (default: one per {SUBSCRIBERS_PER_WORKER}, at least 1)",
    )
    parser.add_argument(
        "--window", type=int, default=64, help="unconfirmed messages per publisher at most"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat gateway-then-webstomp this many times and also give the median "
        "ratios (for a machine shared with other work)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--gateway-src",
        type=Path,
        metavar="DIR",
        help="run the gateway package found in DIR (a copy with a change to measure)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the gateway with py-spy during the window (FILE.svg: flame graph, "
        "FILE.txt: collapsed stacks); the figures of a profiled run are not comparable",
    )
    args = parser.parse_args(argv)
    if args.subscribers < 1 or args.publishers < 1 or args.seconds <= 0 or args.size < 1:
        parser.error("--subscribers, --publishers, --seconds and --size must be positive")
    if args.idle_seconds <= 0:
        parser.error("--idle-seconds must be positive")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be between 1 and 10")
    if args.subscribers > 20000:
        parser.error("--subscribers is capped at 20000")
    names = ["gateway", "webstomp"] if args.target == "both" else args.target.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names or len(set(names)) != len(names):
        parser.error(f"--target: each of {', '.join(TARGETS)} at most once, got {args.target!r}")
    if "base" in names and args.base_src is None:
        parser.error("--target base needs --base-src DIR")
    args.targets = names
    return args


def _specs(args: argparse.Namespace, endpoint: dict[str, Any]) -> tuple[list[dict], dict]:
    workers = args.workers or max(1, math.ceil(args.subscribers / SUBSCRIBERS_PER_WORKER))
    base = {
        "endpoint": endpoint,
        "channel": CHANNEL,
        "size": args.size,
        "window": args.window,
        "rate": args.rate / args.publishers,
        "connect_concurrency": 100,
    }
    share, extra = divmod(args.subscribers, workers)
    subscriber_specs = [
        {**base, "name": f"w{i}", "subscribers": share + (1 if i < extra else 0), "publishers": 0}
        for i in range(workers)
    ]
    publisher_spec = {**base, "name": "pub", "subscribers": 0, "publishers": args.publishers}
    return subscriber_specs, publisher_spec


def run_target(
    kind: str,
    args: argparse.Namespace,
    log: Any,
    *,
    gateway_settings: dict[str, Any] | None = None,
    broker_ports: tuple[int, ...] = (5672,),
    ready: Any = None,
) -> dict[str, Any]:
    """One measurement. ``gateway_settings``: extra settings of the gateway
    (bench.fleet: workers, a cluster's amqp_url); ``broker_ports``: the nodes
    whose CPU counts as the broker's; ``ready(gateway)``: waits until it serves."""
    gateway: Any = None  # the target's own process(es): a gateway or a peer
    subscribers = publishers = None
    gateway_pids: list[int] = []
    try:
        if kind in ("gateway", "base"):
            source = args.gateway_src if kind == "gateway" else args.base_src
            gateway = start_gateway(tls=args.tls, source=source, extra=gateway_settings)
            if ready is not None:
                ready(gateway)
            endpoint = gateway.endpoint()
            brokers = [pid for port in broker_ports for pid in broker_pids(port)]
        elif kind == "webstomp":
            ensure_webstomp(args.subscribers + args.publishers)
            endpoint = webstomp_endpoint()
            brokers = [pid for port in broker_ports for pid in broker_pids(port)]
        elif kind == "socketio":
            gateway = start_socketio()
            endpoint = gateway.endpoint()
            brokers = gateway.extra_pids  # Redis
        else:
            gateway = start_floor()
            endpoint = gateway.endpoint()
            brokers = []
        idle_before = total_cpu_seconds(brokers)
        time.sleep(args.idle_seconds)
        broker_idle = (total_cpu_seconds(brokers) - idle_before) / args.idle_seconds
        sub_specs, pub_spec = _specs(args, endpoint)
        log(f"[{kind}] connecting {args.subscribers} subscribers in {len(sub_specs)} worker(s)")
        started = time.monotonic()
        subscribers = Pool(worker_main, sub_specs)
        answers = subscribers.wait_ready(SETUP_TIMEOUT_SECONDS)
        connect_seconds = time.monotonic() - started
        publishers = Pool(worker_main, [pub_spec])
        answers += publishers.wait_ready(SETUP_TIMEOUT_SECONDS)
        connected = sum(r["subscribers"] for r in answers)
        failures: dict[str, int] = {}
        for r in answers:
            for reason, count in r["failures"].items():
                failures[reason] = failures.get(reason, 0) + count
        if connected == 0 or sum(r["publishers"] for r in answers) == 0:
            raise RuntimeError(f"[{kind}] no connection could be set up: {failures}")
        log(f"[{kind}] {connected} subscribers ready in {connect_seconds:.1f}s; publishing")
        publishers.ask("publish_on")
        time.sleep(args.warmup)

        gateway_pids = gateway.pids() if gateway else []
        server_pids = brokers + gateway_pids
        cpu_before = {pid: cpu_seconds(pid) for pid in server_pids}
        clients_before = subscribers.cpu_seconds() + publishers.cpu_seconds()
        profiler = None
        if kind == "gateway" and args.profile:
            profiler = start_profiler(args.profile, gateway.pid, args.seconds)
        subscribers.ask("measure_on")
        publishers.ask("measure_on")
        t0 = time.monotonic()
        time.sleep(args.seconds)
        if profiler is not None:
            stop_profiler(profiler, log)
        pub_stats = [a[1] for a in publishers.ask("measure_off")]
        sub_stats = [a[1] for a in subscribers.ask("measure_off", timeout=120)]
        elapsed = time.monotonic() - t0
        cpu_after = {pid: cpu_seconds(pid) for pid in server_pids}
        clients_cpu = subscribers.cpu_seconds() + publishers.cpu_seconds() - clients_before
        load_average = os.getloadavg()[0]
        publishers.ask("publish_off")
        gateway_alive = gateway is None or gateway.process.poll() is None
    finally:
        for pool in (publishers, subscribers):
            if pool is not None:
                pool.close()
        if gateway is not None:
            gateway.stop()

    broker_cpu = sum(cpu_after[p] - cpu_before[p] for p in brokers)
    gateway_cpu = sum(cpu_after[p] - cpu_before[p] for p in gateway_pids)
    latencies = (
        np.concatenate([np.frombuffer(s["latencies_ns"], dtype=np.int64) for s in sub_stats]) / 1e6
    )
    delivered = sum(s["received"] for s in sub_stats)
    published = sum(s["sent"] for s in pub_stats)
    confirmed = sum(s["acked"] for s in pub_stats)
    server_cpu = broker_cpu + gateway_cpu
    errors = sum(s["errors"] for s in sub_stats + pub_stats)
    close_codes: dict[str, int] = {}
    for s in sub_stats + pub_stats:
        for code, count in s["close_codes"].items():
            close_codes[str(code)] = close_codes.get(str(code), 0) + count
    samples = [x for s in sub_stats + pub_stats for x in s["error_samples"]][:3]
    per = (lambda cpu: cpu / delivered * 1e6) if delivered else (lambda cpu: float("nan"))
    return {
        "target": kind,
        "tls": bool(args.tls) if kind in ("gateway", "base") else False,
        "subscribers": connected,
        "subscriber_failures": failures,
        "publishers": args.publishers,
        "rate": args.rate,
        "size": args.size,
        "seconds": round(elapsed, 3),
        "published_per_s": published / elapsed,
        "confirmed_per_s": confirmed / elapsed,
        "delivered": delivered,
        "delivered_per_s": delivered / elapsed,
        "delivery_ratio": delivered / (published * connected) if published and connected else 0.0,
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)) if delivered else float("nan"),
            "p99": float(np.percentile(latencies, 99)) if delivered else float("nan"),
            "max": float(latencies.max()) if delivered else float("nan"),
        },
        "cpu_seconds": {
            "gateway": gateway_cpu,
            "broker": broker_cpu,
            "server": server_cpu,
            "clients": clients_cpu,
            "broker_idle_per_s": broker_idle,
        },
        "cpu_us_per_delivery": {
            "gateway": per(gateway_cpu),
            "broker": per(broker_cpu),
            "server": per(server_cpu),
            # The broker's CPU less what it spent at rest just before: on a broker
            # shared with other work, closer to what this workload cost it.
            "server_above_idle": per(max(0.0, server_cpu - broker_idle * elapsed)),
        },
        "errors": errors,
        "error_samples": samples,
        "closed_connections": sum(s["closed"] for s in sub_stats),
        "close_codes": close_codes,
        "gateway_alive": gateway_alive,
        "connect_seconds": connect_seconds,
        "load_average_1m": load_average,
    }


def ratio_to(gw: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """rabbitgate's figures over another target's (< 1: rabbitgate spends less)."""

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(b) else float("nan")

    return {
        "server_cpu_per_delivery": ratio(
            gw["cpu_us_per_delivery"]["server"], other["cpu_us_per_delivery"]["server"]
        ),
        "server_cpu_above_idle_per_delivery": ratio(
            gw["cpu_us_per_delivery"]["server_above_idle"],
            other["cpu_us_per_delivery"]["server_above_idle"],
        ),
        "p50_latency": ratio(gw["latency_ms"]["p50"], other["latency_ms"]["p50"]),
        "p99_latency": ratio(gw["latency_ms"]["p99"], other["latency_ms"]["p99"]),
        "delivered_per_s": ratio(gw["delivered_per_s"], other["delivered_per_s"]),
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """``gateway`` over every other target measured, by that target's name."""
    gw = results.get("gateway")
    found = {name: ratio_to(gw, r) for name, r in results.items() if gw and name != "gateway"}
    return found or None


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("subscribers connected", lambda r: f"{r['subscribers']}"),
        (
            "published msg/s (confirmed)",
            lambda r: f"{r['published_per_s']:.0f} ({r['confirmed_per_s']:.0f})",
        ),
        ("delivered msg/s", lambda r: f"{r['delivered_per_s']:.0f}"),
        ("delivery ratio", lambda r: f"{r['delivery_ratio']:.3f}"),
        ("latency p50 ms", lambda r: f"{r['latency_ms']['p50']:.2f}"),
        ("latency p99 ms", lambda r: f"{r['latency_ms']['p99']:.2f}"),
        ("latency max ms", lambda r: f"{r['latency_ms']['max']:.2f}"),
        ("own process CPU s", lambda r: f"{r['cpu_seconds']['gateway']:.2f}"),
        ("backend CPU s (RabbitMQ/Redis)", lambda r: f"{r['cpu_seconds']['broker']:.2f}"),
        ("client CPU s (load tool)", lambda r: f"{r['cpu_seconds']['clients']:.2f}"),
        (
            f"backend idle CPU s/s ({args.idle_seconds:g} s before)",
            lambda r: f"{r['cpu_seconds']['broker_idle_per_s']:.3f}",
        ),
        ("own process us/delivery", lambda r: f"{r['cpu_us_per_delivery']['gateway']:.2f}"),
        ("backend us/delivery", lambda r: f"{r['cpu_us_per_delivery']['broker']:.2f}"),
        ("server us/delivery", lambda r: f"{r['cpu_us_per_delivery']['server']:.2f}"),
        (
            "  same, backend idle deducted",
            lambda r: f"{r['cpu_us_per_delivery']['server_above_idle']:.2f}",
        ),
        ("errors / closed conns", lambda r: f"{r['errors']} / {r['closed_connections']}"),
        ("machine load average (1 min)", lambda r: f"{r['load_average_1m']:.2f}"),
    ]
    names = list(results)
    head = (
        f"bench.load: {args.subscribers} subscribers, {args.publishers} publisher(s), "
        f"rate {'flat out' if not args.rate else f'{args.rate:g} msg/s'}, {args.size} B, "
        f"{args.seconds:g} s, gateway TLS {'on' if args.tls else 'off'}"
    )
    width = max(len(label) for label, _ in rows)
    lines = [head, "", f"{'':{width}}  " + "  ".join(f"{n:>14}" for n in names)]
    for label, cell in rows:
        lines.append(f"{label:{width}}  " + "  ".join(f"{cell(results[n]):>14}" for n in names))
    for other, found in (ratios(results) or {}).items():
        aim = TARGET_RATIOS.get(other)
        lines += [
            "",
            f"ratios gateway / {other}:",
            f"  server CPU per delivery  {found['server_cpu_per_delivery']:.3f}"
            + (f"  (target <= {aim:g})" if aim else ""),
            f"    backend idle deducted  {found['server_cpu_above_idle_per_delivery']:.3f}",
            f"  p99 latency              {found['p99_latency']:.3f}"
            + ("  (target <= 1.0)" if aim else ""),
            f"  p50 latency              {found['p50_latency']:.3f}",
            f"  delivered msg/s          {found['delivered_per_s']:.3f}",
        ]
    for name, r in results.items():
        if r["subscriber_failures"] or r["error_samples"] or r["close_codes"]:
            lines.append(
                f"[{name}] connect failures {r['subscriber_failures']}, close codes "
                f"{r['close_codes']}, error samples {r['error_samples']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    kinds = args.targets
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for number in range(args.rounds):
            if args.rounds > 1:
                log(f"round {number + 1} of {args.rounds}")
            rounds.append({kind: run_target(kind, args, log) for kind in kinds})
    except (RuntimeError, OSError) as exc:
        print(f"bench.load: error: {exc}", file=sys.stderr)
        return 1
    per_round = [ratios(results) for results in rounds]
    summary = median_ratios(per_round)
    if args.json:
        report: dict[str, Any] = {
            "args": vars(args),
            "results": rounds[-1],
            "ratios": per_round[-1],
            "over_rounds": {
                "ratios": summary,
                "targets": target_ranges(rounds),
            },
        }
        if args.rounds > 1:
            report["rounds"] = [
                {"results": r, "ratios": q} for r, q in zip(rounds, per_round, strict=True)
            ]
        print(json.dumps(report, indent=2, default=str))
        return 0
    for number, results in enumerate(rounds):
        if args.rounds > 1:
            print(f"\n=== round {number + 1} of {args.rounds}")
        print(render(args, results))
    if args.rounds > 1:
        print(f"\nper target over {args.rounds} rounds: median [min, max]")
        for name, figures in target_ranges(rounds).items():
            print(f"  {name}")
            for key, (median, low, high) in figures.items():
                print(f"    {key:28} {median:9.2f}  [{low:.2f}, {high:.2f}]")
    if args.rounds > 1 and summary:
        for other, figures in summary.items():
            print(f"\nratios gateway / {other} over {args.rounds} rounds: median [min, max]")
            for key, (median, low, high) in figures.items():
                print(f"  {key:36} {median:.3f}  [{low:.3f}, {high:.3f}]")
    return 0


def target_ranges(
    rounds: list[dict[str, dict[str, Any]]],
) -> dict[str, dict[str, tuple[float, float, float]]]:
    """(median, min, max) over rounds of each target's CPU per delivery and latency."""
    figures = {
        "server_us_per_delivery": lambda r: r["cpu_us_per_delivery"]["server"],
        "own_process_us_per_delivery": lambda r: r["cpu_us_per_delivery"]["gateway"],
        "backend_us_per_delivery": lambda r: r["cpu_us_per_delivery"]["broker"],
        "latency_p50_ms": lambda r: r["latency_ms"]["p50"],
        "latency_p99_ms": lambda r: r["latency_ms"]["p99"],
        "delivery_ratio": lambda r: r["delivery_ratio"],
    }
    found: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name in rounds[0]:
        found[name] = {}
        for key, read in figures.items():
            values = np.array([read(r[name]) for r in rounds])
            found[name][key] = (
                float(np.median(values)),
                float(values.min()),
                float(values.max()),
            )
    return found


def median_ratios(
    per_round: list[dict[str, dict[str, float]] | None],
) -> dict[str, dict[str, tuple[float, float, float]]] | None:
    """(median, min, max) of each ratio to each target over rounds (None: nothing compared)."""
    found = [r for r in per_round if r]
    if not found:
        return None
    summary: dict[str, dict[str, tuple[float, float, float]]] = {}
    for other in found[0]:
        summary[other] = {}
        for key in found[0][other]:
            values = np.array([r[other][key] for r in found])
            summary[other][key] = (
                float(np.median(values)),
                float(values.min()),
                float(values.max()),
            )
    return summary


if __name__ == "__main__":
    sys.exit(main())

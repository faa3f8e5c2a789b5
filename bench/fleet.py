"""Scale figures: delivered messages/s at saturation with 1 and 2 workers, and
on a three-node RabbitMQ cluster against one node.

    flock /tmp/rabbitgate-bench.lock .venv/bin/python -m bench.fleet \\
        --subscribers 1000 --publishers 4 --seconds 10 --rounds 2

Each round measures, one after the other (interleaved, so that the load other
work puts on a shared machine falls on every case alike):

* ``1 worker``: ``rabbitgate serve`` as one process on the main node (5672);
* ``2 workers``: ``serve --workers 2`` (a supervisor, two workers on one
  SO_REUSEPORT port, Redis for the shared limits) on the main node;
* ``1 worker, cluster``: one process given the three nodes of scripts/cluster
  (5681-5683; started if needed with ``--cluster``), its stream replicated
  to all three.

All subscribers share one channel, the publishers send flat out (``--rate 0``)
with at most ``--window`` unconfirmed each, so delivery is what saturates.
Reported per case: delivered msg/s, the gateway's CPU (supervisor and workers)
and the broker's (every node) in microseconds per delivered message, and
the ratio of 2 workers to 1. The load tool's own processes run on the same
cores: on a 2-core machine they compete with the workers, so the ratio
there says little about a host with cores to spare. Benchmarks, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import SETUP_TIMEOUT_SECONDS, run_target
from bench.pool import Worker
from bench.proc import broker_pids, cpu_seconds, redis_pids, total_cpu_seconds
from bench.sink import sink_main
from bench.target import CHANNEL, bench_limits, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/0"
CLUSTER_PORTS = (5681, 5682, 5683)
CLUSTER_URL = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in CLUSTER_PORTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="total msg/s (0: flat out)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument(
        "--cases",
        default="1,2,cluster",
        help="comma-separated: 1 (one worker), 2 (two workers), cluster (one worker, 3 nodes)",
    )
    parser.add_argument(
        "--cluster", action="store_true", help="start scripts/cluster first if it is not running"
    )
    parser.add_argument(
        "--load-tool",
        default="sink",
        help="comma-separated: sink (bench/sink.py: one process, counts frames; default), "
        "clients (bench.load's tool: parses every frame, 3 processes); both: each case "
        "with each tool, interleaved",
    )
    parser.add_argument(
        "--tick", type=float, default=0.25, help="the sink's read tick in seconds (0.25)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    tools = ["sink", "clients"] if args.load_tool == "both" else args.load_tool.split(",")
    if not tools or any(t not in ("sink", "clients") for t in tools):
        parser.error("--load-tool takes sink, clients or both")
    if args.tls and "sink" in tools:
        parser.error("--tls needs --load-tool clients (the sink speaks plain ws:// only)")
    if not 0 < args.tick <= 1:
        parser.error("--tick must be above 0 and at most 1 second")
    args.tools = tools
    # What bench.load's run_target reads besides these.
    args.workers = 0
    args.gateway_src = None
    args.profile = None
    return args


def _ready(admin_port: int) -> Any:
    def wait(gateway: Any) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{admin_port}/readyz", timeout=2
                ) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the gateway was not ready:\n{gateway.log_tail()}")

    return wait


def case_settings(case: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The gateway settings of a case, and the AMQP ports of its broker nodes."""
    settings: dict[str, Any] = {}
    ports: tuple[int, ...] = (5672,)
    if case == "2":
        settings.update(workers=2, redis_url=REDIS_URL)
    elif case == "cluster":
        settings.update(amqp_url=CLUSTER_URL)
        ports = CLUSTER_PORTS
    return settings, ports


def run_case(case: str, tool: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    if tool == "sink":
        return run_sink_case(case, args, lambda text: log(f"[{case}, sink] {text}"))
    admin_port = free_port()
    settings, ports = case_settings(case)
    settings["admin_port"] = admin_port
    result = run_target(
        "gateway",
        args,
        lambda text: log(f"[{case}, clients] {text}"),
        gateway_settings=settings,
        broker_ports=ports,
        ready=_ready(admin_port),
    )
    result["cpu_split"] = {"gateway": result["cpu_seconds"]["gateway"] / result["seconds"]}
    result["cpu_split"]["load tool"] = result["cpu_seconds"]["clients"] / result["seconds"]
    result["cpu_split"]["broker"] = result["cpu_seconds"]["broker"] / result["seconds"]
    return result


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / ticks, idle / ticks


def run_sink_case(case: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """One case with bench/sink.py as the load tool, the CPU split by role."""
    admin_port = free_port()
    settings, ports = case_settings(case)
    # The sink counts frames without parsing them, so it could not answer a
    # server ping: none are sent during a run (a connection's life is < 1 min).
    settings.update(admin_port=admin_port, limits={**bench_limits(), "heartbeat_seconds": 3600})
    gateway = start_gateway(tls=False, extra=settings)
    sink: Worker | None = None
    try:
        _ready(admin_port)(gateway)
        brokers = [pid for port in ports for pid in broker_pids(port)]
        redis = redis_pids() if case == "2" else []
        idle_before = total_cpu_seconds(brokers)
        time.sleep(args.idle_seconds)
        broker_idle = (total_cpu_seconds(brokers) - idle_before) / args.idle_seconds
        spec = {
            "endpoint": gateway.endpoint(),
            "channel": CHANNEL,
            "name": f"fleet{case}",
            "subscribers": args.subscribers,
            "publishers": args.publishers,
            "size": args.size,
            "window": args.window,
            "tick_seconds": args.tick,
        }
        log(f"connecting {args.subscribers} subscribers and {args.publishers} publishers")
        started = time.monotonic()
        sink = Worker(sink_main, spec)
        ready = sink.receive(SETUP_TIMEOUT_SECONDS)
        if ready[0] != "ready" or not ready[1]["subscribers"] or not ready[1]["publishers"]:
            raise RuntimeError(f"[{case}] the load tool could not connect: {ready[1:]}")
        connect_seconds = time.monotonic() - started
        log(f"{ready[1]['subscribers']} subscribers ready in {connect_seconds:.1f}s; publishing")
        sink.send("publish_on")
        sink.receive(30)
        time.sleep(args.warmup)
        pids = gateway.pids()
        roles: dict[str, list[int]] = {"broker": brokers, "redis": redis, "load tool": [sink.pid]}
        if case == "2":
            roles["supervisor"] = [gateway.pid]
            roles["workers"] = [p for p in pids if p != gateway.pid]
        else:
            roles["workers"] = [gateway.pid]
        measured = [pid for group in roles.values() for pid in group]
        before = {pid: cpu_seconds(pid) for pid in measured}
        machine_before = machine_busy_seconds()
        sink.send("measure_on")
        sink.receive(30)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        sink.send("measure_off")
        stats = sink.receive(60)[1]
        elapsed = time.monotonic() - t0
        after = {pid: cpu_seconds(pid) for pid in measured}
        machine_after = machine_busy_seconds()
        load_average = os.getloadavg()[0]
        sink.send("publish_off")
        sink.receive(30)
    finally:
        if sink is not None:
            sink.close()
        gateway.stop()
    used = {pid: after[pid] - before[pid] for pid in measured}
    split = {role: sum(used[p] for p in group) / elapsed for role, group in roles.items()}
    per_worker = [used[p] / elapsed for p in roles["workers"]]
    busy = (machine_after[0] - machine_before[0]) / elapsed
    idle = (machine_after[1] - machine_before[1]) / elapsed
    split["everything else"] = max(0.0, busy - sum(split.values()))
    delivered = stats["received"]
    gateway_cpu = sum(used[p] for p in roles["workers"] + roles.get("supervisor", []))
    broker_cpu = sum(used[p] for p in brokers)
    latencies = np.frombuffer(stats["latencies_ns"], dtype=np.int64) / 1e6
    per = (lambda cpu: cpu / delivered * 1e6) if delivered else (lambda cpu: float("nan"))
    return {
        "tool": "sink",
        "subscribers": ready[1]["subscribers"],
        "subscriber_failures": ready[1]["failures"],
        "seconds": round(elapsed, 3),
        "delivered": delivered,
        "delivered_per_s": delivered / elapsed,
        "published_per_s": stats["sent"] / elapsed,
        "confirmed_per_s": stats["acked"] / elapsed,
        "errors": stats["errors"],
        "error_samples": stats["error_samples"],
        "closed_connections": stats["closed"],
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "p99": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        },
        "cpu_seconds": {
            "gateway": gateway_cpu,
            "broker": broker_cpu,
            "clients": split["load tool"] * elapsed,
            "broker_idle_per_s": broker_idle,
        },
        "cpu_split": split,
        "cpu_per_worker": per_worker,
        "machine": {"busy_cores": busy, "idle_cores": idle},
        "cpu_us_per_delivery": {
            "gateway": per(gateway_cpu),
            "workers": per(sum(used[p] for p in roles["workers"])),
            "broker": per(broker_cpu),
            "load tool": per(split["load tool"] * elapsed),
        },
        "connect_seconds": connect_seconds,
        "load_average_1m": load_average,
    }


NAMES = {"1": "1 worker", "2": "2 workers", "cluster": "1 worker, cluster"}


def column(case: str, tool: str, tools: list[str]) -> str:
    return NAMES[case] if len(tools) == 1 else f"{NAMES[case]} ({tool})"


def _split(role: str) -> Any:
    return lambda r: f"{r['cpu_split'][role]:.2f}" if role in r.get("cpu_split", {}) else "-"


def render(rounds: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    columns = list(rounds[0])
    width = max(22, *(len(c) + 2 for c in columns))
    lines = [
        f"bench.fleet: {args.subscribers} subscribers, {args.publishers} publishers flat out "
        f"(window {args.window}), {args.size} B, {args.seconds:g} s per case, "
        f"{len(rounds)} round(s), load tool {'+'.join(args.tools)}"
        + (f" (tick {args.tick * 1000:g} ms)" if "sink" in args.tools else ""),
        "",
        f"{'':34}" + "".join(f"{c:>{width}}" for c in columns),
    ]
    rows = [
        ("delivered msg/s", lambda r: f"{r['delivered_per_s']:.0f}"),
        ("published msg/s", lambda r: f"{r['published_per_s']:.0f}"),
        ("gateway CPU us/delivery", lambda r: f"{r['cpu_us_per_delivery']['gateway']:.2f}"),
        ("broker CPU us/delivery", lambda r: f"{r['cpu_us_per_delivery']['broker']:.2f}"),
        (
            "load tool CPU us/delivery",
            lambda r: f"{r['cpu_seconds']['clients'] / r['delivered'] * 1e6:.2f}",
        ),
        (
            "CPU s/s: workers",
            lambda r: (
                (
                    f"{r['cpu_split']['workers']:.2f}"
                    + (
                        " (" + "+".join(f"{x:.2f}" for x in r["cpu_per_worker"]) + ")"
                        if len(r.get("cpu_per_worker", [])) > 1
                        else ""
                    )
                )
                if "workers" in r["cpu_split"]
                else f"{r['cpu_split']['gateway']:.2f}"
            ),
        ),
        ("CPU s/s: supervisor", _split("supervisor")),
        ("CPU s/s: broker", _split("broker")),
        ("CPU s/s: redis", _split("redis")),
        ("CPU s/s: load tool", _split("load tool")),
        ("CPU s/s: everything else", _split("everything else")),
        (
            "machine idle cores",
            lambda r: f"{r['machine']['idle_cores']:.2f}" if "machine" in r else "-",
        ),
        (
            "latency p50 / p99 ms",
            lambda r: f"{r['latency_ms']['p50']:.0f} / {r['latency_ms']['p99']:.0f}",
        ),
        ("errors / closed conns", lambda r: f"{r['errors']} / {r['closed_connections']}"),
        ("machine load (1 min)", lambda r: f"{r['load_average_1m']:.2f}"),
    ]
    for number, results in enumerate(rounds, 1):
        lines.append(f"round {number}")
        for label, cell in rows:
            lines.append(f"  {label:32}" + "".join(f"{cell(results[c]):>{width}}" for c in columns))
    for tool in args.tools:
        for a, b, label in (
            ("2", "1", "2 workers / 1 worker"),
            ("cluster", "1", "cluster / one node"),
        ):
            ca, cb = column(a, tool, args.tools), column(b, tool, args.tools)
            if ca in columns and cb in columns:
                ratio = [r[ca]["delivered_per_s"] / r[cb]["delivered_per_s"] for r in rounds]
                cpu = [
                    r[ca]["cpu_us_per_delivery"]["gateway"]
                    / r[cb]["cpu_us_per_delivery"]["gateway"]
                    for r in rounds
                ]
                lines.append(
                    f"{label} ({tool}): delivered msg/s x{np.median(ratio):.2f} (rounds: "
                    + ", ".join(f"{x:.2f}" for x in ratio)
                    + f"), gateway CPU per delivery x{np.median(cpu):.2f}"
                )
    for number, results in enumerate(rounds, 1):
        for name, r in results.items():
            if r.get("error_samples"):
                lines.append(f"round {number}, {name}: errors like {r['error_samples'][:2]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in NAMES for c in cases):
        print("bench.fleet: error: --cases takes 1, 2 and cluster", file=sys.stderr)
        return 2
    if "cluster" in cases and args.cluster:
        subprocess.run(["bash", str(ROOT / "scripts" / "cluster"), "start"], check=True)
    rounds = []
    try:
        for number in range(args.rounds):
            log(f"round {number + 1} of {args.rounds}")
            rounds.append(
                {
                    column(case, tool, args.tools): run_case(case, tool, args, log)
                    for case in cases
                    for tool in args.tools
                }
            )
    except (RuntimeError, OSError) as exc:
        print(f"bench.fleet: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"args": vars(args), "rounds": rounds}, indent=2, default=str))
    else:
        print(render(rounds, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

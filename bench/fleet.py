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
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import run_target
from bench.target import free_port

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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
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


def run_case(case: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    admin_port = free_port()
    settings: dict[str, Any] = {"admin_port": admin_port}
    ports: tuple[int, ...] = (5672,)
    if case == "2":
        settings.update(workers=2, redis_url=REDIS_URL)
    elif case == "cluster":
        settings.update(amqp_url=CLUSTER_URL)
        ports = CLUSTER_PORTS
    return run_target(
        "gateway",
        args,
        lambda text: log(f"[{case}] {text}"),
        gateway_settings=settings,
        broker_ports=ports,
        ready=_ready(admin_port),
    )


NAMES = {"1": "1 worker", "2": "2 workers", "cluster": "1 worker, cluster"}


def render(rounds: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    cases = list(rounds[0])
    lines = [
        f"bench.fleet: {args.subscribers} subscribers, {args.publishers} publishers flat out, "
        f"{args.size} B, {args.seconds:g} s per case, {len(rounds)} round(s), "
        f"TLS {'on' if args.tls else 'off'}",
        "",
        f"{'':34}" + "".join(f"{NAMES[c]:>20}" for c in cases),
    ]
    rows = [
        ("delivered msg/s", lambda r: f"{r['delivered_per_s']:.0f}"),
        ("published msg/s", lambda r: f"{r['published_per_s']:.0f}"),
        ("gateway CPU us/delivery", lambda r: f"{r['cpu_us_per_delivery']['gateway']:.2f}"),
        ("broker CPU us/delivery", lambda r: f"{r['cpu_us_per_delivery']['broker']:.2f}"),
        ("gateway CPU s/s", lambda r: f"{r['cpu_seconds']['gateway'] / r['seconds']:.2f}"),
        ("load tool CPU s/s", lambda r: f"{r['cpu_seconds']['clients'] / r['seconds']:.2f}"),
        (
            "latency p50 / p99 ms",
            lambda r: f"{r['latency_ms']['p50']:.0f} / {r['latency_ms']['p99']:.0f}",
        ),
        ("machine load (1 min)", lambda r: f"{r['load_average_1m']:.2f}"),
    ]
    for number, results in enumerate(rounds, 1):
        lines.append(f"round {number}")
        for label, cell in rows:
            lines.append(f"  {label:32}" + "".join(f"{cell(results[c]):>20}" for c in cases))
    for a, b, label in (("2", "1", "2 workers / 1 worker"), ("cluster", "1", "cluster / one node")):
        if a in cases and b in cases:
            ratio = [r[a]["delivered_per_s"] / r[b]["delivered_per_s"] for r in rounds]
            cpu = [
                r[a]["cpu_us_per_delivery"]["gateway"] / r[b]["cpu_us_per_delivery"]["gateway"]
                for r in rounds
            ]
            lines.append(
                f"{label}: delivered msg/s x{np.median(ratio):.2f} (rounds: "
                + ", ".join(f"{x:.2f}" for x in ratio)
                + f"), gateway CPU per delivery x{np.median(cpu):.2f}"
            )
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
            rounds.append({case: run_case(case, args, log) for case in cases})
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

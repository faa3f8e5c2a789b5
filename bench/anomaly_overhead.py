"""What anomaly detection costs on the hot path.

    .venv/bin/python -m bench.anomaly_overhead [--rounds 4] [--seconds 8]

1. Micro: nanoseconds per traffic event of ``EventBus.emit`` with and without
   the detector's sink (a list's append), of shipping events to the worker
   process (tuples, pickled in batches: on the loop), on a realistic mix of
   events over 5,000 users; and what the worker process spends (aggregating
   each event, vectors and scores per window for 20,000 subjects).
2. Delivery latency through a real gateway on the real RabbitMQ (plain ws,
   to measure the gateway rather than TLS), detector on vs off, in
   interleaved rounds: a publisher sends timestamped messages at a steady
   rate, a subscriber measures publish-to-delivery latency. Meanwhile
   background traffic events of 2,000 other users are emitted on the bus in
   both modes, and with the detector on, 5-second windows are scored by a
   model trained on that same background traffic (so it is normal to it, as
   production traffic is to its baseline): swaps, vectors and scoring happen
   during the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import random
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.detector import FLUSH_BATCH
from anomaly.features import WindowAggregator, subject_windows
from anomaly.model import MODEL_FILE, AnomalyModel
from anomaly.traffic import baseline_rows
from anomaly.worker import event_tuple
from gateway.telemetry.events import EventBus, TrafficEvent

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
WINDOW = 5.0  # short, so that swaps and scoring happen during each round
USERS = 2000  # background subjects (each with an address of its own)


def event_mix(
    count: int, users: int = 5000, seed: int = 1, rate: float = 10_000.0, start: float | None = None
) -> list[TrafficEvent]:
    """``count`` events of ``users`` users (each from an address of its own), ``rate`` a second."""
    rng = random.Random(seed)
    kinds = ["publish"] * 70 + ["subscribe"] * 10 + ["unsubscribe"] * 5 + ["denied"] * 3
    kinds += ["auth_ok"] * 5 + ["connect"] * 5 + ["rate_limited", "malformed"]
    now = time.time() if start is None else start
    events = []
    for n in range(count):
        u = rng.randrange(users)
        events.append(
            TrafficEvent(
                rng.choice(kinds),  # type: ignore[arg-type]
                f"10.{u // 250}.{u % 250}.1",
                f"user{u}",
                f"s{u}",
                channel=f"chat.room{rng.randrange(50)}",
                size=rng.randint(10, 2000),
                at=now + n / rate,
            )
        )
    return events


def micro() -> dict[str, float]:
    events = event_mix(200_000)
    results: dict[str, float] = {}
    # A yardstick for this machine, now: one dict lookup and one increment per event.
    best = float("inf")
    for _ in range(5):
        table: dict[str | None, list[int]] = {}
        start = time.perf_counter_ns()
        for event in events:
            slot = table.get(event.user)
            if slot is None:
                table[event.user] = [1]
            else:
                slot[0] += 1
        best = min(best, (time.perf_counter_ns() - start) / len(events))
    results["yardstick: dict lookup + increment"] = best
    for label, sink in (("emit, no sinks", False), ("emit, detector sink: list append", True)):
        best = float("inf")
        for _ in range(5):
            bus = EventBus()
            pending: list[TrafficEvent] = []
            if sink:
                bus.subscribe(pending.append)
            start = time.perf_counter_ns()
            for event in events:
                bus.emit(event)
            best = min(best, (time.perf_counter_ns() - start) / len(events))
        results[label] = best
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for chunk in range(0, len(events), FLUSH_BATCH):
            batch = list(map(event_tuple, events[chunk : chunk + FLUSH_BATCH]))
            pickle.dumps(("events", batch), protocol=pickle.HIGHEST_PROTOCOL)
        best = min(best, (time.perf_counter_ns() - start) / len(events))
    results["flush to the worker: tuples, pickle"] = best
    best = float("inf")
    for _ in range(5):
        aggregator = WindowAggregator(10_000)
        add = aggregator.add
        start = time.perf_counter_ns()
        for event in events:
            add(event)
        best = min(best, (time.perf_counter_ns() - start) / len(events))
    results["worker: WindowAggregator.add"] = best
    aggregator = WindowAggregator(10_000)
    for event in event_mix(200_000, users=10_000):
        aggregator.add(event)
    state = aggregator.swap(time.time())
    began = time.perf_counter()
    windows = subject_windows(state, 60.0)
    results[f"worker: vectors for {len(windows)} subjects (ms)"] = (
        time.perf_counter() - began
    ) * 1000
    rows = np.array([w.vector() for w in windows])
    model = AnomalyModel.fit({"k": rows[:5000]}, 0.005)
    began = time.perf_counter()
    model.score("k", rows)
    results[f"worker: scores for {len(rows)} subjects (ms)"] = (time.perf_counter() - began) * 1000
    return results


# --- delivery latency ---------------------------------------------------------


def baseline_model(data_dir: Path, background: float) -> None:
    """A model of the background traffic itself (so it is normal, as in production)."""
    events = event_mix(int(background * WINDOW * 12), users=USERS, seed=3, rate=background, start=0)
    rows = baseline_rows(events, WINDOW, 10)
    AnomalyModel.fit(rows, 0.005).save(data_dir / MODEL_FILE)


async def one_round(detector: bool, seconds: float, rate: float, background: float) -> list[float]:
    from websockets.asyncio.client import connect

    from anomaly.settings import AnomalySettings
    from gateway.app import Gateway
    from gateway.config import JwtSettings, LimitSettings, Settings, TlsSettings
    from gateway.devtools.devtokens import mint_token
    from gateway.policy.rules import load_policy_set

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "policies").mkdir()
        (root / "policies" / "p.yaml").write_text(
            f'version: 1\nrules:\n  - channel: "chat.{{room}}"\n    exchange: {prefix}\n'
            "    subscribe: [anyone]\n    publish: [anyone]\n"
        )
        jwt = JwtSettings(secret=secrets.token_hex(32))
        anomaly = AnomalySettings(enabled=False)
        if detector:
            (root / "anomaly").mkdir()
            baseline_model(root / "anomaly", background)
            anomaly = AnomalySettings(
                enabled=True,
                data_dir=root / "anomaly",
                window_seconds=WINDOW,
                long_window_windows=10,
                retrain_interval_seconds=0,
                exchange=f"{prefix}.alerts",
            )
        settings = Settings(
            host="127.0.0.1",
            port=0,
            tls=TlsSettings(enabled=False),
            amqp_url=AMQP_URL,
            policies_dir=root / "policies",
            policy_watch=False,
            jwt=jwt,
            # The publisher sends faster than a client's default frame limit allows.
            limits=LimitSettings(frames_per_second=10_000, frames_burst=10_000),
            admin_port=0,
            sse_port=None,
            log_level="ERROR",
            log_format="text",
            anomaly=anomaly,
        )
        gateway = Gateway(settings, load_policy_set(root / "policies"))
        await gateway.start()
        latencies: list[float] = []
        stop = asyncio.Event()

        async def noise() -> None:
            """Traffic events of thousands of other subjects, emitted as the gateway would."""
            emit = gateway.node.events.emit
            second = 0
            while not stop.is_set():
                start = time.perf_counter()
                second += 1
                # A fresh second of the same kind of traffic the model was trained on.
                stamped = event_mix(
                    int(background), users=USERS, seed=100 + second, rate=background
                )
                for chunk in range(0, len(stamped), 500):
                    for event in stamped[chunk : chunk + 500]:
                        emit(event)
                    await asyncio.sleep(0)
                await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))

        try:
            url = f"ws://127.0.0.1:{gateway.port}/ws"
            headers = {"Authorization": f"Bearer {mint_token(jwt, sub='pub', ttl_seconds=600)}"}
            sub_headers = {"Authorization": f"Bearer {mint_token(jwt, sub='sub', ttl_seconds=600)}"}
            async with (
                connect(url, additional_headers=headers) as publisher,
                connect(url, additional_headers=sub_headers, max_queue=None) as subscriber,
            ):
                await publisher.recv()
                await subscriber.recv()
                await subscriber.send(
                    json.dumps({"type": "subscribe", "id": 1, "channel": "chat.x"})
                )
                await subscriber.recv()
                noise_task = asyncio.get_running_loop().create_task(noise())

                async def read() -> None:
                    async for raw in subscriber:
                        frame = json.loads(raw)
                        if frame.get("type") == "message":
                            latencies.append(time.perf_counter() - frame["data"]["t"])

                reader = asyncio.get_running_loop().create_task(read())
                await asyncio.sleep(1.5)  # past the first window boundary
                latencies.clear()
                interval = 1.0 / rate
                due = time.perf_counter()
                end = due + seconds
                while due < end:
                    await publisher.send(
                        json.dumps(
                            {
                                "type": "publish",
                                "channel": "chat.x",
                                "data": {"t": time.perf_counter()},
                            }
                        )
                    )
                    due += interval
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await asyncio.sleep(1.0)
                stop.set()
                reader.cancel()
                await noise_task
        finally:
            await gateway.stop()
            import aio_pika

            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(f"rabbitgate.stream.{prefix}")
                await channel.exchange_delete(prefix)
                await channel.exchange_delete(f"{prefix}.alerts")
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def latency(rounds: int, seconds: float, rate: float, background: float) -> dict[str, Any]:
    found: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for n in range(rounds):
        for detector in (n % 2 == 0, n % 2 != 0):  # interleaved: off/on, on/off, ...
            values = await one_round(detector, seconds, rate, background)
            found[detector].append(
                {
                    "p50": percentile(values, 0.5) * 1000,
                    "p99": percentile(values, 0.99) * 1000,
                    "max": max(values) * 1000,
                    "n": len(values),
                }
            )
    return {
        ("on" if mode else "off"): {
            key: statistics.median(r[key] for r in runs) for key in ("p50", "p99", "max", "n")
        }
        for mode, runs in found.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anomaly_overhead")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode (interleaved)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement per round")
    parser.add_argument("--rate", type=float, default=200.0, help="published messages a second")
    parser.add_argument(
        "--background", type=float, default=5000.0, help="other subjects' events a second"
    )
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    print("micro (best of 5):")
    for label, value in micro().items():
        unit = "" if "(" in label else " ns/event"
        print(f"  {label:<42} {value:10.1f}{unit}")
    if not args.skip_latency:
        print(
            f"\ndelivery latency, {args.rate:g} msg/s for {args.seconds:g} s, "
            f"{args.background:g} background events/s, median of {args.rounds} rounds:"
        )
        result = asyncio.run(latency(args.rounds, args.seconds, args.rate, args.background))
        for mode in ("off", "on"):
            r = result[mode]
            print(
                f"  detector {mode:<3}  p50 {r['p50']:6.2f} ms   p99 {r['p99']:6.2f} ms   "
                f"max {r['max']:7.2f} ms   ({r['n']:.0f} messages)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""RabbitMQ's own CPU per message, for the gateway's topology and variations of it.

    .venv/bin/python -m bench.brokercost --rate 100 --seconds 15 --rounds 2

No gateway and no WebSocket clients: this process publishes at a fixed rate
with a confirm asked for every message (through the gateway's own
``ConfirmedPublisher`` and pre-encoded properties, gateway/broker/) and
consumes what RabbitMQ delivers, and reads the CPU of the ``beam.smp``
listening on 5672 from /proc over the window, less what the broker spent at
rest just before (measured with the variant's topology declared and idle).
Divided by the messages published, that is the broker's cost per message
that ``bench.load`` charges to rabbitgate.

Variants (``--variants``, measured in the given order in each round):

* ``gateway``: ``gateway.broker.broker.Broker`` itself: durable topic
  exchange, its history stream bound with ``#``, confirms, the stream
  consumed live (prefetch 2000, acks every 500, ``multiple``).
* ``replica``: the same topology written here on aiormq (checks that the
  variations below start from the same cost).
* ``write-only``: publish + confirm into the stream, nobody consuming.
* ``no-confirm``: the topology without publisher confirms (not allowed in
  the gateway: a reference for what confirms cost).
* ``default-exchange``: published straight into the stream through the
  default exchange, as the gateway's markers are (not allowed for client
  messages: backends bound to the exchange would not see them); what the
  topic exchange's routing costs.
* ``bare-props``: the gateway's topology, messages published with no
  properties at all (not allowed: the contract's headers name the
  publisher): what the stream's conversion of the headers costs.
* ``prefetch-N``: the stream consumer with credit N (acks every N/4).
* ``batch-N``: the publishes of N ticks written together every N ticks
  (same rate): what the broker's cost is when a chunk holds N messages.
* ``classic-*``: the stream still written and confirmed (it is the history
  and the source of ``seq``), plus a classic queue bound to the exchange
  that is consumed instead of the stream (two writes per message):
  ``classic-transient`` (exclusive, auto-delete, no_ack),
  ``classic-transient-ack`` (same, acks), ``classic-durable`` (durable,
  acks), ``classic-maxlen`` (transient, no_ack, x-max-length 10000),
  ``classic-lazy`` (transient, no_ack, x-queue-mode lazy).

* ``no-history``: no stream at all: the topic exchange routes each message
  into one exclusive, auto-delete classic queue, consumed no_ack, with
  confirms. What a channel without retained history would cost (Socket.IO's
  model, and Centrifugo's for channels without history).

A classic-queue delivery has no stream offset, so no ``seq``; those variants
are measured to answer whether a separate queue would be cheaper, not as
something the gateway could switch to unchanged (the contract's every
message carries a ``seq`` and every acked publish is in the history).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from bench.proc import broker_pids, cpu_seconds, total_cpu_seconds
from bench.target import AMQP_URL
from gateway.broker import amqpwire
from gateway.broker.broker import STREAM_PREFETCH, Broker, Delivery, stream_name
from gateway.broker.envelope import ClientStamp
from gateway.broker.publisher import ConfirmedPublisher

SIMPLE = ("gateway", "replica", "write-only", "no-confirm", "default-exchange", "bare-props")
NO_HISTORY = "no-history"
NO_PROPERTIES = b"\x00\x00"  # property flags: none set
CLASSIC = {
    # name: (durable, no_ack, arguments)
    NO_HISTORY: (False, True, {}),
    "classic-transient": (False, True, {}),
    "classic-transient-ack": (False, False, {}),
    "classic-durable": (True, False, {}),
    "classic-maxlen": (False, True, {"x-max-length": 10000}),
    "classic-lazy": (False, True, {"x-queue-mode": "lazy"}),
}
DEFAULT_VARIANTS = (
    "gateway,replica,write-only,prefetch-100,batch-10,classic-transient,classic-durable"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.brokercost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rate", type=float, default=100.0, help="messages published per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="broker at rest, before")
    parser.add_argument("--size", type=int, default=100, help="message body bytes")
    parser.add_argument("--rounds", type=int, default=1, help="times every variant is measured")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated, see above")
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in args.variants:
        if not _known(variant):
            parser.error(f"unknown variant {variant!r}")
    if args.rate <= 0 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--rate, --seconds and --rounds must be positive")
    return args


def _known(variant: str) -> bool:
    if variant in SIMPLE or variant in CLASSIC:
        return True
    for prefix in ("prefetch-", "batch-"):
        if variant.startswith(prefix) and variant[len(prefix) :].isdigit():
            return int(variant[len(prefix) :]) > 0
    return False


@dataclass
class Counter:
    received: int = 0


class Topology:
    """One variant's declarations, publisher and consumer on its own exchange."""

    def __init__(self, variant: str, url: str) -> None:
        self.variant = variant
        self.url = url
        self.exchange = f"bench.brokercost.{uuid.uuid4().hex[:8]}"
        self.counter = Counter()
        self.batch = int(variant[6:]) if variant.startswith("batch-") else 1
        self._broker: Broker | None = None
        self._connection: aiormq.Connection | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._plain: aiormq.Channel | None = None  # no-confirm publishing
        self._consume: aiormq.Channel | None = None
        self._unacked = 0
        self._ack_every = STREAM_PREFETCH // 4
        self._name = amqpwire.short_string(self.exchange)

    async def start(self) -> None:
        if self.variant == "gateway":
            self._broker = Broker(
                self.url,
                self._on_gateway_delivery,
                stream_max_bytes=256 * 1024 * 1024,
                stream_max_age="7D",
                confirm_timeout=5.0,
                connect_timeout=10.0,
            )
            await self._broker.start([self.exchange])
            await self._broker.follow(self.exchange)
            return
        self._connection = await aiormq.connect(self.url)
        setup = await self._connection.channel()
        await setup.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        stream = stream_name(self.exchange)
        if self.variant != NO_HISTORY:
            await setup.queue_declare(
                stream,
                durable=True,
                arguments={
                    "x-queue-type": "stream",
                    "x-max-length-bytes": 256 * 1024 * 1024,
                    "x-max-age": "7D",
                },
            )
            await setup.queue_bind(stream, self.exchange, routing_key="#")
        if self.variant == "no-confirm":
            self._plain = await self._connection.channel(publisher_confirms=False)
        else:
            channel = await self._connection.channel(publisher_confirms=True)
            self._publisher = ConfirmedPublisher(channel, 5.0)
        if self.variant == "write-only":
            return
        self._consume = await self._connection.channel()
        if self.variant in CLASSIC:
            durable, no_ack, arguments = CLASSIC[self.variant]
            declared = await self._consume.queue_declare(
                "",
                durable=durable,
                exclusive=not durable,
                auto_delete=True,
                arguments=arguments,
            )
            queue = declared.queue
            assert queue is not None
            await self._consume.queue_bind(queue, self.exchange, routing_key="#")
            if not no_ack:
                await self._consume.basic_qos(prefetch_count=STREAM_PREFETCH)
            await self._consume.basic_consume(queue, self._on_message, no_ack=no_ack)
            return
        prefetch = (
            int(self.variant[9:]) if self.variant.startswith("prefetch-") else STREAM_PREFETCH
        )
        self._ack_every = max(1, prefetch // 4)
        await self._consume.basic_qos(prefetch_count=prefetch)
        await self._consume.basic_consume(
            stream, self._on_message, arguments={"x-stream-offset": "next"}
        )

    def _on_gateway_delivery(self, delivery: Delivery) -> None:
        self.counter.received += 1

    async def _on_message(self, message: DeliveredMessage) -> None:
        self.counter.received += 1
        if self.variant in CLASSIC and CLASSIC[self.variant][1]:
            return  # no_ack
        self._unacked += 1
        if self._unacked >= self._ack_every:
            self._unacked = 0
            assert self._consume is not None and message.delivery_tag is not None
            await self._consume.basic_ack(message.delivery_tag, multiple=True)

    def publish(self, routing_key: str, props: bytes, body: bytes) -> asyncio.Future[Any] | None:
        if self._broker is not None:
            return self._broker.send(self.exchange, routing_key, body, props)
        if self._publisher is not None:
            if self.variant == "default-exchange":
                stream = amqpwire.short_string(stream_name(self.exchange))
                return self._publisher.publish(b"\x00", stream, props, body)
            key = amqpwire.short_string(routing_key)
            return self._publisher.publish(self._name, key, props, body)
        assert self._plain is not None
        asyncio.ensure_future(
            self._plain.basic_publish(body, exchange=self.exchange, routing_key=routing_key)
        )
        return None

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.close()
        if self._connection is not None:
            await self._connection.close()
        # Delete what the variant declared, on a connection of its own.
        connection = await aiormq.connect(self.url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(stream_name(self.exchange))
            await channel.exchange_delete(self.exchange)
        finally:
            await connection.close()


async def measure(variant: str, args: argparse.Namespace, brokers: list[int]) -> dict[str, Any]:
    topology = Topology(variant, args.amqp_url)
    await topology.start()
    try:
        stamp = ClientStamp("bench-user", uuid.uuid4().hex, "guest")
        body = b"x" * args.size
        key = "bench.x"
        await asyncio.sleep(1.0)  # declarations settle
        idle_before = total_cpu_seconds(brokers)
        await asyncio.sleep(args.idle_seconds)
        idle_per_s = (total_cpu_seconds(brokers) - idle_before) / args.idle_seconds
        loop = asyncio.get_running_loop()
        interval = topology.batch / args.rate
        ticks = int(args.seconds * args.rate / topology.batch)
        futures: list[asyncio.Future[Any]] = []
        me = os.getpid()
        start_received = topology.counter.received
        cpu0, own0, t0 = total_cpu_seconds(brokers), cpu_seconds(me), time.monotonic()
        begin = loop.time()
        for tick in range(ticks):
            delay = begin + tick * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(topology.batch):
                props = NO_PROPERTIES if variant == "bare-props" else stamp.properties()
                future = topology.publish(key, props, body)
                if future is not None:
                    futures.append(future)
        published = ticks * topology.batch
        if futures:
            await asyncio.wait_for(asyncio.gather(*futures), 30)
        expected = 0 if variant == "write-only" else published
        deadline = time.monotonic() + 10
        while topology.counter.received - start_received < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        broker_cpu = total_cpu_seconds(brokers) - cpu0
        own_cpu = cpu_seconds(me) - own0
        received = topology.counter.received - start_received
    finally:
        await topology.close()
    above_idle = max(0.0, broker_cpu - idle_per_s * elapsed)
    return {
        "variant": variant,
        "published": published,
        "received": received,
        "elapsed_s": elapsed,
        "broker_idle_cpu_per_s": idle_per_s,
        "broker_us_per_message": 1e6 * broker_cpu / published,
        "broker_us_per_message_above_idle": 1e6 * above_idle / published,
        "client_us_per_message": 1e6 * own_cpu / published,
    }


async def run(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    brokers = broker_pids()
    results = []
    for round_number in range(args.rounds):
        for variant in args.variants:
            log(f"round {round_number + 1}: {variant}")
            result = await measure(variant, args, brokers)
            result["round"] = round_number + 1
            results.append(result)
    return results


def render(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    lines = [
        f"broker CPU per message: {args.rate:g} msg/s, {args.size} B, "
        f"{args.seconds:g} s windows, {args.rounds} round(s); load {_load()}",
        f"{'variant':24} {'µs/msg above idle':>22} {'µs/msg total':>14} {'idle s/s':>9} "
        f"{'client µs/msg':>14} {'received':>9}",
    ]
    for variant in args.variants:
        rows = [r for r in results if r["variant"] == variant]
        above = [r["broker_us_per_message_above_idle"] for r in rows]
        total = [r["broker_us_per_message"] for r in rows]
        lines.append(
            f"{variant:24} {_spread(above):>22} {statistics.median(total):>14.0f} "
            f"{statistics.median(r['broker_idle_cpu_per_s'] for r in rows):>9.3f} "
            f"{statistics.median(r['client_us_per_message'] for r in rows):>14.0f} "
            f"{min(r['received'] for r in rows):>5}/{rows[0]['published']}"
        )
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        import uvloop

        results = uvloop.run(run(args, log))
    except ImportError:  # pragma: no cover
        results = asyncio.run(run(args, log))
    if args.json:
        print(json.dumps({"load": os.getloadavg(), "results": results}, indent=2))
    else:
        print(render(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

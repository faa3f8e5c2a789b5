"""One detector for the fleet: traffic from every gateway, responses to every gateway.

With ``anomaly.fleet: true`` a gateway runs no detector of its own. Its
``TrafficShipper`` publishes the traffic events in batches to the topic
exchange ``rabbitgate.traffic`` (routing key ``traffic.<gateway id>``) and
applies what the detector decides, read from the fanout exchange
``rabbitgate.responses`` (each gateway binds a queue of its own). The
detector is a process of its own, ``rabbitgate detector --config FILE``
(``run_detector``): it consumes ``rabbitgate.traffic`` from one queue, feeds
the events to the same ``Detector`` a single gateway uses (worker process,
model, incidents, store, alerts exchange) and publishes every ban or throttle
at once, and the whole set of restrictions in force once a window (so a
gateway that missed one, or started later, catches up; lifted ones go).

Why a process of its own rather than a worker elected among the gateways:
the model, the open incidents and the alert store are state that must
survive any one gateway, and an election would move that state (and the
worker's CPU) between gateways whenever one restarts, with a window during
which two think they lead. A separate process keeps it in one place with one
life cycle (a compose service, or the child ``rabbitgate serve --workers N``
starts), and a gateway never pays for the scoring.

Bounds: a gateway never waits for the detector and never queues without
bound. Events go out every 25 ms without publisher confirms; while the broker
connection is down they are dropped, and beyond ``MAX_PENDING_EVENTS`` waiting
the oldest are, all counted (``events_dropped``, exported as
``rabbitgate_anomaly_traffic_events_dropped_total`` in the gateway's
/metrics; the detector's own counters are on its admin listener,
``anomaly/detector_admin.py``). The detector's queue holds at most
``QUEUE_MAX_BATCHES`` batches (RabbitMQ drops the oldest beyond), so a
detector that is down costs the broker a bounded amount. The wire format is
JSON (never pickle: nothing read from the network is unpickled); a batch or a
response that does not parse is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import astuple
from types import SimpleNamespace
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from anomaly.worker import EVENT_FIELDS
from gateway.limits.restrictions import Restrictions, Rule
from gateway.protocol.codes import CLOSE_BANNED
from gateway.telemetry.events import EventBus, TrafficEvent

log = logging.getLogger("rabbitgate.anomaly")

FLUSH_SECONDS = 0.025
MAX_BATCH = 1000
MAX_PENDING_EVENTS = 100_000  # waiting on a gateway; beyond: dropped and counted
QUEUE_MAX_BATCHES = 10_000  # the detector's queue; RabbitMQ drops the oldest beyond
DETECTOR_QUEUE = "rabbitgate.detector.traffic"
_KINDS = {
    "connect",
    "auth_ok",
    "auth_failed",
    "subscribe",
    "unsubscribe",
    "publish",
    "denied",
    "rate_limited",
    "malformed",
    "closed",
    "banned",
}
MAX_TEXT = 1024  # a field longer than this in a batch: the batch is refused


# --- the wire format (pure) ---------------------------------------------------


def encode_events(events: Iterable[TrafficEvent]) -> bytes:
    return json.dumps([list(astuple(e)) for e in events], separators=(",", ":")).encode()


def decode_events(body: bytes) -> list[TrafficEvent]:
    """The events of a batch; raises ValueError for anything else."""
    raw = json.loads(body)
    if not isinstance(raw, list):
        raise ValueError("a traffic batch is a JSON list")
    found = []
    for item in raw:
        if not isinstance(item, list) or len(item) != len(EVENT_FIELDS):
            raise ValueError("a traffic event is a list of its fields")
        kind, address, user, session, channel, size, detail, rule, at = item
        if kind not in _KINDS:
            raise ValueError(f"unknown traffic event kind {str(kind)[:40]!r}")
        for text in (address, user, session, channel, detail, rule):
            if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
                raise ValueError("a text field of a traffic event is not a short string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("size must be a non-negative integer")
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            raise ValueError("at must be a finite number")
        found.append(TrafficEvent(kind, address, user, session, channel, size, detail, rule, at))
    return found


def encode_rules(kind: str, rules: Iterable[Rule]) -> bytes:
    """``kind`` "restrict" (new ones: add, and close a banned subject's
    connections) or "restrictions" (the whole set in force: replace)."""
    body = {"type": kind, "rules": [[r.kind, r.key, r.mode, r.until] for r in rules]}
    return json.dumps(body).encode()


def decode_rules(body: bytes) -> tuple[str, list[Rule]]:
    raw = json.loads(body)
    if not isinstance(raw, dict) or raw.get("type") not in ("restrict", "restrictions"):
        raise ValueError("not a detector response")
    rules = []
    for item in raw.get("rules", []):
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError("a rule is [kind, key, mode, until]")
        kind, key, mode, until = item
        if kind not in ("user", "address") or mode not in ("ban", "throttle"):
            raise ValueError("a rule's kind or mode is unknown")
        if not isinstance(key, str) or not isinstance(until, int | float):
            raise ValueError("a rule's key or until is of the wrong type")
        rules.append(Rule(kind, key, mode, float(until)))
    return str(raw["type"]), rules


# --- the gateway's side -------------------------------------------------------


class TrafficShipper:
    """Attach with ``TrafficShipper(gateway)``; ``start``/``stop`` with it."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.node = gateway.node
        self.settings = gateway.settings.anomaly
        self.gateway_id = uuid.uuid4().hex[:12]
        self.events_sent = 0
        self.events_dropped = 0
        self.responses_applied = 0
        self.responses_refused = 0
        # Bounded where events come in: a flush that cannot keep up (or a broker
        # that takes its time) costs at most this many events of memory.
        self._pending: deque[TrafficEvent] = deque(maxlen=MAX_PENDING_EVENTS)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._traffic: AbstractExchange | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.node.restrictions.throttle_per_second = self.settings.throttle_per_second
        self.node.events.subscribe(self._keep)
        metrics = getattr(gateway, "metrics", None)
        if metrics is not None:
            metrics.registry.register(ShipperCollector(self))

    async def start(self) -> None:
        s = self.settings
        self._connection = await aio_pika.connect_robust(self.gateway.settings.amqp_url)
        # No publisher confirms (see the module's docstring): a broker that is
        # slow to confirm must not hold up the flush.
        channel = await self._connection.channel(publisher_confirms=False)
        self._traffic = await channel.declare_exchange(
            s.traffic_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        responses = await channel.declare_exchange(
            s.responses_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            f"rabbitgate.responses.{self.gateway_id}", exclusive=True, auto_delete=True
        )
        await queue.bind(responses)
        await queue.consume(self._response, no_ack=True)
        self._tasks = [asyncio.get_running_loop().create_task(self._flushing())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._flush()
        if self._connection is not None:
            await self._connection.close()

    async def _flushing(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            with contextlib.suppress(Exception):  # counted in _flush; never ends the loop
                await self._flush()

    def _keep(self, event: TrafficEvent) -> None:
        if len(self._pending) == MAX_PENDING_EVENTS:
            self.events_dropped += 1  # the deque lets the oldest go
        self._pending.append(event)

    async def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        exchange = self._traffic
        for start in range(0, len(batch), MAX_BATCH):
            chunk = batch[start : start + MAX_BATCH]
            if exchange is None or self._connection is None or self._connection.is_closed:
                self.events_dropped += len(chunk)
                continue
            try:
                await exchange.publish(
                    aio_pika.Message(encode_events(chunk), content_type="application/json"),
                    routing_key=f"traffic.{self.gateway_id}",
                )
            except asyncio.CancelledError:
                # aio-pika cancels a publish in flight when its connection closes
                # (tests/integration/test_anomaly_fleet.py saw it): that costs
                # this chunk, never the flush loop. Only a cancel of this task
                # (``stop``) goes on up, with what it leaves counted.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    self.events_dropped += len(batch) - start
                    raise
                self.events_dropped += len(chunk)
            except Exception:
                self.events_dropped += len(chunk)
            else:
                self.events_sent += len(chunk)

    async def _response(self, message: AbstractIncomingMessage) -> None:
        try:
            kind, rules = decode_rules(message.body)
        except (ValueError, TypeError):
            self.responses_refused += 1
            return
        self.responses_applied += 1
        if kind == "restrictions":
            self.node.restrictions.replace(rules)
            return
        for rule in rules:
            self.node.restrictions.add(rule)
            if rule.mode == "ban":
                close_subject(self.node, rule.kind, rule.key)


class ShipperCollector(Collector):
    """The shipper's counters in the gateway's /metrics, read at scrape time."""

    def __init__(self, shipper: TrafficShipper) -> None:
        self.shipper = shipper

    def collect(self) -> Iterator[Any]:
        s = self.shipper
        for name, text, value in (
            (
                "rabbitgate_anomaly_traffic_events_sent",
                "Traffic events published to the fleet detector (anomaly.traffic_exchange).",
                s.events_sent,
            ),
            (
                "rabbitgate_anomaly_traffic_events_dropped",
                "Traffic events dropped instead of published to the fleet detector: broker"
                " connection down, publish failed, or over 100000 waiting.",
                s.events_dropped,
            ),
            (
                "rabbitgate_anomaly_responses_applied",
                "Detector responses (bans, throttles, restriction sets) applied here.",
                s.responses_applied,
            ),
            (
                "rabbitgate_anomaly_responses_refused",
                "Detector responses dropped because they did not parse.",
                s.responses_refused,
            ),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family


def close_subject(node: Any, kind: str, key: str) -> int:
    """Close every live connection of a banned subject with 4403; returns how many."""
    closed = 0
    for session in list(node.sessions):
        who = session.principal.sub if kind == "user" else session.address
        if who == key:
            session.close(CLOSE_BANNED, "banned")
            closed += 1
    return closed


# --- the detector process -----------------------------------------------------


class FleetDetector:
    """The detector of ``rabbitgate detector``: traffic in, alerts and responses out."""

    def __init__(self, settings: Any) -> None:
        from anomaly.detector import Detector

        self.settings = settings
        node = SimpleNamespace(events=EventBus(), restrictions=Restrictions(), sessions=set())
        self.node = node
        self.events_received = 0
        self.batches_refused = 0
        self.responses_published = 0
        self.responses_failed = 0
        self._in_force: list[Rule] = []  # the latest full set sent to the gateways
        self.detector = Detector(SimpleNamespace(node=node, settings=settings))
        self.detector.on_restrict = self._restricted
        self.detector.on_restrictions = self._restrictions
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._responses: AbstractExchange | None = None
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        s = self.settings.anomaly
        await self.detector.start()
        self._connection = await aio_pika.connect_robust(self.settings.amqp_url)
        channel = await self._connection.channel()
        self._channel = channel
        await channel.set_qos(prefetch_count=50)
        traffic = await channel.declare_exchange(
            s.traffic_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._responses = await channel.declare_exchange(
            s.responses_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            s.detector_queue,
            durable=True,
            arguments={"x-max-length": QUEUE_MAX_BATCHES, "x-overflow": "drop-head"},
        )
        await queue.bind(traffic, "traffic.#")
        await queue.consume(self._traffic)
        await self.detector.sync_restrictions()  # the set in force, to every gateway

    async def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        await self.detector.stop()

    async def _traffic(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            try:
                events = decode_events(message.body)
            except (ValueError, TypeError):
                self.batches_refused += 1
                return
            emit = self.node.events.emit
            for event in events:
                emit(event)
            self.events_received += len(events)

    async def _restricted(self, rule: Rule) -> None:
        await self._publish(encode_rules("restrict", [rule]))

    async def _restrictions(self, rules: list[Rule]) -> None:
        self._in_force = list(rules)
        await self._publish(encode_rules("restrictions", rules))

    async def ban_now(self, kind: str, key: str) -> None:
        """A reviewer's ban (already in the set in force): sent again as a
        ``restrict``, which also closes the subject's live connections."""
        rules = [r for r in self._in_force if (r.kind, r.key, r.mode) == (kind, key, "ban")]
        if rules:
            await self._publish(encode_rules("restrict", rules))

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    async def _publish(self, body: bytes) -> None:
        if self._responses is None:
            self.responses_failed += 1
            return
        try:
            await self._responses.publish(
                aio_pika.Message(body, content_type="application/json"), routing_key=""
            )
        except Exception as exc:  # the next window's full set catches up
            self.responses_failed += 1
            log.warning("detector response not published (%s)", type(exc).__name__)
        else:
            self.responses_published += 1


async def run_detector(settings: Any) -> int:
    """``rabbitgate detector``: run until SIGTERM or SIGINT.

    Raises OSError when RabbitMQ does not answer or the admin port is taken."""
    from anomaly.detector_admin import DetectorAdmin

    detector = FleetDetector(settings)
    admin = DetectorAdmin(detector)
    await detector.start()
    try:
        await admin.start()
    except OSError:
        await detector.stop()
        raise
    s = settings.anomaly
    log.info(
        "anomaly detector consuming %s (queue %s); admin on http://%s:%d/ (review page %s)",
        s.traffic_exchange,
        s.detector_queue,
        s.detector_admin_host,
        admin.port,
        "/alerts/" if admin.review is not None else "off: no anomaly.reviewers_file",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await admin.stop()
        await detector.stop()
    return 0

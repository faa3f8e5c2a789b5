"""RabbitMQ through aio-pika: declarations, confirmed publishes, history streams.

Every exchange named by the policies gets a durable topic exchange and a
stream queue ``rabbitgate.stream.<exchange>`` bound to it with ``#``. The
stream is the channel's retained history and the source of ``seq`` (its
offset), so every gateway process numbers a message the same way and history
survives restarts. A process follows (consumes) the stream of each exchange
that has local subscribers, from "next", and fans the messages out itself.

State that must survive a broker outage is recorded (declared exchanges, last
offset delivered per followed stream) and replayed by ``_connect`` after a
reconnect, so subscribers get what was published while the broker was away
exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from yarl import URL

from gateway.amqp_urls import connect_order, default_cluster_size, stream_filtering
from gateway.amqp_urls import redacted as redacted
from gateway.broker import amqpwire
from gateway.broker.envelope import sender_of, timestamp_ms_of
from gateway.broker.history import HistoryReader, HistoryScan, ReadFailed
from gateway.broker.publisher import ConfirmedPublisher, Expired
from gateway.config import split_urls

log = logging.getLogger("rabbitgate.broker")

STREAM_PREFIX = "rabbitgate.stream."
# A marker is a message the gateway writes straight into a stream (through the
# default exchange, so no backend bound to the exchange ever sees it) to learn
# where the stream ends right now. Every consumer skips markers.
MARKER_HEADER = "x-rabbitgate-marker"
# Credit a stream consumer holds; acks go out in batches of a quarter of it
# (multiple=True), so the credit never runs dry and acks stay cheap.
STREAM_PREFETCH = 2000
ACK_EVERY = STREAM_PREFETCH // 4
RECONNECT_BASE_SECONDS = 0.25
RECONNECT_CAP_SECONDS = 5.0
# One cluster node that does not answer (a partition, a hung host) may hold a
# reconnect this long before the next node is tried; a node that is down
# refuses at once.
NODE_CONNECT_TIMEOUT_SECONDS = 3.0
DEFAULT_EXCHANGE = amqpwire.short_string("")


class BrokerUnavailable(Exception):
    """RabbitMQ did not take or confirm the request (outage, timeout, nack)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    exchange: str
    channel: str
    seq: int
    body: bytes
    sender: str | None
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Replay:
    """What a channel's history holds after a given seq, up to the stream's end."""

    recovered: bool
    deliveries: list[Delivery]
    tail: int  # offset of the marker that ended the read
    scanned: int = 0  # stream messages the read went through (what it cost)


def stream_name(exchange: str) -> str:
    return STREAM_PREFIX + exchange


class Broker:
    def __init__(
        self,
        url: str,
        on_delivery: Callable[[Delivery], None],
        *,
        stream_max_bytes: int,
        stream_max_age: str,
        confirm_timeout: float,
        connect_timeout: float,
        on_state_change: Callable[[bool], None] | None = None,
        initial_cluster_size: int | None = None,
    ) -> None:
        # `url` is one node or the comma-separated nodes of a cluster.
        self._urls = split_urls(url) or (url,)
        self._url = self._urls[0]  # the node of the current (or last) connection
        self._on_delivery = on_delivery
        self._on_state_change = on_state_change
        self._stream_arguments: dict[str, Any] = {
            "x-queue-type": "stream",
            "x-max-length-bytes": stream_max_bytes,
            "x-max-age": stream_max_age,
        }
        replicas = default_cluster_size(self._urls, initial_cluster_size)
        if replicas > 1:
            # Leader and replicas on different nodes: a confirm means a majority
            # of them wrote the message, so it outlives the loss of one node.
            self._stream_arguments["x-initial-cluster-size"] = replicas
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self.user: str = URL(self._url).user or "guest"
        # The node's RabbitMQ version, from its connection.start (docs/fleet.md:
        # stream filtering, the way past "every gateway reads every message",
        # needs 3.13).
        self.server_version: str | None = None
        # Recorded state, replayed after every reconnect.
        self._declared: set[str] = set()
        self._following: dict[str, int | None] = {}
        # Live objects of the current connection.
        self._connection: AbstractConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._consume_channel: AbstractChannel | None = None
        # Exchanges declared on the current connection, as AMQP short strings.
        self._exchanges: dict[str, bytes] = {}
        # exchange -> (the consume channel's aiormq channel, consumer tag)
        self._consumers: dict[str, tuple[aiormq.Channel, str]] = {}
        self._unacked: dict[str, int] = {}
        self._marker_waiters: dict[str, asyncio.Future[int]] = {}
        self._ready = False
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        # Replays read on a connection of their own (gateway/history.py).
        self.history = HistoryReader(self._urls, connect_timeout)

    @property
    def connected(self) -> bool:
        """True from a completed (re)connect until the connection is lost."""
        return self._ready

    async def start(self, exchanges: Iterable[str]) -> None:
        """Connect (retrying until ``connect_timeout``) and declare ``exchanges``.

        Raises BrokerUnavailable with a one-line reason when RabbitMQ cannot be
        reached in time or refuses a declaration.
        """
        self._declared.update(exchanges)
        deadline = time.monotonic() + self._connect_timeout
        attempt = 0
        while True:
            try:
                await self._connect()
                break
            except BrokerUnavailable:
                raise
            except (aiormq.ProbableAuthenticationError, aiormq.AuthenticationError) as exc:
                # RabbitMQ answered and refused the login (ACCESS_REFUSED, 403):
                # the same credentials fail the same way until the operator
                # changes them, so waiting out the connect timeout helps nobody.
                raise BrokerUnavailable(
                    f"RabbitMQ at {redacted(self._url)} refused the login: {_describe(exc)}"
                ) from None
            except Exception as exc:
                if time.monotonic() >= deadline:
                    where = ", ".join(redacted(url) for url in self._urls)
                    raise BrokerUnavailable(
                        f"cannot reach RabbitMQ at {where}: {_describe(exc)}"
                    ) from None
                attempt += 1
                await asyncio.sleep(min(1.0, 0.1 * attempt))
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self.history.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def declare(self, exchanges: Iterable[str]) -> None:
        """Declare exchanges (and their history streams) that are new to us."""
        new = set(exchanges) - self._declared
        self._declared.update(new)
        if new and self.connected:
            async with self._lock:
                await self._declare_all(new)

    def send(
        self, exchange: str, channel: str, body: bytes, props: bytes
    ) -> asyncio.Future[object]:
        """Start a publish; the future ends with RabbitMQ's confirm.

        ``props`` are encoded AMQP properties (``ClientStamp.properties``).
        Publishes are written in call order, and within the confirm timeout
        the future ends either way: pass it to ``publish_error`` for the
        outcome. Raises BrokerUnavailable at once while disconnected.
        """
        name = self._exchanges.get(exchange) if self._ready else None
        publisher = self._publisher
        if name is None or publisher is None:
            raise BrokerUnavailable("broker unavailable")
        return publisher.publish(name, amqpwire.short_string(channel), props, body)

    async def publish(self, exchange: str, channel: str, body: bytes, props: bytes) -> None:
        """``send`` and wait for the confirm. Raises BrokerUnavailable otherwise."""
        future = self.send(exchange, channel, body, props)
        with contextlib.suppress(Exception):
            await future
        error = publish_error(future)
        if error is not None:
            raise error

    async def follow(self, exchange: str) -> None:
        """Deliver this exchange's messages from now on (idempotent).

        Returns once RabbitMQ has attached the consumer: a message confirmed
        after this returns is delivered.
        """
        if exchange in self._following:
            return
        self._following[exchange] = None
        # Under the lock: a reconnect in progress either starts this consumer
        # itself or has finished and left it to us.
        async with self._lock:
            if not self.connected:
                del self._following[exchange]
                raise BrokerUnavailable("broker unavailable")
            try:
                await self._start_consumer(exchange)
            except (aio_pika.exceptions.AMQPError, aiormq.AMQPError, ConnectionError) as exc:
                # A cluster without a quorum for the stream (its leader being
                # elected, a majority down): the client is told `unavailable`.
                self._following.pop(exchange, None)
                log.warning("could not follow stream %s: %s", stream_name(exchange), _describe(exc))
                raise BrokerUnavailable("broker unavailable") from None
        # Once the consumer has seen this marker its position is known: a
        # subscribe ack can report it, and a reconnect resumes from there
        # instead of from "next" (which would lose what was published during
        # an outage).
        try:
            await self._mark(exchange, self._confirm_timeout)
        except BrokerUnavailable:
            log.warning("could not mark the position of stream %s", stream_name(exchange))

    def position(self, exchange: str) -> int | None:
        """Offset of the last message of a followed exchange's stream seen here.

        Every message after it will be delivered live, so it is a valid
        ``since`` for a subscriber that has received nothing yet.
        """
        return self._following.get(exchange)

    async def unfollow(self, exchange: str) -> None:
        self._following.pop(exchange, None)
        consumer = self._consumers.pop(exchange, None)
        if consumer is not None and self.connected:
            channel, tag = consumer
            with contextlib.suppress(Exception):
                await channel.basic_cancel(tag)

    async def replay(
        self,
        exchange: str,
        channel: str,
        since: int,
        *,
        history: int,
        scan_limit: int,
        timeout: float,
    ) -> Replay:
        """Read ``channel``'s messages after ``since`` from the exchange's stream.

        The exchange must be followed already. First a marker is written and
        its offset learnt from the live consumer: that is where the read ends
        (the caller buffers live messages from before the marker on, so the
        two overlap and together miss nothing). ``recovered`` is True only when
        the message at ``since`` is still in the stream and belongs to
        ``channel`` (so nothing after it can have been dropped) and at most
        ``history`` messages of the channel followed it. A ``since`` at or
        beyond the marker means the history was reset: not recovered. The
        read stops as soon as the answer is known, and after ``scan_limit``
        stream messages or ``timeout`` (then: not recovered); it runs on the
        history reader's own connection (gateway/history.py).
        Raises BrokerUnavailable on outage, or when the read could not start.
        """
        tail = await self._mark(exchange, timeout)
        if since >= tail:
            return Replay(False, [], tail)
        return await self._read_stream(exchange, channel, since, tail, history, scan_limit, timeout)

    async def _read_stream(
        self,
        exchange: str,
        channel: str,
        since: int,
        tail: int,
        history: int,
        scan_limit: int,
        timeout: float,
    ) -> Replay:
        # On the history reader's own connection (gateway/history.py): a read
        # never touches the connection that publishes and fans out.
        found: list[Delivery] = []
        scan = HistoryScan(channel, since, tail, history, scan_limit)

        def keep(offset: int, message: DeliveredMessage) -> None:
            properties = message.header.properties
            headers = properties.headers
            found.append(
                Delivery(
                    exchange=exchange,
                    channel=message.routing_key or "",
                    seq=offset,
                    body=message.body,
                    sender=sender_of(headers, properties.user_id, properties.app_id, self.user),
                    ts_ms=timestamp_ms_of(headers, properties.timestamp, int(time.time() * 1000)),
                )
            )

        try:
            result = await self.history.read(stream_name(exchange), scan, keep, timeout)
        except ReadFailed:
            raise BrokerUnavailable("could not read the channel's history") from None
        return Replay(result.recovered, found if result.recovered else [], tail, result.received)

    async def _mark(self, exchange: str, timeout: float) -> int:
        """Write a marker into a followed stream; its offset once the live consumer sees it."""
        marker_id = uuid.uuid4().hex
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._marker_waiters[marker_id] = seen
        try:
            await self._publish_marker(exchange, marker_id)
            return await asyncio.wait_for(seen, timeout)
        except TimeoutError:
            raise BrokerUnavailable("could not find the end of the stream") from None
        finally:
            self._marker_waiters.pop(marker_id, None)

    async def _publish_marker(self, exchange: str, marker_id: str | None = None) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("broker unavailable")
        props = amqpwire.headers_only(
            amqpwire.string_header(MARKER_HEADER, marker_id or uuid.uuid4().hex)
        )
        # Through the default exchange, straight into the stream.
        future = publisher.publish(
            DEFAULT_EXCHANGE, amqpwire.short_string(stream_name(exchange)), props, b""
        )
        with contextlib.suppress(Exception):
            await future
        if publish_error(future) is not None:
            raise BrokerUnavailable("broker did not confirm a stream marker")

    # --- connection life cycle ---------------------------------------------

    @property
    def node(self) -> str:
        """The node of the current (or last) connection, without its password."""
        return redacted(self._url)

    async def _open(self) -> AbstractConnection:
        """A connection to one node that answers, tried in ``connect_order``.

        Raises the last node's error when none answers.
        """
        if len(self._urls) == 1:
            return await aio_pika.connect(self._url, timeout=self._connect_timeout)
        timeout = min(self._connect_timeout, NODE_CONNECT_TIMEOUT_SECONDS)
        failure: BaseException | None = None
        for url in connect_order(self._urls, self._url):
            try:
                connection = await aio_pika.connect(url, timeout=timeout)
            except Exception as exc:
                log.warning("RabbitMQ node %s did not answer: %s", redacted(url), _describe(exc))
                failure = exc
                continue
            self._url = url
            return connection
        assert failure is not None
        raise failure

    async def _connect(self) -> None:
        async with self._lock:
            connection = await self._open()
            try:
                self._publish_channel = await connection.channel(publisher_confirms=True)
                # Only the publisher writes on this channel (it numbers the
                # delivery tags itself).
                underlay = await self._publish_channel.get_underlay_channel()
                if self._publisher is not None:
                    self._publisher.close()
                self._publisher = ConfirmedPublisher(
                    cast(aiormq.Channel, underlay), self._confirm_timeout
                )
                self._consume_channel = await connection.channel(publisher_confirms=False)
                await self._consume_channel.set_qos(prefetch_count=STREAM_PREFETCH)
                self._connection = connection
                self._exchanges.clear()
                self._consumers.clear()
                await self._declare_all(self._declared)
                for exchange in list(self._following):
                    await self._start_consumer(exchange)
            except BaseException:
                self._connection = None
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
            self._lost.clear()
            self._ready = True
            connection.close_callbacks.add(self._on_connection_closed)
            self.server_version = _server_version(connection)
        log.info(
            "connected to RabbitMQ %s at %s (stream filtering: %s)",
            self.server_version or "(version unknown)",
            redacted(self._url),
            "available" if stream_filtering(self.server_version) else "not before RabbitMQ 3.13",
        )
        if self._on_state_change:
            self._on_state_change(True)

    def _on_connection_closed(self, *_: Any) -> None:
        self._ready = False
        if not self._closing:
            self._lost.set()

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("lost the RabbitMQ connection; reconnecting")
            if self._on_state_change:
                self._on_state_change(False)
            attempt = 0
            while True:
                # Full jitter, so that many gateways do not reconnect in step.
                delay = random.uniform(
                    0, min(RECONNECT_CAP_SECONDS, RECONNECT_BASE_SECONDS * 2**attempt)
                )
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                    break
                except Exception as exc:
                    attempt += 1
                    log.warning("RabbitMQ reconnect failed: %s", _describe(exc))

    async def _declare_all(self, exchanges: Iterable[str]) -> None:
        assert self._publish_channel is not None
        for name in sorted(exchanges):
            # A separate channel: a refused declaration closes the channel it was made on.
            declaring = await self._connection_or_fail().channel(publisher_confirms=False)
            try:
                await declaring.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
                try:
                    stream = await declaring.declare_queue(
                        stream_name(name), durable=True, arguments=self._stream_arguments
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    if "x-initial-cluster-size" not in str(exc):
                        raise
                    # Declared earlier with another replica count (before the
                    # cluster, or with another setting): RabbitMQ cannot change
                    # it, so the stream is used as it is.
                    log.warning(
                        "stream %s keeps the replica count it was declared with "
                        "(x-initial-cluster-size cannot change)",
                        stream_name(name),
                    )
                    with contextlib.suppress(Exception):
                        await declaring.close()
                    declaring = await self._connection_or_fail().channel(publisher_confirms=False)
                    stream = await declaring.declare_queue(stream_name(name), passive=True)
                await stream.bind(name, routing_key="#")
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise BrokerUnavailable(
                    f"RabbitMQ refused exchange {name!r} or its stream: {_describe(exc)}"
                ) from None
            finally:
                with contextlib.suppress(Exception):
                    await declaring.close()
            self._exchanges[name] = amqpwire.short_string(name)

    async def _start_consumer(self, exchange: str) -> None:
        assert self._consume_channel is not None
        if exchange in self._consumers:
            return
        last = self._following.get(exchange)
        offset: int | str = "next" if last is None else last + 1
        # Consumed on aiormq's channel, under aio-pika's: aio-pika would build
        # an IncomingMessage and start one more task per message, for nothing
        # read here that aiormq's DeliveredMessage does not hold. py-spy at
        # 100 subscribers x 100 msg/s (2026-12-02): aio-pika's consumer path
        # was 3.3 % of the gateway's samples, aiormq's grew by 1.1 % without
        # it; no CPU difference beyond the noise of a shared machine
        # (docs/performance.md, issue 18, second session).
        channel = cast(aiormq.Channel, await self._consume_channel.get_underlay_channel())

        async def on_message(message: DeliveredMessage) -> None:
            await self._on_stream_message(exchange, channel, message)

        ok = await channel.basic_consume(
            stream_name(exchange), on_message, arguments={"x-stream-offset": offset}
        )
        assert ok.consumer_tag is not None
        self._consumers[exchange] = (channel, ok.consumer_tag)

    async def _on_stream_message(
        self, exchange: str, channel: aiormq.Channel, message: DeliveredMessage
    ) -> None:
        properties = message.header.properties
        headers = properties.headers or {}
        offset = headers.get("x-stream-offset")
        last = self._following.get(exchange, -1)
        # A stream consumer starts at a chunk boundary: skip what we already delivered.
        fresh = isinstance(offset, int) and (last is None or offset > last)
        if fresh and exchange in self._following:
            assert isinstance(offset, int)
            self._following[exchange] = offset
            if MARKER_HEADER in headers:
                self._marker_seen(headers, offset)
            else:
                delivery = Delivery(
                    exchange=exchange,
                    channel=message.routing_key or "",
                    seq=offset,
                    body=message.body,
                    sender=sender_of(headers, properties.user_id, properties.app_id, self.user),
                    ts_ms=timestamp_ms_of(headers, properties.timestamp, int(time.time() * 1000)),
                )
                try:
                    self._on_delivery(delivery)
                except Exception:
                    log.exception("delivery handler failed for %s seq %s", delivery.channel, offset)
        unacked = self._unacked.get(exchange, 0) + 1
        if unacked >= ACK_EVERY:
            unacked = 0
            tag = message.delivery_tag
            if tag is not None:
                with contextlib.suppress(Exception):
                    await channel.basic_ack(tag, multiple=True)
        self._unacked[exchange] = unacked

    def _marker_seen(self, headers: dict[str, Any], offset: int) -> None:
        waiter = self._marker_waiters.get(str(headers.get(MARKER_HEADER)))
        if waiter is not None and not waiter.done():
            waiter.set_result(offset)

    def _connection_or_fail(self) -> AbstractConnection:
        if self._connection is None:
            raise BrokerUnavailable("broker unavailable")
        return self._connection


def publish_error(future: asyncio.Future[object]) -> BrokerUnavailable | None:
    """What to tell the client about a finished ``Broker.send``: None when confirmed."""
    if not future.done():
        raise ValueError("the publish has not ended yet")
    error = Expired() if future.cancelled() else future.exception()
    if error is None:
        return None
    if isinstance(error, Expired | aiormq.exceptions.DeliveryError):
        return BrokerUnavailable("broker did not confirm the message")
    return BrokerUnavailable("broker connection lost")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _server_version(connection: AbstractConnection) -> str | None:
    try:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = properties.get("version")
    except AttributeError:
        return None
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    return str(version) if version else None

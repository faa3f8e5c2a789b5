"""History reads (replays) of a stream, on an AMQP connection of their own.

A replay (``subscribe`` with ``since``, SSE's ``Last-Event-ID``) reads an
exchange's stream from ``since`` to a marker, every channel's messages
included, so one request from any subscriber can make the gateway read a lot.
That read must never share the connection that publishes and fans out for
everyone: a read that goes wrong (RabbitMQ closes a whole connection for
an ack on a channel it already closed, ``504 CHANNEL_ERROR``) then costs that
read only. So reads run on their own connection, one channel per read, and
each read ends as soon as its answer is known, or at its message and time
bounds, whichever comes first.

``HistoryScan`` is the decision over the offsets seen (pure, unit-tested and
fuzzed); ``HistoryReader`` does the I/O. Messages are taken from aiormq
directly, not wrapped in aio-pika's ``IncomingMessage``: a read may go
through tens of thousands of other channels' messages, and that wrapper was
most of the cost per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq
import aiormq.exceptions
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

from gateway.amqp_urls import connect_order

log = logging.getLogger("rabbitgate.history")

# Credit of a reader; acks go out in batches of a quarter of it (multiple=True).
READ_PREFETCH = 2000
READ_ACK_EVERY = READ_PREFETCH // 4
# How long the end of a read (basic.cancel, channel.close) may take.
READ_CLOSE_TIMEOUT_SECONDS = 2.0


class ReadFailed(Exception):
    """The history could not be read (no connection, a refused consume)."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    recovered: bool
    kept: list[int]  # offsets of the channel's messages after `since`, in order
    reason: str  # why the read ended: tail, gap, history, scan_limit, timeout
    received: int = 0  # stream messages the read went through (its cost)


@dataclass(slots=True)
class HistoryScan:
    """What one read decides, message by message. No I/O.

    ``since`` < ``tail``. The read is recovered when the message at ``since``
    is still in the stream (retention only drops a stream's oldest messages,
    so then nothing after it was dropped), the tail was reached, and at most
    ``history`` messages of the channel came between. It ends as soon as the
    answer is known: at the tail, at a gap (the first offset seen is past
    ``since``), at the ``history + 1``-th message of the channel, or past
    ``scan_limit`` messages of the stream.
    """

    channel: str
    since: int
    tail: int
    history: int
    scan_limit: int
    scanned: int = 0
    kept: list[int] = field(default_factory=list)
    first: int | None = None
    reason: str | None = None  # None while the read goes on

    @property
    def done(self) -> bool:
        return self.reason is not None

    def see(self, offset: object, routing_key: str | None, marker: bool) -> bool:
        """One message of the stream; True: it is one to replay (keep it)."""
        if self.reason is not None or not isinstance(offset, int) or isinstance(offset, bool):
            return False
        # A consumer starts at a chunk boundary: skip what lies before `since`.
        if offset < self.since:
            return False
        if offset >= self.tail:
            self.reason = "tail" if self.first is not None else "gap"
            return False
        if self.first is None:
            self.first = offset
            if offset != self.since:
                self.reason = "gap"  # retention dropped `since`: as good as lost
                return False
        self.scanned += 1
        if self.scanned > self.scan_limit:
            self.reason = "scan_limit"  # too far behind: as good as lost
            return False
        if offset > self.since and routing_key == self.channel and not marker:
            if len(self.kept) >= self.history:
                self.reason = "history"  # more than the channel's history missed
                return False
            self.kept.append(offset)
            return True
        return False

    def result(self, timed_out: bool = False, received: int = 0) -> ScanResult:
        reason = self.reason or ("timeout" if timed_out else "tail")
        recovered = reason == "tail"
        return ScanResult(recovered, self.kept if recovered else [], reason, received)


class HistoryReader:
    """Stream reads on a connection of their own, opened at the first read
    and again after it was lost. ``close`` when the gateway stops."""

    def __init__(self, urls: Sequence[str], connect_timeout: float) -> None:
        # One node or a cluster's nodes: a read connects to one that answers.
        self._urls = tuple(urls)
        self._url: str | None = None  # the node of the current (or last) connection
        self._connect_timeout = connect_timeout
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.scanned_total = 0  # stream messages every read went through, ever
        self.reads = 0

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def read(
        self,
        queue: str,
        scan: HistoryScan,
        keep: Callable[[int, DeliveredMessage], None],
        timeout: float,
    ) -> ScanResult:
        """Run ``scan`` over ``queue`` from its ``since``; ``keep`` gets each kept message.

        Ends within ``timeout`` (plus the close of its channel) with the
        scan's result (a timeout: not recovered). Raises ReadFailed when the
        read could not start or RabbitMQ ended it before any message came.
        """
        self.reads += 1
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        received = 0
        finished = False
        channel: AbstractChannel | None = None

        async def on_message(message: DeliveredMessage) -> None:
            nonlocal received
            # aiormq runs each delivery as a task of its own: ones queued
            # before the read ended still run. Nothing is acked after the
            # end (an ack on a closed channel is a connection error).
            if finished or scan.done:
                return
            received += 1
            properties = message.header.properties
            headers = properties.headers or {}
            if scan.see(headers.get("x-stream-offset"), message.routing_key, _is_marker(headers)):
                keep(scan.kept[-1], message)
            if scan.done:
                if not done.done():
                    done.set_result(None)
                return
            if received % READ_ACK_EVERY == 0 and channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.basic_ack(message.delivery_tag or 0, multiple=True)

        timed_out = False
        tag: str | None = None
        try:
            async with asyncio.timeout(timeout):
                channel = await self._channel()
                await channel.basic_qos(prefetch_count=READ_PREFETCH)
                consumed = await channel.basic_consume(
                    queue, on_message, arguments={"x-stream-offset": scan.since}
                )
                tag = consumed.consumer_tag
                closing = channel.closing
                await asyncio.wait([done, closing], return_when=asyncio.FIRST_COMPLETED)
                if not done.done() and not scan.done:
                    raise ReadFailed("the history read's channel was closed")
        except TimeoutError:
            timed_out = True
        except (aiormq.AMQPError, ConnectionError, OSError, RuntimeError):
            raise ReadFailed("could not read the history") from None
        finally:
            finished = True
            self.scanned_total += received
            if channel is not None:
                await _end(channel, tag)
        if timed_out and channel is None:
            raise ReadFailed("could not open a history reader in time")
        if timed_out and received == 0:
            raise ReadFailed("the history read got no message in time")
        return scan.result(timed_out, received)

    async def _channel(self) -> AbstractChannel:
        async with self._lock:
            if self._closed:
                raise ReadFailed("the gateway is stopping")
            connection = self._connection
            if connection is None or connection.is_closed:
                connection = await self._connect()
                self._connection = connection
        return await connection.channel(publisher_confirms=False)

    async def _connect(self) -> AbstractConnection:
        failure: BaseException | None = None
        for url in connect_order(self._urls, self._url):
            try:
                async with asyncio.timeout(self._connect_timeout):
                    connection = await aiormq.connect(
                        url, client_properties={"connection_name": "rabbitgate history reads"}
                    )
            except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
                failure = exc
                continue
            self._url = url
            return connection
        assert failure is not None
        raise failure


async def _end(channel: AbstractChannel, tag: str | None) -> None:
    """basic.cancel, then close: no delivery (and so no ack) is left in flight."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(READ_CLOSE_TIMEOUT_SECONDS):
            if tag is not None and not channel.is_closed:
                await channel.basic_cancel(tag)
            await channel.close()


def _is_marker(headers: dict[str, Any]) -> bool:
    # gateway/broker.py's MARKER_HEADER (not imported: broker imports this module)
    return "x-rabbitgate-marker" in headers

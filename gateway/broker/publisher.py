"""Confirmed publishes on one AMQP channel: batched writes, one deadline sweep.

``ConfirmedPublisher`` owns an aiormq channel in confirm mode (aiormq is
aio-pika's transport; nothing else may publish on the channel). A publish is
pre-encoded bytes (gateway/broker/amqpwire.py) appended to a batch; once per event
loop iteration the batch gets its delivery tags and goes to the connection's
writer as one write. Each publish returns a future that aiormq resolves with
the broker's confirm (or fails on a nack or when the channel closes).

Timeouts: instead of a timer per publish, one timer follows the oldest
unconfirmed publish. When its deadline passes the publisher does not fail it
straight away: the event loop may simply not have read the confirm yet (a
busy loop, fanning out, reads its socket late). It sends a probe (basic.qos,
which RabbitMQ answers on the same channel, so behind every confirm it sent
before) and fails only the publishes that were written before the probe,
expired before it was sent and are still unconfirmed once the answer has
been read: RabbitMQ had not confirmed them after the full timeout. If the
probe itself is not answered within the timeout, the broker is answering
nothing and every expired publish fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

from gateway.broker import amqpwire

log = logging.getLogger("rabbitgate.publisher")


class Expired(Exception):
    """RabbitMQ did not confirm the publish within the confirm timeout.

    (The publish's future is cancelled; ``Broker.publish_error`` names it.)
    """


class _Pending:
    __slots__ = ("deadline", "future", "payload", "tag")

    def __init__(self, deadline: float, future: asyncio.Future[object], payload: bytes) -> None:
        self.deadline = deadline
        self.future = future
        self.payload = payload  # the publish's frames until they are written
        self.tag = 0  # delivery tag, once written


class ConfirmedPublisher:
    def __init__(self, channel: aiormq.Channel, confirm_timeout: float) -> None:
        if not channel.publisher_confirms:
            raise ValueError("the channel must be in confirm mode")
        self._channel = channel
        self._timeout = confirm_timeout
        self._loop = asyncio.get_running_loop()
        # Largest body frame payload the connection takes (aiormq's own rule).
        self._max_body = channel.max_content_size
        self._number = channel.number
        self._batch: list[_Pending] = []
        self._flush_scheduled = False
        self._putting: asyncio.Task[None] | None = None  # a batch waiting for room in the queue
        self._written = 0  # highest delivery tag handed to the writer
        # Every publish not confirmed yet, oldest first (so in tag order).
        self._unconfirmed: deque[_Pending] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task[None] | None = None
        self._closed: BaseException | None = None
        channel.closing.add_done_callback(self._on_channel_closed)

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def publish(
        self, exchange: bytes, routing_key: bytes, props: bytes, body: bytes
    ) -> asyncio.Future[object]:
        """Queue one publish; the future ends with RabbitMQ's confirm.

        ``exchange`` and ``routing_key`` are AMQP shortstrs, ``props`` encoded
        properties (gateway/broker/amqpwire.py). Publishes are written in call order.
        The future is cancelled when RabbitMQ did not confirm in time, fails
        with aiormq's ``DeliveryError`` on a nack, or with a ConnectionError
        when the channel closes. A publish that
        failed before it was written is not written at all.
        """
        future: asyncio.Future[object] = self._loop.create_future()
        if self._closed is not None:
            future.set_exception(ConnectionError("the broker channel is closed"))
            return future
        payload = amqpwire.publish(self._number, exchange, routing_key, props, body, self._max_body)
        pending = _Pending(self._loop.time() + self._timeout, future, payload)
        self._batch.append(pending)
        self._unconfirmed.append(pending)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._timer is None and self._probe is None:
            self._timer = self._loop.call_at(pending.deadline, self._sweep)
        return future

    def close(self) -> None:
        """Fail everything unconfirmed (the connection is being replaced)."""
        self._fail_all(ConnectionError("broker connection lost"))

    # --- writing ---------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._putting is not None or not self._batch or self._closed is not None:
            return  # the waiting put flushes again when it is done
        batch, self._batch = self._batch, []
        channel = self._channel
        confirmations = channel.confirmations
        payloads = []
        tag = channel.delivery_tag
        for pending in batch:
            if pending.future.done():
                continue  # failed (expired) before it was written: never sent
            tag += 1
            pending.tag = tag
            confirmations[tag] = pending.future  # type: ignore[assignment]
            payloads.append(pending.payload)
            pending.payload = b""
        if not payloads:
            return
        channel.delivery_tag = tag
        frame = ChannelFrame(payload=b"".join(payloads), should_close=False)
        try:
            channel.write_queue.put_nowait(frame)
        except asyncio.QueueFull:
            self._putting = self._loop.create_task(self._put(frame, tag))
        else:
            self._written = tag

    async def _put(self, frame: ChannelFrame, tag: int) -> None:
        try:
            await self._channel.write_queue.put(frame)
            self._written = tag
        finally:
            self._putting = None
        if self._batch:
            self._flush()

    # --- deadlines ---------------------------------------------------------------

    def _sweep(self) -> None:
        self._timer = None
        unconfirmed = self._unconfirmed
        while unconfirmed and unconfirmed[0].future.done():
            unconfirmed.popleft()
        if not unconfirmed or self._probe is not None or self._closed is not None:
            return
        oldest = unconfirmed[0]
        if oldest.deadline > self._loop.time():
            self._timer = self._loop.call_at(oldest.deadline, self._sweep)
            return
        self._probe = self._loop.create_task(self._check_expired())

    async def _check_expired(self) -> None:
        """Fail what expired, once the broker has had its chance to confirm it."""
        asked = self._loop.time()
        written = self._written
        # Never cancelled: aiormq closes a channel whose RPC is cancelled.
        probe = asyncio.ensure_future(self._channel.basic_qos(prefetch_count=0))
        probe.add_done_callback(_retrieve)
        try:
            await asyncio.wait({probe}, timeout=self._timeout)
            if probe.done() and probe.exception() is not None:
                return  # the channel closed: _on_channel_closed fails everything
            now = self._loop.time()
            for pending in list(self._unconfirmed):
                if pending.deadline > now:
                    break
                if pending.future.done():
                    continue
                # Answered: it was written before the probe and expired before
                # it was sent. Unanswered: the broker answers nothing at all.
                if not probe.done() or (0 < pending.tag <= written and pending.deadline <= asked):
                    # Cancelled, not failed: aiormq then drops a late confirm quietly.
                    pending.future.cancel()
        finally:
            self._probe = None
            self._sweep()

    # --- failure -----------------------------------------------------------------

    def _on_channel_closed(self, closing: asyncio.Future[object]) -> None:
        reason = None if closing.cancelled() else closing.exception()
        self._fail_all(ConnectionError(f"broker channel closed: {reason or 'closed'}"))

    def _fail_all(self, error: BaseException) -> None:
        if self._closed is None:
            self._closed = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._putting is not None:
            self._putting.cancel()  # the connection's writer is gone: room never comes
        self._batch.clear()
        while self._unconfirmed:
            future = self._unconfirmed.popleft().future
            if not future.done():
                future.set_exception(error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        future.exception()

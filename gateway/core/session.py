"""One authenticated connection that takes commands: subscriptions, publishes, token life.

Transport-neutral: a transport that carries commands (the WebSocket JSON
protocol, STOMP) makes one per connection with its ``Transport``
(``core/transport.py``) and hands it each command, either as JSON text
(``handle``: the frame loop of the JSON protocol) or already parsed into the
values of ``protocol/frames.py`` (``handle_command``: what a transport with
its own wire format, such as STOMP, builds). Answers go out through the
transport's send path, in the order of the messages fanned out to it, as
JSON-protocol frames that a transport with another wire re-encodes.
The decisions themselves (policies, bans, connection caps) are the ``Gate``'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.auth.tokens import AuthError
from gateway.broker.broker import BrokerUnavailable, publish_error
from gateway.broker.envelope import ClientStamp
from gateway.core.deadlines import CLOCK_SLACK_SECONDS, Deadline, loop_time_of
from gateway.core.gate import Denied
from gateway.limits.limiter import LimitRefused, Refusal, rate_limited_frame
from gateway.policy.rules import Principal, Rule
from gateway.presence.store import PresenceUnavailable
from gateway.protocol.codes import CLOSE_AUTH, CLOSE_IDLE, CLOSE_RATE_LIMITED
from gateway.protocol.frames import (
    Auth,
    ClientFrame,
    FrameError,
    Ping,
    Presence,
    Publish,
    RequestId,
    Subscribe,
    Unsubscribe,
    ack_frame,
    error_frame,
    parse_frame,
    pong_frame,
    presence_frame,
)
from gateway.telemetry.events import EventKind, TrafficEvent

if TYPE_CHECKING:
    from gateway.core.gate import Gate
    from gateway.core.node import Node
    from gateway.core.transport import Transport, TransportKind

log = logging.getLogger("rabbitgate.session")

# Publishes of one connection waiting for their broker confirm at once; past
# this, the connection's frames are not read until confirms come back.
MAX_INFLIGHT_PUBLISHES = 64


class Session:
    # Thousands of these live at once, most of them idle: no __dict__.
    __slots__ = (
        "id",
        "node",
        "gate",
        "outbox",
        "principal",
        "address",
        "subscriptions",
        "guard",
        "_joining",
        "_inflight",
        "_stamp",
        "_confirming",
        "_answers",
        "_tasks",
        "_publishing",
        "_expires_at",
        "_wakeup",
        "_closing",
        "__weakref__",
    )

    def __init__(
        self,
        gate: Gate,
        transport: Transport,
        principal: Principal,
        address: str | None,
    ) -> None:
        self.id = uuid.uuid4().hex
        node = gate.node
        self.node: Node = node
        self.gate = gate
        # The connection's send path, which the fan-out writes to as well
        # (named ``outbox`` for the node; one slot for both uses).
        self.outbox: Transport = transport
        self.principal = principal
        self.address = address
        self.subscriptions: dict[str, str] = {}  # channel -> exchange
        self._joining = 0  # subscribes waiting for the broker
        # Publishes waiting for a confirm; made at the first publish (most
        # connections only listen).
        self._inflight: asyncio.Semaphore | None = None
        # Who publishes, encoded once: the verified sub never changes (a
        # refreshed token must carry the same one).
        self._stamp = ClientStamp(principal.sub, self.id, node.broker.user)
        # Publishes awaiting a confirm, and tasks the session started: both made
        # at first use (an empty set is 216 bytes; most connections only listen).
        self._confirming: set[asyncio.Future[object]] | None = None
        self._answers: list[bytes] = []  # publish answers of this loop iteration
        self._tasks: set[asyncio.Task[None]] | None = None
        self._publishing = False  # a publish frame is between read and its confirm task
        # This connection's rate limits and idle timeout (gateway/limits/limiter.py).
        self.guard = node.limiter.connection_guard()
        self._closing: asyncio.Task[None] | None = None
        # The token's expiry, on the loop's clock; the wake-up comes then or at
        # the idle timeout, whichever is first.
        self._expires_at = loop_time_of(principal.exp)
        self._wakeup: Deadline | None = None
        self._schedule_wakeup()

    @property
    def kind(self) -> TransportKind:
        return self.outbox.kind

    # --- life cycle ---------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the connection (the transport's handler then calls ``ended``)."""
        task = self.outbox.close(code, reason)
        if task is not None:
            self._keep(task)

    async def ended(self) -> None:
        """Release everything the session holds; after this it receives nothing."""
        if self._wakeup is not None:
            self._wakeup.cancel()
        for channel in list(self.subscriptions):
            self.node.remove_subscriber(self, channel)
        self.subscriptions.clear()
        # Let in-flight publishes reach their confirm: they were sent already.
        await self.drain()

    async def drain(self) -> None:
        """Wait (bounded by the confirm timeout) until every publish read so far is answered.

        That includes one still being checked (limits) or waiting for an
        in-flight slot: it was read, so the client is owed an answer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.node.settings.publish_confirm_timeout_seconds
        while (self._tasks or self._confirming or self._publishing) and loop.time() < deadline:
            waiting: set[asyncio.Future[Any]] = set(self._confirming or ())
            waiting.update(self._tasks or ())
            if waiting:
                await asyncio.wait(waiting, timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.005)
        self._send_answers()  # now, before the caller closes the connection

    def _schedule_wakeup(self) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        when = self._expires_at
        idle_left = self.guard.idle_left()
        if idle_left is not None:
            when = min(when, asyncio.get_running_loop().time() + idle_left)
        if when != math.inf:
            self._wakeup = self.node.deadlines.call_at(when, self._wake)

    def _wake(self) -> None:
        """The token expired (close 4401), the client went idle (1000), or neither yet."""
        self._wakeup = None
        if asyncio.get_running_loop().time() + CLOCK_SLACK_SECONDS >= self._expires_at:
            self.close(CLOSE_AUTH, "token expired")
            return
        idle_left = self.guard.idle_left()
        # (With the same slack: rescheduled within it, this wake-up would come
        # straight back, in the same run of due deadlines, until the clock moved.)
        if idle_left is not None and idle_left <= CLOCK_SLACK_SECONDS:
            self.close(CLOSE_IDLE, "idle timeout")
            return
        self._schedule_wakeup()  # a frame came since: the idle timeout moved

    def _keep(self, task: asyncio.Task[None]) -> None:
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send(self, frame: bytes) -> None:
        self.outbox.send(frame)

    def emit(self, kind: EventKind, **fields: object) -> None:
        self.node.events.emit(
            TrafficEvent(kind, self.address, self.principal.sub, self.id, **fields)  # type: ignore[arg-type]
        )

    def recheck_subscriptions(self) -> int:
        """End subscriptions the current policies (or token) no longer allow.

        Called after a policy reload and a token refresh; the change is
        synchronous, so no message of an ended subscription is delivered after.
        """
        ended = self.gate.revoke(self)
        for channel in ended:
            message = f"subscription to {channel} ended: no longer allowed"
            self.send(error_frame("forbidden", message, channel=channel))
        return len(ended)

    # --- limits -------------------------------------------------------------

    def _refuse(self, refusal: Refusal, request_id: RequestId | None) -> None:
        """Answer ``rate_limited``; after too many of them, close with 4429 instead."""
        self.emit("rate_limited", detail=refusal.limit)
        if self.guard.strike():
            self.emit("banned", detail=str(CLOSE_RATE_LIMITED))
            self.outbox.stop_reading()  # a flood is not even parsed any more
            self._closing = asyncio.get_running_loop().create_task(self._close_rate_limited())
            return
        self.send(rate_limited_frame(refusal, request_id))

    async def _close_rate_limited(self) -> None:
        await self.node.limiter.record_strikeout(self.address)
        # Publishes already sent to RabbitMQ still get their ack first.
        await self.drain()
        await self.outbox.close_flooded(CLOSE_RATE_LIMITED, "rate limits broken too often")

    # --- commands -----------------------------------------------------------

    async def handle(self, text: str) -> None:
        """Answer one client frame; never raises for anything the client sent."""
        if not self.guard.closing:
            await self._handle(text)
        if self.guard.closing and self._closing is not None:
            # Closing with 4429: nothing more is processed, and nothing more is
            # read. Waiting here holds the server's read loop, so websockets
            # reads no more of the socket (see _refuse) and a flood backs up
            # into the client's own buffers instead of costing CPU here.
            await asyncio.shield(self._closing)

    async def handle_command(self, command: ClientFrame | FrameError, size: int) -> None:
        """Answer one command a transport parsed from its own wire (or the
        FrameError its parser raised), ``size`` bytes long; like ``handle``."""
        if not self.guard.closing:
            await self._handle_command(command, size)
        if self.guard.closing and self._closing is not None:
            await asyncio.shield(self._closing)

    async def _handle_command(self, command: ClientFrame | FrameError, size: int) -> None:
        refusal = self.guard.frame()
        if refusal is not None:
            request_id = command.request_id if isinstance(command, FrameError) else command.id
            self._refuse(refusal, request_id)
            return
        if isinstance(command, FrameError):
            # Answered, not raised: raising would hang this frame (and the
            # session) on the error's traceback for as long as the error
            # lives (a test parameter holding one kept a session for the run).
            self._answer_error(command, size)
            return
        try:
            await self._dispatch(command)
        except FrameError as exc:
            self._answer_error(exc, size)

    async def _handle(self, text: str) -> None:
        refusal = self.guard.frame()
        if refusal is not None:
            self._refuse(refusal, _request_id(text))
            return
        try:
            frame = parse_frame(text, self.node.settings.limits.max_data_depth)
            await self._dispatch(frame)
        except FrameError as exc:
            self._answer_error(exc, len(text))

    def _answer_error(self, exc: FrameError, size: int) -> None:
        if exc.code in ("bad_request", "too_large"):
            self.emit("malformed", size=size, detail=exc.code)
        self.send(error_frame(exc.code, exc.message, exc.request_id))

    async def _dispatch(self, frame: ClientFrame) -> None:
        match frame:
            case Publish():
                await self._publish(frame)
            case Subscribe():
                await self._subscribe(frame)
            case Unsubscribe():
                self._unsubscribe(frame)
            case Ping():
                self.send(pong_frame(frame.id))
            case Auth():
                await self._refresh(frame)
            case Presence():
                await self._presence(frame)

    async def _presence(self, frame: Presence) -> None:
        # Policy first, then the rate limit: a refused channel costs no Redis call
        # and is answered the same whether or not it has a rule or subscribers.
        rule = self.gate.may_see_presence(self.principal, frame.channel, self.address, self.id)
        if isinstance(rule, Denied):
            raise FrameError("forbidden", rule.message, frame.id)
        refusal = await self.node.limiter.take_presence(self.principal.sub)
        if refusal is not None:
            self._refuse(refusal, frame.id)
            return
        # The Redis read runs beside the frame loop: a slow Redis delays only
        # this answer (bounded by the Redis timeout), never a publish of this
        # connection nor any delivery.
        self._keep(asyncio.get_running_loop().create_task(self._answer_presence(frame, rule)))

    async def _answer_presence(self, frame: Presence, rule: Rule) -> None:
        try:
            snapshot = await self.node.presence.snapshot(rule.exchange, frame.channel)
        except PresenceUnavailable:
            self.send(error_frame("unavailable", "presence unavailable, retry later", frame.id))
            return
        clients = [(m.user, m.session) for m in snapshot.members]
        self.send(presence_frame(frame.id, frame.channel, snapshot.count, clients))

    async def _subscribe(self, frame: Subscribe) -> None:
        # A subject the anomaly detector throttled (gateway/limits/restrictions.py) counts too.
        refusal = self.guard.subscribe() or self.node.restrictions.throttle(
            self.principal.sub, self.address
        )
        if refusal is not None:
            self._refuse(refusal, frame.id)
            return
        channel = frame.channel
        rule = self.gate.may_subscribe(self.principal, channel, self.address, self.id)
        if isinstance(rule, Denied):
            raise FrameError("forbidden", rule.message, frame.id)
        if channel in self.subscriptions:
            if frame.since is not None:
                # Replaying into a live subscription would deliver messages twice.
                raise FrameError(
                    "bad_request", f"already subscribed to {channel}; unsubscribe first", frame.id
                )
            seq = self.node.latest_seq(channel, self.subscriptions[channel])
            self.send(ack_frame(frame.id, seq=seq))
            return
        limit = self.node.settings.limits.max_channels_per_connection
        if len(self.subscriptions) + self._joining >= limit:
            raise FrameError("forbidden", f"at most {limit} channels per connection", frame.id)
        self._joining += 1
        policies = self.node.policies
        try:
            joined = await self.node.add_subscriber(
                self, channel, rule.exchange, since=frame.since, history=rule.history
            )
        except BrokerUnavailable:
            raise FrameError("unavailable", "broker unavailable, retry later", frame.id) from None
        except LimitRefused as refused:  # the replay limits, or the tenant's subscriptions cap
            self._refuse(refused.refusal, frame.id)
            return
        finally:
            self._joining -= 1
        if self.node.policies is not policies:
            # A reload swapped the set while we waited for the broker; its
            # re-check could not see this subscription yet, so check it here.
            for _, again in self.node.policies.revoked(self.principal, {channel: rule.exchange}):
                self.node.remove_subscriber(self, channel)
                self.emit("denied", channel=channel, detail="subscribe", rule=_label(again.rule))
                raise FrameError("forbidden", f"not allowed to subscribe to {channel}", frame.id)
        self.subscriptions[channel] = rule.exchange
        self.emit("subscribe", channel=channel, rule=rule.label)
        if joined.recovered is None:
            self.send(ack_frame(frame.id, seq=joined.seq))
        else:
            self.send(ack_frame(frame.id, seq=joined.seq, recovered=joined.recovered))
        for message in joined.backlog:
            self.send(message)

    def _unsubscribe(self, frame: Unsubscribe) -> None:
        if self.subscriptions.pop(frame.channel, None) is not None:
            self.node.remove_subscriber(self, frame.channel)
            self.emit("unsubscribe", channel=frame.channel)
        self.send(ack_frame(frame.id))

    async def _publish(self, frame: Publish) -> None:
        self._publishing = True
        try:
            await self._publish_checked(frame)
        finally:
            self._publishing = False

    async def _publish_checked(self, frame: Publish) -> None:
        rule = self.gate.may_publish(self.principal, frame.channel, self.address, self.id)
        if isinstance(rule, Denied):
            raise FrameError("forbidden", rule.message, frame.id)
        max_bytes = rule.limits.max_bytes
        if max_bytes is not None and len(frame.body) > max_bytes:
            raise FrameError("too_large", f"data is larger than {max_bytes} bytes", frame.id)
        refusal = self.node.restrictions.throttle(self.principal.sub, self.address)
        if refusal is None:
            refusal = await self.node.limiter.take_publish(self.principal.sub, rule)
        if refusal is None:  # the tenant's publish rate and messages per day
            refusal = await self.node.limiter.take_tenant_publish(self.principal)
        if refusal is not None:
            self._refuse(refusal, frame.id)  # nothing of it reaches RabbitMQ
            return
        self.emit("publish", channel=frame.channel, size=len(frame.body), rule=rule.label)
        if self.node.shutting_down:
            raise FrameError("unavailable", "server shutting down, reconnect elsewhere", frame.id)
        if self._inflight is None:
            self._inflight = asyncio.Semaphore(MAX_INFLIGHT_PUBLISHES)
        inflight = self._inflight
        await inflight.acquire()
        exchange = rule.exchange
        # Written to RabbitMQ in call order, which is the order frames arrived:
        # one publisher's messages keep their order.
        try:
            confirm = self.node.broker.send(
                exchange, frame.channel, frame.body, self._stamp.properties()
            )
        except BrokerUnavailable as exc:
            inflight.release()
            self.node.metrics.publish_failed(exchange)
            if frame.id is not None:  # like a failed confirm: answered only when asked
                raise FrameError("unavailable", str(exc), frame.id) from None
            return
        if self._confirming is None:
            self._confirming = set()
        self._confirming.add(confirm)
        started = time.monotonic()
        confirm.add_done_callback(partial(self._confirmed, exchange, frame.id, started))

    def _confirmed(
        self,
        exchange: str,
        request_id: RequestId | None,
        started: float,
        confirm: asyncio.Future[object],
    ) -> None:
        """Answer a publish once RabbitMQ confirmed it (ack) or did not (unavailable)."""
        # Both made before the publish was sent.
        assert self._confirming is not None and self._inflight is not None
        self._confirming.discard(confirm)
        self._inflight.release()
        error = publish_error(confirm)
        if error is None:
            self.node.metrics.publish_confirmed(exchange, time.monotonic() - started)
        else:
            self.node.metrics.publish_failed(exchange)
        if request_id is None:
            return  # the client asked for no answer
        if not self._answers:
            # Confirms come in batches (one broker ack covers many publishes):
            # answer all of them that end in this loop iteration with one write.
            asyncio.get_running_loop().call_soon(self._send_answers)
        if error is None:
            self._answers.append(ack_frame(request_id))
        else:
            self._answers.append(error_frame("unavailable", str(error), request_id))

    def _send_answers(self) -> None:
        answers, self._answers = self._answers, []
        if answers:
            self.outbox.send_many(answers)

    async def _refresh(self, frame: Auth) -> None:
        try:
            principal = await self.gate.verifier.verify(frame.token)
        except AuthError as exc:
            self.emit("auth_failed", detail=exc.reason)
            raise FrameError("unauthorized", str(exc), frame.id) from None
        if principal.sub != self.principal.sub:
            raise FrameError("unauthorized", "a refreshed token must carry the same sub", frame.id)
        self.principal = principal
        self._expires_at = loop_time_of(principal.exp)
        self._schedule_wakeup()
        self.emit("auth_ok", detail="refresh")
        # Roles or claims may have changed with the new token.
        self.recheck_subscriptions()
        # Answered even without an id: the client must know the refresh took.
        self.send(ack_frame(frame.id))


def _request_id(text: str) -> RequestId | None:
    """The id of a frame refused before it was parsed, to echo in the answer."""
    try:
        return parse_frame(text).id
    except FrameError as exc:
        return exc.request_id


def _label(rule: Rule | None) -> str | None:
    return None if rule is None else rule.label

"""The gateway's hub of one process: policies, subscriptions, broker, fan-out.

One path for every message, wherever it was published: RabbitMQ stream ->
``Broker`` -> ``Node.deliver`` -> local subscribers in the ``Hub`` -> each
connection's ``Outbox``. Client publishes go to RabbitMQ and come back the
same way, so local and remote messages are delivered identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.broker.broker import Broker, Delivery
from gateway.config import Settings
from gateway.core.channel_rates import ChannelRates
from gateway.core.client_address import TrustedProxies
from gateway.core.deadlines import Deadlines
from gateway.core.hub import Hub, Route
from gateway.core.transport import FanOut, send_each
from gateway.limits.limiter import Limiter, LimitRefused, Refusal, Slot
from gateway.limits.replays import ReplayGate, Ticket
from gateway.limits.restrictions import Restrictions
from gateway.policy.rules import PolicySet
from gateway.presence.local import LocalPresence
from gateway.protocol.codes import CLOSE_SLOW_CONSUMER
from gateway.protocol.frames import data_from_body, message_frame
from gateway.telemetry.events import EventBus
from gateway.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from gateway.core.transport import Subscriber
    from gateway.presence.seam import Presence

log = logging.getLogger("rabbitgate.node")

# An exchange without local subscribers is still followed this long, so that
# a client hopping between channels does not restart the stream consumer.
UNFOLLOW_GRACE_SECONDS = 30.0


class Sessions(set["Subscriber"]):
    """The live connections of every transport, with when each was added
    (``since``, epoch seconds: the operator's connection list shows it)."""

    def __init__(self) -> None:
        super().__init__()
        self.since: dict[str, float] = {}

    def add(self, session: Subscriber) -> None:
        self.since.setdefault(session.id, time.time())
        super().add(session)

    def discard(self, session: object) -> None:
        if session in self:
            self.since.pop(session.id, None)  # type: ignore[attr-defined]  # a Subscriber
        super().discard(session)


@dataclass(frozen=True, slots=True)
class Subscribed:
    seq: int | None  # latest seq of the channel known here
    recovered: bool | None  # None when the subscribe had no `since`
    backlog: list[bytes]  # frames to send right after the ack


class Node:
    def __init__(
        self, settings: Settings, policies: PolicySet, fan_out: FanOut = send_each
    ) -> None:
        self.settings = settings
        # How one message frame is written to many subscribers' buffers: the
        # WebSocket transport gives one that frames it once for all of them.
        self._fan_out = fan_out
        self.policies = policies
        self.hub: Hub[Subscriber] = Hub()
        self.broker = Broker(
            settings.amqp_url,
            self.deliver,
            stream_max_bytes=settings.stream_max_bytes,
            stream_max_age=settings.stream_max_age,
            confirm_timeout=settings.publish_confirm_timeout_seconds,
            connect_timeout=settings.broker_connect_timeout_seconds,
            initial_cluster_size=settings.stream_initial_cluster_size,
        )
        self.sessions: Sessions = Sessions()
        self.events = EventBus()
        self.metrics = Metrics()  # its own registry; the Gateway serves it on /metrics
        self.limiter = Limiter(settings)  # rate limits and connection caps
        # What history replays may cost, per user and per process (gateway/replays.py).
        self.replays = ReplayGate(settings.limits)
        # Bans and throttles put on subjects by the anomaly detector's responses.
        self.restrictions = Restrictions()
        # Whose X-Forwarded-For names the client (gateway/core/client_address.py).
        self.trusted_proxies = TrustedProxies(settings.trusted_proxies)
        # Every session's wake-up (token expiry, idle timeout) on one loop timer.
        self.deadlines = Deadlines()
        # Latest seq seen per route (exchange, channel): what a subscribe ack reports.
        self._latest_seq: dict[Route, int] = {}
        self._following: dict[str, asyncio.Future[None]] = {}
        # route -> sessions reading its history, each with what arrived live meanwhile
        self._recovering: dict[Route, dict[Subscriber, list[tuple[int, bytes]]]] = {}
        self._unfollow_timers: dict[str, asyncio.TimerHandle] = {}
        # Tenant subscription leases: (session id, channel) -> lease.
        self._tenant_leases: dict[tuple[str, str], Slot] = {}
        self.dropped_messages = 0
        # Messages per second per channel with local subscribers (the operator's list).
        self.channel_rates = ChannelRates()
        self.shutting_down = False
        # Who is subscribed where (spec section 11): this process's table unless
        # the Gateway puts the Redis service here (gateway/presence/).
        self.presence: Presence = LocalPresence(self.deliver_presence, self.wants_presence_events)

    async def swap_policies(self, policies: PolicySet) -> int:
        """Put a validated policy set in force and re-check every live subscription.

        A subscription the new set no longer allows is ended with a
        ``forbidden`` error frame for its channel; nothing more of it is
        delivered. Returns how many subscriptions were ended. Declares the
        exchanges new rules name (raises BrokerUnavailable if RabbitMQ refuses).
        """
        await self.broker.declare(policies.exchanges())
        self.policies = policies
        self.metrics.known_exchanges(policies.exchanges())  # their series from 0
        ended = 0
        for session in list(self.sessions):
            ended += session.recheck_subscriptions()
        return ended

    async def start(self) -> None:
        await self.broker.start(self.policies.exchanges())
        await self.limiter.start()

    async def stop(self) -> None:
        for timer in self._unfollow_timers.values():
            timer.cancel()
        self.deadlines.close()
        await self.broker.close()
        await self.limiter.close()

    # --- subscriptions ------------------------------------------------------

    async def add_subscriber(
        self,
        session: Subscriber,
        channel: str,
        exchange: str,
        *,
        since: int | None = None,
        history: int = 0,
    ) -> Subscribed:
        """Attach ``session`` to ``channel``, first replaying what followed ``since``.

        Returns once messages flow, with what the subscribe ack must say and
        the frames to send right after it (the replay, then what was delivered
        meanwhile, each exactly once and in seq order). The caller must send
        them before it awaits anything, so that nothing overtakes them.
        Raises BrokerUnavailable when the stream cannot be followed or read,
        and ReplayRefused (before any read) when ``since`` asks for a replay
        the replay limits refuse.
        """
        # The tenant's subscriptions (gateway/limits/tenants.py): a lease held
        # while the subscription lives, given back by remove_subscriber.
        lease = await self.limiter.take_tenant_subscription(session.principal)
        if isinstance(lease, Refusal):
            raise LimitRefused(lease)
        ticket = None
        try:
            if since is not None:
                ticket = await self.replays.admit(session.principal.sub)
            joined = await self._add_subscriber(session, channel, exchange, since, history, ticket)
        except BaseException:
            self.limiter.release(lease)
            raise
        finally:
            if ticket is not None:
                self.replays.release(ticket)
        if lease is not None:
            self._tenant_leases[(session.id, channel)] = lease
        return joined

    async def _add_subscriber(
        self,
        session: Subscriber,
        channel: str,
        exchange: str,
        since: int | None,
        history: int,
        ticket: Ticket | None,
    ) -> Subscribed:
        await self._ensure_following(exchange)
        route = (exchange, channel)
        if since is None:
            self._join(session, channel, exchange)
            # The channel's latest seq, or else where the exchange's stream is
            # now: either is a `since` from which nothing will be missed.
            seq = self._latest_seq.get(route)
            if seq is None:
                seq = self.broker.position(exchange)
            return Subscribed(seq, None, [])
        # Buffer what arrives live while the history is read; the stream read
        # ends at a marker written after buffering began, so the two overlap
        # and together miss nothing.
        waiting = self._recovering.setdefault(route, {})
        buffered: list[tuple[int, bytes]] = []
        waiting[session] = buffered
        try:
            replay = await self.broker.replay(
                exchange,
                channel,
                since,
                history=history,
                scan_limit=self.settings.limits.replay_scan_limit,
                timeout=self.settings.limits.replay_timeout_seconds,
            )
            if ticket is not None:
                ticket.scanned = replay.scanned
        finally:
            del waiting[session]
            if not waiting:
                del self._recovering[route]
        backlog: list[bytes] = []
        last = since
        if replay.recovered:
            for delivery in replay.deliveries:
                frame = self._frame(delivery)
                if frame is not None:
                    backlog.append(frame)
                last = delivery.seq
        for seq, frame in buffered:
            if seq > last:
                backlog.append(frame)
                last = seq
        # `since` itself counts only once the stream proved it is this channel's.
        candidates = [self._latest_seq.get(route)]
        if replay.recovered or last != since:
            candidates.append(last)
        latest = max((seq for seq in candidates if seq is not None), default=None)
        self._join(session, channel, exchange)
        return Subscribed(latest, replay.recovered, backlog)

    def _join(self, session: Subscriber, channel: str, exchange: str) -> None:
        self.hub.add(channel, exchange, session)
        self.presence.joined(exchange, channel, session.id, session.principal.sub)

    def remove_subscriber(self, session: Subscriber, channel: str) -> None:
        self.limiter.release(self._tenant_leases.pop((session.id, channel), None))
        exchange = self.hub.exchange_of(channel, session)
        if exchange is not None:
            self.presence.left(exchange, channel, session.id)
        emptied = self.hub.remove(channel, session)
        if exchange is not None and not self.hub.subscribers(channel, exchange):
            self._latest_seq.pop((exchange, channel), None)
        if emptied is not None and emptied not in self._unfollow_timers:
            loop = asyncio.get_running_loop()
            self._unfollow_timers[emptied] = loop.call_later(
                UNFOLLOW_GRACE_SECONDS, self._unfollow_if_idle, emptied
            )

    def latest_seq(self, channel: str, exchange: str) -> int | None:
        return self._latest_seq.get((exchange, channel))

    async def _ensure_following(self, exchange: str) -> None:
        timer = self._unfollow_timers.pop(exchange, None)
        if timer is not None:
            timer.cancel()
        following = self._following.get(exchange)
        if following is None:
            following = asyncio.ensure_future(self.broker.follow(exchange))
            self._following[exchange] = following
        try:
            # shield: one subscriber giving up must not cancel the others' wait.
            await asyncio.shield(following)
        except BaseException:
            if following.done() and self._following.get(exchange) is following:
                del self._following[exchange]
            raise

    def _unfollow_if_idle(self, exchange: str) -> None:
        self._unfollow_timers.pop(exchange, None)
        if exchange in self.hub.exchanges():
            return
        self._following.pop(exchange, None)
        task = asyncio.ensure_future(self.broker.unfollow(exchange))
        task.add_done_callback(_log_failure)

    # --- delivery -----------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        """Fan one broker message out to this process's subscribers of its route:
        its channel on the exchange it came from (gateway/hub.py)."""
        route = (delivery.exchange, delivery.channel)
        subscribers = self.hub.subscribers(delivery.channel, delivery.exchange)
        recovering = self._recovering.get(route)
        if not subscribers and not recovering:
            # Not remembered: an ack for it reports the stream position instead,
            # so this map holds only channels with local subscribers.
            return
        self._latest_seq[route] = delivery.seq
        frame = self._frame(delivery)
        if frame is None:
            return
        if subscribers:
            self.channel_rates.count(delivery.channel)
            delivered = self._fan_out((session.outbox for session in subscribers), frame)
            self.metrics.delivered(delivery.exchange, delivered, delivery.ts_ms)
        if recovering:
            for session, buffered in recovering.items():
                if len(buffered) >= self.settings.limits.send_buffer_messages:
                    session.close(CLOSE_SLOW_CONSUMER, "slow consumer")
                else:
                    buffered.append((delivery.seq, frame))

    def wants_presence_events(self, exchange: str, channel: str) -> bool:
        """Whether this process has subscribers of ``channel`` (on ``exchange``)
        whose rule asks for join and leave events."""
        if not self.hub.subscribers(channel, exchange):
            return False
        found = self.policies.rule_for(channel)
        return found is not None and found[0].exchange == exchange and found[0].presence_events

    def deliver_presence(self, exchange: str, channel: str, frames: list[bytes]) -> None:
        """Fan one tick's join/leave (or presence_changed) frames out to the local
        subscribers of the channel, when its rule (as in force now) has presence_events."""
        if not self.wants_presence_events(exchange, channel):
            return
        subscribers = list(self.hub.subscribers(channel, exchange))
        for frame in frames:
            self._fan_out((session.outbox for session in subscribers), frame)

    def _frame(self, delivery: Delivery) -> bytes | None:
        """The message frame, serialized once for every subscriber; None if undeliverable.

        A backend may publish anything: a message that cannot be framed is
        skipped and counted (``rabbitgate_messages_dropped``), for live
        subscribers and replays alike, never fatal to either.
        """
        try:
            data = data_from_body(delivery.body)
            return message_frame(
                delivery.channel, delivery.seq, data, delivery.sender, delivery.ts_ms
            )
        except ValueError as exc:
            self.dropped_messages += 1
            log.warning("dropped a message on %s (seq %d): %s", delivery.channel, delivery.seq, exc)
            return None


def _log_failure(task: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        if task.exception() is not None:
            log.warning("background broker task failed: %s", task.exception())

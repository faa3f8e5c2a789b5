"""Presence for one gateway process: local truth, batched writes, events out and in.

The node calls ``joined`` and ``left`` as subscribers come and go (any
transport: the hub is shared). Those calls never wait and never fail: they
update this process's own table (the truth it can always rebuild Redis from)
and queue a write. Every ``TICK_SECONDS`` one pipeline writes the queued
entries and publishes one batch of events per channel; the events come back
to every process through Redis pub/sub, where ``coalesce`` turns them into
frames for the local subscribers of channels whose rule has
``presence_events``.

Redis trouble never reaches a publish or a delivery: a failed write only marks
the table dirty, and the next renewal that reaches Redis starts a new
generation (a fresh process id), writes every local entry under it and drops
the old one, so stale entries of sessions that left during the outage stop
counting at once. ``snapshot`` answers ``PresenceUnavailable`` within the Redis
timeout. Join and leave events of an outage are not replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from gateway.presence.coalesce import PendingEvents, PresenceEvent, render
from gateway.presence.seam import Deliver, WantsEvents
from gateway.presence.store import (
    MAX_LISTED,
    PROCESS_TTL_MS,
    REDIS_ERRORS,
    ChannelKey,
    Member,
    PresenceStore,
    PresenceUnavailable,
    Snapshot,
    process_id,
)

log = logging.getLogger("rabbitgate.presence")

TICK_SECONDS = 0.2
STOP_TIMEOUT_SECONDS = 2.0
LISTEN_POLL_SECONDS = 0.25
# Queued writes held while Redis is slow; past this the table is marked dirty
# and rebuilt, so memory stays bounded whatever the churn.
MAX_QUEUED_WRITES = 50_000


class PresenceService:
    def __init__(
        self,
        url: str,
        process_seed: str,
        *,
        timeout: float,
        deliver: Deliver,
        wants_events: WantsEvents,
        prefix: str = "rabbitgate:presence:",
        process_ttl_ms: int = PROCESS_TTL_MS,
    ) -> None:
        self._url, self._seed, self._timeout, self._prefix = url, process_seed, timeout, prefix
        self._ttl_ms = process_ttl_ms
        self._renew_seconds = process_ttl_ms / 1000 / 4
        self._generation = 0
        self.store = self._new_store()
        self._deliver = deliver
        self._wants_events = wants_events
        self._local: dict[ChannelKey, dict[str, str]] = {}  # channel -> session -> user
        self._joined: list[tuple[ChannelKey, Member]] = []
        self._left: list[tuple[ChannelKey, str]] = []
        self._outgoing: dict[ChannelKey, list[tuple[str, str, str]]] = {}
        self._incoming: dict[ChannelKey, PendingEvents] = {}
        self._dirty = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self.write_failures = 0
        self.events_dropped = 0  # malformed or oversized batches from pub/sub

    def _new_store(self) -> PresenceStore:
        process = process_id(f"{self._seed}/{self._generation}")
        return PresenceStore(
            self._url,
            process,
            timeout=self._timeout,
            prefix=self._prefix,
            process_ttl_ms=self._ttl_ms,
        )

    # --- the node's calls ----------------------------------------------------

    def joined(self, exchange: str, channel: str, session: str, user: str) -> None:
        key = (exchange, channel)
        members = self._local.setdefault(key, {})
        if session in members:
            return
        members[session] = user
        self._queue_write()
        self._joined.append((key, Member(user, session)))
        self._outgoing.setdefault(key, []).append(("join", user, session))

    def left(self, exchange: str, channel: str, session: str) -> None:
        key = (exchange, channel)
        members = self._local.get(key)
        if members is None or session not in members:
            return
        user = members.pop(session)
        if not members:
            del self._local[key]
        self._queue_write()
        self._left.append((key, session))
        self._outgoing.setdefault(key, []).append(("leave", user, session))

    async def snapshot(self, exchange: str, channel: str, limit: int = MAX_LISTED) -> Snapshot:
        """Every subscriber on every process; raises PresenceUnavailable."""
        if self._dirty:
            # This process's own entries are not all in Redis yet: an exact count
            # cannot be given until the rebuild ran.
            raise PresenceUnavailable("rebuilding")
        return await self.store.snapshot(exchange, channel, limit)

    def local_count(self) -> int:
        return sum(len(m) for m in self._local.values())

    def _queue_write(self) -> None:
        if len(self._joined) + len(self._left) >= MAX_QUEUED_WRITES:
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._dirty = True
        self._joined.clear()
        self._left.clear()

    # --- the loops -------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.store.renew()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="presence-flush"),
            asyncio.create_task(self._renew_loop(), name="presence-renew"),
            asyncio.create_task(self._listen_loop(), name="presence-listen"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        # Bounded: a Redis call that ignores cancellation must not hold up shutdown.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
        # The leaves of the connections the shutdown just closed: written and
        # told to the other processes (flush never raises; bounded by its timeout).
        await self.flush()
        entries = [(key, s) for key, members in self._local.items() for s in members]
        with contextlib.suppress(*REDIS_ERRORS):
            await self.store.forget_process(entries)
        await self.store.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            await self.flush()
            self._render_incoming()

    async def flush(self) -> None:
        """Write what was queued and publish this tick's events (one pipeline)."""
        if not (self._joined or self._left or self._outgoing):
            return
        joined, left, events = self._joined, self._left, self._outgoing
        self._joined, self._left, self._outgoing = [], [], {}
        if self._dirty:
            joined, left = [], []  # the rebuild writes the whole table
        try:
            await self.store.write(joined, left, events)
        except REDIS_ERRORS as exc:
            self.write_failures += 1
            if not self._dirty:
                log.warning("presence: Redis write failed (%s); rebuilding when it answers", exc)
            self._mark_dirty()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._renew_seconds)
            await self.renew()

    async def renew(self) -> None:
        """Keep this process alive in Redis; rebuild its entries when Redis lost them."""
        try:
            forgotten = await self.store.renew()
        except REDIS_ERRORS:
            self._mark_dirty()
            return
        if forgotten or self._dirty:
            await self._rebuild()

    async def _rebuild(self) -> None:
        old = self.store
        self._generation += 1
        new = self._new_store()
        entries = [
            (key, Member(user, session))
            for key, members in self._local.items()
            for session, user in members.items()
        ]
        try:
            await new.renew()
            await new.write(entries, [], {})
        except REDIS_ERRORS:
            self._generation -= 1
            await new.close()
            self._mark_dirty()
            return
        self.store, self._dirty = new, False
        with contextlib.suppress(*REDIS_ERRORS):
            await old.forget_process([])  # only its liveness key: its entries lapse with it
        await old.close()
        log.info("presence: rebuilt %d entries in Redis", len(entries))

    async def _listen_loop(self) -> None:
        # redis-py's get_message(timeout=...) can swallow a task's cancellation
        # (it waits inside its own timeout): the loop also ends on _stopping.
        while not self._stopping:
            pubsub = self.store.pubsub()
            try:
                await pubsub.subscribe(self.store.events_channel)
                while not self._stopping:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
                    if message is not None:
                        self._receive(message.get("data"))
            except REDIS_ERRORS:
                # redis-py may turn a cancellation inside its own timeout into a
                # ConnectionError: never let that swallow our own stop.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                await asyncio.sleep(1.0)  # Redis is away; the renewal rebuilds meanwhile
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()

    def _receive(self, data: Any) -> None:
        try:
            batch = orjson.loads(data)
            key = (batch["x"], batch["c"])
            events = [PresenceEvent(kind, user, session) for kind, user, session in batch["e"]]
            if not all(e.kind in ("join", "leave") for e in events):
                raise ValueError("unknown event kind")
        except (ValueError, TypeError, KeyError):
            self.events_dropped += 1
            return
        if not self._wants_events(*key):
            return
        pending = self._incoming.setdefault(key, PendingEvents())
        for event in events:
            pending.add(event)

    def _render_incoming(self) -> None:
        incoming, self._incoming = self._incoming, {}
        for (exchange, channel), pending in incoming.items():
            frames = render(channel, pending)
            if frames:
                self._deliver(exchange, channel, frames)

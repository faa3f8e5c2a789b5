"""Presence of this process only: what a gateway without ``redis_url`` uses.

Exact when this process is the only gateway (or the only one serving the
channel); with several processes and no Redis, each answers for its own
subscribers only (docs/presence.md says so). Same interface as the Redis
``PresenceService`` (``seam.Presence``), same coalescing of events per tick,
so a client cannot tell them apart on one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from gateway.presence.coalesce import PendingEvents, PresenceEvent, render
from gateway.presence.seam import Deliver, WantsEvents
from gateway.presence.store import MAX_LISTED, ChannelKey, Member, Snapshot

TICK_SECONDS = 0.2


class LocalPresence:
    def __init__(
        self, deliver: Deliver, wants_events: WantsEvents, *, tick: float = TICK_SECONDS
    ) -> None:
        self._deliver = deliver
        self._wants_events = wants_events
        self._tick = tick
        # channel -> session -> user; dicts keep the order of joining.
        self._members: dict[ChannelKey, dict[str, str]] = {}
        self._pending: dict[ChannelKey, PendingEvents] = {}
        self._task: asyncio.Task[None] | None = None

    def joined(self, exchange: str, channel: str, session: str, user: str) -> None:
        key = (exchange, channel)
        members = self._members.setdefault(key, {})
        if session in members:
            return
        members[session] = user
        self._event(key, PresenceEvent("join", user, session))

    def left(self, exchange: str, channel: str, session: str) -> None:
        key = (exchange, channel)
        members = self._members.get(key)
        if members is None or session not in members:
            return
        user = members.pop(session)
        if not members:
            del self._members[key]
        self._event(key, PresenceEvent("leave", user, session))

    def _event(self, key: ChannelKey, event: PresenceEvent) -> None:
        if self._wants_events(*key):
            self._pending.setdefault(key, PendingEvents()).add(event)

    async def snapshot(self, exchange: str, channel: str, limit: int = MAX_LISTED) -> Snapshot:
        members = self._members.get((exchange, channel), {})
        listed = tuple(
            Member(user, session) for session, user in itertools.islice(members.items(), limit)
        )
        return Snapshot(len(members), listed)

    def flush(self) -> None:
        """Deliver this tick's events (the loop calls it; tests may too)."""
        pending, self._pending = self._pending, {}
        for (exchange, channel), events in pending.items():
            frames = render(channel, events)
            if frames:
                self._deliver(exchange, channel, frames)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="presence-local")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            self.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

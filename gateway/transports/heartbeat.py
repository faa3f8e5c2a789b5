"""WebSocket heartbeats for every connection of the process, from one task.

websockets' own keepalive runs a task per connection (a coroutine, a timer and
a timeout context each, woken every ``ping_interval``): at 10,000 idle
connections that was ~2 KiB of memory per connection and most of the 15 % of
a core the process spent holding them. Here one ``Heartbeat`` keeps every
connection on a wheel of ticks and walks each tick's connections in slices.

The semantics stay websockets' (``limits.heartbeat_seconds`` = ping interval,
``limits.heartbeat_timeout_seconds`` = time a peer has to answer):

* a connection is first pinged one interval after it is added;
* a ping sent at ``S`` that is unanswered at ``S + timeout`` closes the
  connection with 1011 "keepalive ping timeout" (websockets' failure path);
* once answered, the next ping goes at ``S + interval`` (at once if that has
  passed: a peer slower to answer than the interval is pinged as soon as its
  answer is seen, at the latest at ``S + timeout``);
* a connection that is closing is not pinged, but its beat still comes every
  interval, and aborts it once its close is overdue (``close_timeout``), as
  websockets' keepalive did: that is what ends a close stuck behind the full
  send buffer of a peer that stopped reading.

Times are rounded up to the tick (a twentieth of the shorter of the two
settings, at most 1 s), so a ping or a close can be up to one tick late.

``Heartbeat`` is the schedule (pure, clock passed in; unit-tested with a
fake link); ``run`` is its task; ``ws_adapter.WebSocketLink`` does the I/O on
a websockets connection: a ping frame written straight to the transport, the
answer seen through websockets' own ``pending_pings`` (which also keeps
``connection.latency`` up to date).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("rabbitgate.heartbeat")

# Connections handled before the task lets the event loop run other work.
SLICE = 200
MAX_TICK_SECONDS = 1.0
TICKS_PER_PERIOD = 20

C = TypeVar("C", bound=Hashable)
C_contra = TypeVar("C_contra", bound=Hashable, contravariant=True)


class Link(Protocol[C_contra]):
    """The I/O ``Heartbeat`` needs; ``ws_adapter.WebSocketLink`` is the real one."""

    def ping(self, connection: C_contra, payload: bytes) -> bool:
        """Send a ping (or, to a closing connection, see that its close
        ends in time); False once the connection is gone."""

    def answered(self, connection: C_contra, payload: bytes) -> bool:
        """Has the pong for ``payload`` been received?"""

    def expire(self, connection: C_contra) -> None:
        """The ping went unanswered: close the connection (1011). It stays on
        the wheel until ``ping`` says it is gone."""


class _Beat(Generic[C]):
    """One connection on the wheel. Reused for every ping of the connection."""

    __slots__ = ("connection", "sent", "payload")

    def __init__(self, connection: C) -> None:
        self.connection: C | None = connection  # None once discarded
        self.sent: float | None = None  # when the unanswered-so-far ping went
        self.payload = b""


class Heartbeat(Generic[C]):
    def __init__(self, link: Link[C], interval: float, timeout: float, now: float) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("heartbeat interval and timeout must be positive")
        self.link = link
        self.interval = interval
        self.timeout = timeout
        self.tick = min(MAX_TICK_SECONDS, min(interval, timeout) / TICKS_PER_PERIOD)
        self._beats: dict[C, _Beat[C]] = {}
        # Tick number -> beats due then. A discarded beat stays in its bucket
        # (with connection None) until its tick comes: no search on discard.
        self._wheel: dict[int, list[_Beat[C]]] = {}
        self._done = self._tick_of(now) - 1  # last tick processed
        self.expired = 0  # connections closed for an unanswered ping, ever

    def __len__(self) -> int:
        return len(self._beats)

    def add(self, connection: C, now: float) -> None:
        """Start pinging ``connection`` (first ping one interval from now)."""
        if connection in self._beats:
            return
        beat = _Beat(connection)
        self._beats[connection] = beat
        self._schedule(beat, now + self.interval)

    def discard(self, connection: C) -> None:
        """Stop pinging ``connection`` (it closed). Harmless if not added."""
        beat = self._beats.pop(connection, None)
        if beat is not None:
            beat.connection = None

    def next_due(self) -> float:
        """When ``due`` next has something to do (the next tick's start)."""
        return (self._done + 1) * self.tick

    def due(self, now: float) -> list[_Beat[C]]:
        """Take the beats of every tick up to ``now``; pass them to ``beat``."""
        current = self._tick_of(now)
        taken: list[_Beat[C]] = []
        while self._done < current:
            self._done += 1
            bucket = self._wheel.pop(self._done, None)
            if bucket:
                taken.extend(bucket)
        return taken

    def beat(self, beat: _Beat[C], now: float, payload: bytes) -> None:
        """Handle one due beat: ping, check the answer, or expire."""
        connection = beat.connection
        if connection is None:
            return  # discarded while it waited
        sent = beat.sent
        if sent is not None:
            if self.link.answered(connection, beat.payload):
                beat.sent = None
                if sent + self.interval > now:
                    self._schedule(beat, sent + self.interval)
                    return
            elif now >= sent + self.timeout:
                self.expired += 1
                self.link.expire(connection)
                # Still watched: its close may need ending (see ws_adapter.WebSocketLink.ping).
                beat.sent = None
                self._schedule(beat, now + self.interval)
                return
            else:
                self._schedule(beat, sent + self.timeout)
                return
        if not self.link.ping(connection, payload):
            self.discard(connection)
            return
        beat.sent = now
        beat.payload = payload
        self._schedule(beat, now + min(self.interval, self.timeout))

    def _tick_of(self, at: float) -> int:
        return math.floor(at / self.tick)

    def _schedule(self, beat: _Beat[C], at: float) -> None:
        # Rounded up, and never into a tick already processed.
        tick = max(math.ceil(at / self.tick), self._done + 1)
        bucket = self._wheel.get(tick)
        if bucket is None:
            self._wheel[tick] = [beat]
        else:
            bucket.append(beat)


async def run(heartbeat: Heartbeat[C]) -> None:
    """The heartbeat task: wake every tick, handle what is due in slices."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(max(0.0, heartbeat.next_due() - loop.time()))
        due = heartbeat.due(loop.time())
        # One random payload per tick: a peer can only answer a ping it read.
        payload = os.urandom(4)
        for start in range(0, len(due), SLICE):
            if start:
                await asyncio.sleep(0)  # let deliveries through between slices
            now = loop.time()
            for beat in due[start : start + SLICE]:
                try:
                    heartbeat.beat(beat, now, payload)
                except Exception:  # one broken connection must not stop everyone's heartbeat
                    log.exception("heartbeat failed for one connection")

"""Admission of history replays: the gateway's most expensive request.

A replay (``subscribe`` with ``since``, SSE's ``Last-Event-ID``) reads an
exchange's stream, every channel's messages, from ``since`` on: its cost is
the number of stream messages it goes through, up to
``limits.replay_scan_limit`` (gateway/history.py bounds each read). What one
user can make this process read is limited like any other expensive
request, and answered ``rate_limited`` with ``retry_after`` past the limit:

* at most ``replays_per_user`` reads of one user at once;
* a token bucket per user counted in stream messages read
  (``replay_scan_per_second_per_user``, ``replay_scan_burst``): a read is
  admitted while the user's bucket is not empty, and charged what it read
  once it ended (so a read may put the bucket in debt, and the next one waits);
* at most ``replays_in_flight`` reads of the process at once; more wait for
  a turn, up to ``replay_timeout_seconds``, then are refused.

Per process, not shared through Redis: the cost is this process's CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import LimitSettings
from gateway.limits.buckets import BucketTable
from gateway.limits.limiter import LimitRefused, Refusal

# A user at its concurrency cap cannot be told when a read ends; the hint.
BUSY_RETRY_AFTER_SECONDS = 1.0

Clock = Callable[[], float]


class ReplayRefused(LimitRefused):
    """A replay the limits refused; answered ``rate_limited`` (WebSocket) or 429 (SSE)."""


@dataclass(slots=True)
class Ticket:
    """One admitted read; the reader sets ``scanned`` to what it went through."""

    user: str
    scanned: int = 0
    released: bool = False


class ReplayGate:
    def __init__(self, limits: LimitSettings, clock: Clock = time.monotonic) -> None:
        self._per_user = limits.replays_per_user
        self._rate = limits.replay_scan_per_second_per_user
        self._burst = limits.replay_scan_burst
        self._wait = limits.replay_timeout_seconds
        self._clock = clock
        self._budgets = BucketTable(limits.bucket_table_size)
        self._running: dict[str, int] = {}
        self._turns = asyncio.Semaphore(limits.replays_in_flight)
        self.refused = 0

    def in_flight(self, user: str) -> int:
        return self._running.get(user, 0)

    def check(self, user: str) -> Refusal | None:
        """Would a replay of ``user`` be let in now? (No wait, nothing taken.)"""
        if self._running.get(user, 0) >= self._per_user:
            return Refusal("replays", BUSY_RETRY_AFTER_SECONDS)
        # Admitted while at least one message's worth is left in the budget.
        allowed, retry_after = self._budgets.check(user, self._rate, self._burst, self._clock())
        return None if allowed else Refusal("replay_budget", retry_after)

    async def admit(self, user: str) -> Ticket:
        """A turn for one read of ``user``; raises ReplayRefused. ``release`` it after."""
        refusal = self.check(user)
        if refusal is not None:
            self.refused += 1
            raise ReplayRefused(refusal)
        self._running[user] = self._running.get(user, 0) + 1
        try:
            async with asyncio.timeout(self._wait):
                await self._turns.acquire()
        except TimeoutError:
            self._leave(user)
            self.refused += 1
            raise ReplayRefused(Refusal("replays_in_flight", BUSY_RETRY_AFTER_SECONDS)) from None
        except BaseException:
            self._leave(user)
            raise
        return Ticket(user)

    def release(self, ticket: Ticket) -> None:
        """The read ended: give its turn back and charge what it read."""
        if ticket.released:
            return
        ticket.released = True
        self._turns.release()
        self._leave(ticket.user)
        if ticket.scanned > 0:
            now = self._clock()
            self._budgets.charge(ticket.user, self._rate, self._burst, now, ticket.scanned)

    def _leave(self, user: str) -> None:
        left = self._running.get(user, 0) - 1
        if left > 0:
            self._running[user] = left
        else:
            self._running.pop(user, None)

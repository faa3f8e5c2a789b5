"""Many one-shot timers on one event-loop timer.

Every connection has a deadline: its token's expiry or its idle timeout,
whichever comes first. As an event-loop timer each (a uvloop ``TimerHandle``
with its libuv timer, callback and arguments) that was ~600 bytes per
connection; here a deadline is a heap entry, and the loop holds one timer for
the earliest of them.

Cancelling marks an entry; marked entries are dropped when they come due, or
all at once when they are more than half of the heap (what asyncio does with
its own cancelled timers), so a client that keeps moving its deadline (token
refreshes) cannot grow the heap.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable

# uvloop's clock counts whole milliseconds: a timer can fire up to 1 ms before
# the deadline it was set for, by ``loop.time()``. Anything due within this
# much counts as due, or the timer would be re-armed for the same instant.
CLOCK_SLACK_SECONDS = 0.001
# Below this many entries cancelled ones are not worth a rebuild.
MIN_COMPACT_ENTRIES = 100


class Deadline:
    """One scheduled call; ``cancel`` before it runs and it never will."""

    __slots__ = ("callback", "_owner")

    def __init__(self, callback: Callable[[], object], owner: Deadlines) -> None:
        self.callback: Callable[[], object] | None = callback
        self._owner = owner

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._owner._cancelled_one()

    @property
    def cancelled(self) -> bool:
        return self.callback is None


class Deadlines:
    """The deadlines of one event loop (the running one, looked up when a timer is set)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties run in the order they were set
        self._cancelled = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        """Deadlines still to run (not cancelled)."""
        return len(self._heap) - self._cancelled

    def call_at(self, when: float, callback: Callable[[], object]) -> Deadline:
        """Run ``callback()`` at ``when`` (``loop.time()`` clock) or soon after."""
        deadline = Deadline(callback, self)
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        if when < self._timer_at:
            self._arm(when)
        return deadline

    def close(self) -> None:
        """Drop every deadline (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        for _, _, deadline in self._heap:
            deadline.callback = None
        self._heap.clear()
        self._cancelled = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._run_due)

    def _run_due(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = asyncio.get_running_loop().time() + CLOCK_SLACK_SECONDS
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, deadline = heapq.heappop(heap)
            callback = deadline.callback
            if callback is None:
                self._cancelled -= 1
                continue
            deadline.callback = None
            try:
                callback()
            except Exception as exc:  # one failing callback must not stop the others
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "deadline callback failed", "exception": exc}
                )
        if heap and heap[0][0] < self._timer_at:  # (a callback may have armed it already)
            self._arm(heap[0][0])

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > MIN_COMPACT_ENTRIES and self._cancelled * 2 > len(self._heap):
            # In place: _run_due may be walking this very list.
            self._heap[:] = [entry for entry in self._heap if entry[2].callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
            if not self._heap and self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, float("inf")


def loop_time_of(epoch_seconds: float) -> float:
    """A wall-clock instant (a token's exp) on the running event loop's clock."""
    if epoch_seconds == math.inf:
        return math.inf
    loop = asyncio.get_running_loop()
    return loop.time() + max(0.0, epoch_seconds - time.time())

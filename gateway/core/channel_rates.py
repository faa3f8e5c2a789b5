"""Messages per second per channel over a recent window, for the operator's list.

``Node.deliver`` calls ``count(channel)`` once per broker message it fans out
(not once per subscriber): one dict increment into the current one-second
bucket and, once a second, a rotation. ``rates`` sums the complete buckets of
the window; it is read only when an operator lists connections.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 10


class ChannelRates:
    __slots__ = ("_clock", "_window", "_second", "_current", "_done")

    def __init__(
        self, window_seconds: int = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._window = window_seconds
        self._second = int(clock())
        self._current: dict[str, int] = {}
        # (second, counts) of the last complete seconds, oldest first.
        self._done: deque[tuple[int, dict[str, int]]] = deque(maxlen=window_seconds)

    def count(self, channel: str) -> None:
        second = int(self._clock())
        if second != self._second:
            self._rotate(second)
        current = self._current
        current[channel] = current.get(channel, 0) + 1

    def _rotate(self, second: int) -> None:
        if self._current:
            self._done.append((self._second, self._current))
            self._current = {}
        self._second = second

    def rates(self) -> dict[str, float]:
        """Messages per second of each channel over the last complete seconds
        of the window (the current, partial second is left out)."""
        now = int(self._clock())
        if now != self._second:
            self._rotate(now)
        since = now - self._window
        totals: dict[str, int] = {}
        for second, counts in self._done:
            if second < since:
                continue
            for channel, n in counts.items():
                totals[channel] = totals.get(channel, 0) + n
        return {channel: n / self._window for channel, n in totals.items()}

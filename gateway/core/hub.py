"""Who is subscribed to what, in this gateway process. No I/O.

The hub maps each channel to its local subscribers, and counts channels per
exchange so the broker adapter knows which exchanges this process must follow.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)


class Hub(Generic[S]):
    def __init__(self) -> None:
        self._subscribers: dict[str, set[S]] = {}
        self._exchange_of: dict[str, str] = {}
        self._channels_per_exchange: defaultdict[str, int] = defaultdict(int)

    def add(self, channel: str, exchange: str, subscriber: S) -> bool:
        """Subscribe; True when this is the first subscriber of ``exchange`` here."""
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            subscribers = self._subscribers[channel] = set()
            self._exchange_of[channel] = exchange
            self._channels_per_exchange[exchange] += 1
            first_of_exchange = self._channels_per_exchange[exchange] == 1
        else:
            first_of_exchange = False
        subscribers.add(subscriber)
        return first_of_exchange

    def remove(self, channel: str, subscriber: S) -> str | None:
        """Unsubscribe; returns the exchange when its last local channel went away."""
        subscribers = self._subscribers.get(channel)
        if subscribers is None or subscriber not in subscribers:
            return None
        subscribers.discard(subscriber)
        if subscribers:
            return None
        del self._subscribers[channel]
        exchange = self._exchange_of.pop(channel)
        self._channels_per_exchange[exchange] -= 1
        if self._channels_per_exchange[exchange] == 0:
            del self._channels_per_exchange[exchange]
            return exchange
        return None

    def subscribers(self, channel: str) -> Iterable[S]:
        return self._subscribers.get(channel, ())

    def exchange_of(self, channel: str) -> str | None:
        return self._exchange_of.get(channel)

    def exchanges(self) -> set[str]:
        return set(self._channels_per_exchange)

    def channels(self) -> list[str]:
        return list(self._subscribers)

    def __len__(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

"""Who is subscribed to what, in this gateway process. No I/O.

The hub maps each route, the (exchange, channel) pair a subscribe's policy
decided, to its local subscribers, and counts routes per exchange so the
broker adapter knows which exchanges this process must follow. Deliveries
are looked up by route, never by channel alone: a message with routing key
``user.bob.inbox`` published to another exchange (any backend can do that)
must not reach the subscribers of bob's inbox on its own exchange, nor carry
another stream's seq to them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)

Route = tuple[str, str]  # (exchange, channel)


class Hub(Generic[S]):
    def __init__(self) -> None:
        self._subscribers: dict[Route, set[S]] = {}
        # channel -> exchanges it has local subscribers on (one, but for a
        # policy reload that moved the channel while its old subscribers end).
        self._exchanges_of: dict[str, set[str]] = {}
        self._channels_per_exchange: defaultdict[str, int] = defaultdict(int)

    def add(self, channel: str, exchange: str, subscriber: S) -> bool:
        """Subscribe; True when this is the first subscriber of ``exchange`` here."""
        route = (exchange, channel)
        subscribers = self._subscribers.get(route)
        if subscribers is None:
            subscribers = self._subscribers[route] = set()
            self._exchanges_of.setdefault(channel, set()).add(exchange)
            self._channels_per_exchange[exchange] += 1
            first_of_exchange = self._channels_per_exchange[exchange] == 1
        else:
            first_of_exchange = False
        subscribers.add(subscriber)
        return first_of_exchange

    def remove(self, channel: str, subscriber: S) -> str | None:
        """Unsubscribe; returns the exchange when its last local channel went away."""
        for exchange in tuple(self._exchanges_of.get(channel, ())):
            route = (exchange, channel)
            subscribers = self._subscribers[route]
            if subscriber not in subscribers:
                continue
            subscribers.discard(subscriber)
            if subscribers:
                return None
            del self._subscribers[route]
            exchanges = self._exchanges_of[channel]
            exchanges.discard(exchange)
            if not exchanges:
                del self._exchanges_of[channel]
            self._channels_per_exchange[exchange] -= 1
            if self._channels_per_exchange[exchange] == 0:
                del self._channels_per_exchange[exchange]
                return exchange
            return None
        return None

    def exchange_of(self, channel: str, subscriber: S) -> str | None:
        """The exchange ``subscriber`` follows ``channel`` on; None if not subscribed."""
        for exchange in self._exchanges_of.get(channel, ()):
            if subscriber in self._subscribers[(exchange, channel)]:
                return exchange
        return None

    def subscribers(self, channel: str, exchange: str | None = None) -> Iterable[S]:
        """The subscribers of the route; without ``exchange``, of the channel on any."""
        if exchange is not None:
            return self._subscribers.get((exchange, channel), ())
        found: set[S] = set()
        for on in self._exchanges_of.get(channel, ()):
            found |= self._subscribers[(on, channel)]
        return found

    def exchanges(self) -> set[str]:
        return set(self._channels_per_exchange)

    def channels(self) -> list[str]:
        return list(self._exchanges_of)

    def __len__(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

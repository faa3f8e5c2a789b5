"""Join and leave events of one channel, coalesced per tick. Pure, no I/O.

Every gateway process receives every join and leave of the channels its
subscribers follow (from the shared store's event stream) and renders them once
per tick. Churn must not cost N x N frames: when 10,000 clients join a room in
a second, each of its subscribers gets one ``presence_changed`` frame per tick
(with the counts), not 10,000 ``join`` frames. Rules, per channel per tick:

* a session that joined and left within the same tick (or left and joined
  again) cancels out: nobody is told about a visit nobody could have seen;
* if at most ``max_events`` events remain, each is sent as ``join``/``leave``
  in the order they happened;
* otherwise one ``{"type":"presence_changed","channel":C,"joined":J,"left":L}``
  is sent instead, and a client that shows the member list asks ``presence``
  again (rate-limited like every presence request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import orjson

Kind = Literal["join", "leave"]

# Individual events a subscriber receives per channel per tick before they are
# folded into one presence_changed frame.
MAX_EVENTS_PER_TICK = 20


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    kind: Kind
    user: str
    session: str


@dataclass(slots=True)
class PendingEvents:
    """The events of one channel since the last tick, last event per session."""

    # session -> (first kind seen this tick, latest event): a join then leave of
    # one session is a visit that nets out; a leave then join is a reconnect.
    _by_session: dict[str, tuple[Kind, PresenceEvent]] = field(default_factory=dict)

    def add(self, event: PresenceEvent) -> None:
        first = self._by_session.get(event.session)
        if first is None:
            self._by_session[event.session] = (event.kind, event)
            return
        first_kind = first[0]
        if first_kind != event.kind:
            # join+leave (or leave+join): the session ends the tick as it began.
            del self._by_session[event.session]
        else:  # a repeat of the same kind (another channel id of the session): keep one
            self._by_session[event.session] = (first_kind, event)

    def __len__(self) -> int:
        return len(self._by_session)

    def events(self) -> list[PresenceEvent]:
        return [event for _, event in self._by_session.values()]


def render(
    channel: str, pending: PendingEvents, max_events: int = MAX_EVENTS_PER_TICK
) -> list[bytes]:
    """The frames every presence-event subscriber of ``channel`` gets for this tick."""
    events = pending.events()
    if not events:
        return []
    if len(events) <= max_events:
        return [
            orjson.dumps({"type": e.kind, "channel": channel, "user": e.user, "session": e.session})
            for e in events
        ]
    joined = sum(1 for e in events if e.kind == "join")
    summary = {
        "type": "presence_changed",
        "channel": channel,
        "joined": joined,
        "left": len(events) - joined,
    }
    return [orjson.dumps(summary)]

"""What the node sees of presence, with Redis or without: ``Presence``.

Two implementations: ``service.PresenceService`` (Redis: exact across every
gateway process) and ``local.LocalPresence`` (this process only, when no
``redis_url`` is set). The node calls ``joined``/``left`` as subscribers come
and go, whatever their transport; those never wait and never raise.
``snapshot`` raises ``PresenceUnavailable`` when the answer cannot be exact.
Events come back through the ``deliver`` callback each implementation is given,
once per tick, already coalesced (``coalesce.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.presence.store import MAX_LISTED, Snapshot

Deliver = Callable[[str, str, list[bytes]], None]  # exchange, channel, frames
WantsEvents = Callable[[str, str], bool]  # exchange, channel -> presence_events on?


class Presence(Protocol):
    def joined(self, exchange: str, channel: str, session: str, user: str) -> None: ...

    def left(self, exchange: str, channel: str, session: str) -> None: ...

    async def snapshot(self, exchange: str, channel: str, limit: int = MAX_LISTED) -> Snapshot:
        """Every current subscriber of the channel; raises PresenceUnavailable."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

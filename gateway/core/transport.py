"""What the core sees of a connection, whatever carries it: ``Transport`` and ``Subscriber``.

Every transport (WebSocket JSON, SSE, STOMP) keeps its wire format and its
I/O to itself and hands the core two things:

* a ``Transport``: the connection's send path with its buffer accounting, a
  way to close it with a contract close code, and what it can do;
* a ``Subscriber`` (a ``Session`` for transports that take commands, or the
  transport's own object, like an SSE stream): what the node's hub, a policy
  reload, a ban and the metrics work with.

What the core writes are frames of the JSON protocol (``protocol/frames.py``,
the contract's canonical form): acks, errors, messages, the replay. A
transport whose wire is something else turns them into its own frames on the
way out (SSE into ``event:`` blocks, STOMP into ``RECEIPT``/``ERROR``/``MESSAGE``);
the fan-out encodes each broker message once for everyone, so that a message
costs one serialization however many transports carry it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from gateway.telemetry.events import TRANSPORT_KINDS, TransportKind

if TYPE_CHECKING:
    from gateway.auth.principal import Principal
    from gateway.telemetry.events import EventKind

__all__ = ["TRANSPORT_KINDS", "FanOut", "SendBuffer", "Subscriber", "Transport", "TransportKind"]


class SendBuffer(Protocol):
    """A connection's bounded send path: what the fan-out writes a message frame to."""

    def send(self, frame: bytes) -> bool:
        """Queue one frame; False (and the connection closing with 4409) when over the limit."""
        ...

    def pending(self) -> tuple[int, int]:
        """(bytes, frames) queued but not yet taken by the network."""
        ...


class Transport(SendBuffer, Protocol):
    """One connection as a transport offers it to a ``Session``."""

    @property
    def kind(self) -> TransportKind:
        """Which transport (the metrics' ``transport`` label, the connect event's detail)."""
        ...

    def send_many(self, frames: list[bytes]) -> int:
        """Queue frames in order (one write where the wire allows); returns how many."""
        ...

    def close(self, code: int, reason: str) -> asyncio.Task[None] | None:
        """Start closing with a contract close code; what is queued goes out first.
        Returns the task doing it, if closing takes one (the session waits for
        it with its other tasks)."""
        ...

    async def close_flooded(self, code: int, reason: str) -> None:
        """Close a connection whose reading was stopped (a flood): the close goes
        out now, ahead of the client's unread frames; returns once it is closed."""
        ...

    def stop_reading(self) -> None:
        """Read nothing more from the client (a flood is not even parsed)."""
        ...

    @property
    def open(self) -> bool:
        """False once closing has begun (nothing more is written)."""
        ...


class Subscriber(Protocol):
    """A connection as the node, the hub, reloads, bans and metrics see it."""

    def __hash__(self) -> int: ...  # the hub keeps subscribers in sets

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> TransportKind: ...

    @property
    def principal(self) -> Principal: ...

    @property
    def address(self) -> str | None: ...

    # channel -> exchange of every subscription held (the reload re-checks them).
    @property
    def subscriptions(self) -> dict[str, str]: ...

    # Where the fan-out writes: a WebSocket's Outbox (framed once for all) or any SendBuffer.
    @property
    def outbox(self) -> SendBuffer: ...

    def emit(self, kind: EventKind, **fields: object) -> None:
        """Put a traffic event of this connection on the node's bus."""
        ...

    def close(self, code: int, reason: str) -> None: ...

    def recheck_subscriptions(self) -> int:
        """End what the policies in force no longer allow; returns how many ended."""
        ...

    async def drain(self) -> None:
        """Wait until every publish read so far is answered (shutdown calls it)."""
        ...


# Writes one frame to many buffers; returns how many took it.
FanOut = Callable[[Iterable[SendBuffer], bytes], int]


def send_each(buffers: Iterable[SendBuffer], frame: bytes) -> int:
    """The plain fan-out: ``send`` on each buffer; returns how many took the frame.

    The WebSocket transport brings a faster one (``transports/outbox.fan_out``,
    framing once for every connection), which the gateway gives the node.
    """
    return sum(1 for buffer in buffers if buffer.send(frame))

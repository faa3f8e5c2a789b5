"""The bounded send path of one connection.

Frames are written straight into the connection's transport (no task and no
queue of our own per connection): the transport buffer *is* the queue. What
bounds it is the accounting here: bytes waiting in the transport, and how many
of our frames they hold. A client that stops reading fills it; at the limit
(default 1 MiB or 1,000 frames) the connection is closed with 4409 — the close
frame still goes out, behind what was queued — and nothing more is written, so
a slow consumer costs at most the limit in memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from websockets.asyncio.server import ServerConnection, broadcast

from gateway.protocol.codes import CLOSE_SLOW_CONSUMER
from gateway.transports.ws_adapter import extensions_of, is_open, transport_of


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked, unfragmented WebSocket text frame (RFC 6455 5.2).

    Fan-out writes this same byte string to every subscriber's transport:
    framing once per message instead of once per connection is what
    ``websockets.broadcast`` cannot do (it re-frames for each connection).
    Only for connections without extensions (no permessage-deflate).
    """
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big") + payload
    return b"\x81\x7f" + length.to_bytes(8, "big") + payload


def _wire_length(payload: int) -> int:
    """Bytes a server (unmasked) text frame of this payload takes on the wire."""
    if payload < 126:
        return payload + 2
    if payload < 65536:
        return payload + 4
    return payload + 10


class Outbox:
    # One per connection, 10,000s of them: no instance dict.
    __slots__ = (
        "connection",
        "raw",
        "_transport",
        "_max_bytes",
        "_max_messages",
        "_on_overflow",
        "_written",
        "_ends",
        "overflowed",
        "messages_out",
    )

    def __init__(
        self,
        connection: ServerConnection,
        *,
        max_bytes: int,
        max_messages: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.connection = connection
        # Both fixed by the handshake, and read on every delivery: looked up once.
        # raw: frames may be written pre-framed (no extension to apply).
        self.raw = not extensions_of(connection)
        self._transport = transport_of(connection)
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._on_overflow = on_overflow
        self._written = 0
        # Where each frame still in the transport buffer ends, in bytes written;
        # None while nothing is in flight (an empty deque is 760 bytes, and
        # most connections sit idle with nothing in flight).
        self._ends: deque[int] | None = None
        self.overflowed = False
        # Frames written to this connection, for the operator's list
        # (gateway/operations/connections.py): one += on the delivery path.
        self.messages_out = 0

    def pending(self) -> tuple[int, int]:
        """(bytes, frames) written but not yet taken by the network."""
        buffered = self._transport.get_write_buffer_size()
        ends = self._ends
        if ends is None:
            return buffered, 0
        return buffered, self._in_flight(ends, buffered)

    def _in_flight(self, ends: deque[int], buffered: int) -> int:
        """Frames of ``ends`` not all taken by the network (forgets the others)."""
        flushed = self._written - buffered
        while ends and ends[0] <= flushed:
            ends.popleft()
        if not ends:
            self._ends = None
            return 0
        return len(ends)

    def admit(self, frame_length: int) -> bool:
        """Account for a frame about to be written; False (and close 4409) on overflow.

        After the write, ``_sent`` must follow: it records the frame as in
        flight if the transport could not hand all of it to the socket.
        """
        return self._admit(frame_length, _wire_length(frame_length))

    def _admit(self, frame_length: int, wire_length: int) -> bool:
        # Per subscriber per delivery, so no more calls than needed. py-spy at
        # 1,000 subscribers x 20 msg/s (2026-12-02): the accounting (websockets'
        # state properties, `pending()` twice, a deque made and dropped for
        # every delivery, the wire length per subscriber) was 21.8 % of the
        # gateway's samples, 16.5 % after; most of what is left is the first
        # touch of each connection's objects (`is_open`, 9.8 %), not the code.
        if self.overflowed or not is_open(self.connection):
            return False
        buffered = self._transport.get_write_buffer_size()
        ends = self._ends
        frames = 0 if ends is None else self._in_flight(ends, buffered)
        if buffered + frame_length > self._max_bytes or frames >= self._max_messages:
            self._overflow()
            return False
        self._written += wire_length
        return True

    def _sent(self) -> None:
        """After an admitted write: the frame is in flight unless the socket took it all.

        Usually it did (nothing buffered), and no deque is made: its end only
        matters while some of it waits in the transport.
        """
        if self._transport.get_write_buffer_size() == 0:
            self._ends = None  # everything written so far has gone to the socket
            return
        if self._ends is None:
            self._ends = deque()
        self._ends.append(self._written)

    def send(self, frame: bytes) -> bool:
        """Write one text frame now, or close the connection as a slow consumer."""
        if not self.admit(len(frame)):
            return False
        if self.raw:
            self._transport.write(text_frame(frame))
        else:
            broadcast((self.connection,), frame, text=True)
        self.messages_out += 1
        self._sent()
        return True

    def send_many(self, frames: list[bytes]) -> int:
        """Write text frames in order with one write; returns how many were sent.

        Same limits as ``send``: past the limit the rest is dropped and the
        connection is closed as a slow consumer.
        """
        if not self.raw:
            return sum(1 for frame in frames if self.send(frame))
        wire = []
        for frame in frames:
            if not self.admit(len(frame)):
                break
            # Each frame's end is where it stops counting against the frame
            # limit; recorded as if in flight, then forgotten once flushed.
            if self._ends is None:
                self._ends = deque()
            self._ends.append(self._written)
            wire.append(text_frame(frame))
        if wire:
            self._transport.write(b"".join(wire))
            self.messages_out += len(wire)
            if self._transport.get_write_buffer_size() == 0:
                self._ends = None
        return len(wire)

    def _overflow(self) -> None:
        self.overflowed = True
        if self._on_overflow is not None:
            self._on_overflow()
        asyncio.get_running_loop().create_task(
            self.connection.close(CLOSE_SLOW_CONSUMER, "slow consumer")
        )


class FrameSink(Protocol):
    """A subscriber's send path that is not a WebSocket (an SSE stream's buffer)."""

    def send(self, frame: bytes) -> bool: ...

    def pending(self) -> tuple[int, int]: ...


def fan_out(outboxes: Iterable[Outbox | FrameSink], frame: bytes) -> int:
    """Write one serialized frame to many connections; returns how many took it.

    The frame is framed once and the same bytes are written to every
    WebSocket transport (compressed connections go through one ``broadcast``);
    any other sink is written with its own ``send``.
    """
    wire: bytes | None = None
    compressed: list[Outbox] = []
    taken = 0
    length = len(frame)
    wire_length = _wire_length(length)
    for outbox in outboxes:
        if isinstance(outbox, Outbox):
            if not outbox._admit(length, wire_length):
                continue
            if outbox.raw:
                if wire is None:
                    wire = text_frame(frame)
                outbox._transport.write(wire)
                outbox._sent()
            else:
                compressed.append(outbox)
            outbox.messages_out += 1
            taken += 1
        elif outbox.send(frame):
            taken += 1
    if compressed:
        broadcast([outbox.connection for outbox in compressed], frame, text=True)
        for outbox in compressed:
            outbox._sent()
    return taken

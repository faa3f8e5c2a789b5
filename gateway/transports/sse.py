"""Server-Sent Events, the wire side (spec section 8): event ids, event text, the buffer.

No network here. An event id is the stream's position: a fingerprint of the
stream's channel list (CRC-32 of the names), then the latest seq sent of each
channel in the order of the stream's ``channel`` parameters (null for one with
no position yet), as base64url (unpadded) of compact JSON: for
``?channel=chat.lobby&channel=news.sports``, ``[3573982671,42,null]``.
Clients treat it as opaque; the gateway reads it back from ``Last-Event-ID``
to know where a reconnecting client stopped. The channel names are not in
it: EventSource reconnects to the same URL, which names them, and with names
an id grew past what browsers and aiohttp accept as a header (8 KiB) at ~100
long channel names, while it rode on every event. Ids of the first form, an
object ``{"chat.a":12}``, are still read.

``SseOutbox`` is the bounded send buffer of one stream, with the limits of a
WebSocket's (``limits.send_buffer_bytes`` / ``send_buffer_messages``): frames
wait in it until the stream's writer takes them; past the limit the stream is
ended as a slow consumer and nothing more is queued. It offers the ``Outbox``
interface the fan-out uses (``admit``, ``send``, ``pending``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import orjson

from gateway.protocol.channels import is_valid_channel

# Browsers and aiohttp refuse header lines much longer than this anyway.
MAX_EVENT_ID_CHARS = 8 * 1024
HEARTBEAT = b": heartbeat\n\n"


class EventIds:
    """The event ids of one stream of ``channels`` (in the URL's order).

    The fingerprint is worked out once per stream: ``encode`` runs for every
    event of every stream, on the fan-out's path.
    """

    def __init__(self, channels: Sequence[str]) -> None:
        self.channels = tuple(channels)
        # Which channel list an id was made for: an id reused on a stream of
        # other channels must not put one channel's position on another.
        self._fingerprint = zlib.crc32("\n".join(self.channels).encode())

    def encode(self, positions: Mapping[str, int]) -> str:
        raw = orjson.dumps([self._fingerprint, *(positions.get(c) for c in self.channels)])
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, text: str | None) -> dict[str, int] | None:
        """The positions an event id holds; None when it is absent or not one
        of ours (or of a stream of other channels)."""
        if not text or len(text) > MAX_EVENT_ID_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            value = orjson.loads(raw)
        except (binascii.Error, ValueError):
            return None
        if isinstance(value, list):
            if len(value) != len(self.channels) + 1 or value[0] != self._fingerprint:
                return None
            pairs = [
                (c, seq) for c, seq in zip(self.channels, value[1:], strict=True) if seq is not None
            ]
        elif isinstance(value, dict):  # the first form, channel -> seq
            pairs = list(value.items())
        else:
            return None
        positions: dict[str, int] = {}
        for channel, seq in pairs:
            if not is_valid_channel(channel) or type(seq) is not int or seq < 0:
                return None
            positions[channel] = seq
        return positions


def format_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One event; ``data`` is a single line of JSON (orjson never writes a newline)."""
    head = f"event: {event}\n"
    if event_id is not None:
        head += f"id: {event_id}\n"
    return head.encode() + b"data: " + data + b"\n\n"


class SseOutbox:
    def __init__(
        self,
        *,
        max_bytes: int,
        max_messages: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self.on_overflow = on_overflow
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False
        # Frames taken for this stream (messages and answers, not the
        # keep-alive comments): the operator's per-connection count.
        self.messages_out = 0

    def pending(self) -> tuple[int, int]:
        """(bytes, frames) queued and not yet taken by the writer."""
        return self._bytes, len(self._frames)

    def admit(self, frame_length: int) -> bool:
        """Whether a frame of this length may be queued; False (and overflow) past the limit."""
        if self.overflowed or self.closed:
            return False
        if self._bytes + frame_length > self._max_bytes or len(self._frames) >= self._max_messages:
            self.overflowed = True
            self._ready.set()
            if self.on_overflow is not None:
                self.on_overflow()
            return False
        return True

    def send(self, frame: bytes) -> bool:
        """Queue one frame for the writer; False when the stream takes no more."""
        if not self.admit(len(frame)):
            return False
        self._frames.append(frame)
        self._bytes += len(frame)
        self.messages_out += 1
        self._ready.set()
        return True

    def close(self) -> None:
        """Take no more frames; the writer still gets those queued, then None."""
        self.closed = True
        self._ready.set()

    async def take(self, timeout: float) -> list[bytes] | None:
        """Every queued frame (waiting up to ``timeout`` for one): [] on timeout,
        None once the outbox is closed (and drained) or has overflowed."""
        if not self._frames and not self.closed and not self.overflowed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        if self.overflowed or (self.closed and not self._frames):
            return None
        frames = list(self._frames)
        self._frames.clear()
        self._bytes = 0
        return frames

"""STOMP 1.0/1.1/1.2 frames <-> bytes. No I/O (contract section 10).

``FrameParser`` takes the bytes of WebSocket messages as they come and returns
the frames (and heart-beats) they complete; ``serialize`` builds one frame.
Everything a client can send is bounded: the frame (headers and body), the
number of headers and the length of each header line.

Hand-written rather than taken from a library: the Python STOMP libraries
(stomp.py, aiostomp) are clients, tie their parsers to their own transports and
accept whatever a broker sends, while a gateway facing untrusted clients needs
a strict server-side parser that refuses undefined escapes, NUL in headers and
oversized frames before buffering them.

What the version changes (STOMP 1.2 section "Value Encoding"):

* 1.2 escapes ``\\r`` ``\\n`` ``\\c`` ``\\\\`` in header names and values;
  1.1 the same without ``\\r``; 1.0 escapes nothing (a value cannot hold an
  end of line, and the gateway drops one from what it sends).
* ``CONNECT`` and ``CONNECTED`` are never escaped, whatever the version (the
  version is not agreed yet when they are sent).
* Any undefined escape (``\\t``, a lone trailing ``\\``) is a fatal error.
* Lines may end with ``\\r\\n`` in 1.2; the ``\\r`` is dropped in every
  version here, as STOMP servers commonly do.
* A repeated header: the first one counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Version = str  # "1.0", "1.1" or "1.2"
VERSIONS: tuple[Version, ...] = ("1.0", "1.1", "1.2")

CLIENT_COMMANDS = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
_UNESCAPED = frozenset({"CONNECT", "CONNECTED"})

# Defaults of the limits (the largest frame comes from the gateway's settings).
MAX_HEADERS = 64
# A passcode carries a JWT of up to 8 KiB (larger ones are refused as invalid
# tokens, not as bad frames), so a header line may be a little longer.
MAX_HEADER_LINE_BYTES = 10 * 1024


class StompError(Exception):
    """The bytes are not a STOMP frame the gateway accepts; answered with ERROR, then close."""


class FrameTooLarge(StompError):
    """A frame (or its headers) past a limit: ERROR ``too_large``, then close 1009."""


@dataclass(frozen=True, slots=True)
class Frame:
    command: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first header of that name (STOMP 1.2: repeated headers, the first wins)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class HeartBeat:
    """One or more end-of-lines between frames: the peer is alive."""


HEARTBEAT = HeartBeat()
Event = Frame | HeartBeat


@dataclass(slots=True)
class FrameParser:
    """Incremental parser of one connection's client frames.

    ``feed`` returns what the data completed; a frame may span WebSocket
    messages (stompjs splits large frames when asked to). Raises StompError on
    anything malformed or too large; the caller must then answer ERROR and
    close, and not feed this parser again.
    """

    version: Version = "1.2"
    max_frame_bytes: int = 64 * 1024
    max_headers: int = MAX_HEADERS
    max_header_line_bytes: int = MAX_HEADER_LINE_BYTES
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Event]:
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        while True:
            start = _skip_eols(buffer)
            if start:
                del buffer[:start]
                if not events or events[-1] is not HEARTBEAT:
                    events.append(HEARTBEAT)
            if not buffer:
                return events
            parsed = self._frame(buffer)
            if parsed is None:
                if len(buffer) > self.max_frame_bytes:
                    raise FrameTooLarge(f"frame larger than {self.max_frame_bytes} bytes")
                return events
            frame, end = parsed
            del buffer[:end]
            events.append(frame)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (bounded by ``max_frame_bytes``)."""
        return len(self._buffer)

    def _frame(self, buffer: bytearray) -> tuple[Frame, int] | None:
        """The frame at the start of ``buffer`` and where it ends, or None if incomplete."""
        head_end, body_start = _end_of_headers(buffer, self.max_frame_bytes)
        if head_end < 0:
            if b"\0" in buffer:
                raise StompError("NUL before the end of the headers")
            return None
        head = bytes(buffer[:head_end])
        if b"\0" in head:
            raise StompError("NUL in a header")
        command, headers = self._head(head)
        length_text = _first(headers, "content-length")
        if length_text is not None:
            length = _content_length(length_text)
            end = body_start + length
            if end + 1 > self.max_frame_bytes:
                raise FrameTooLarge(f"frame larger than {self.max_frame_bytes} bytes")
            if len(buffer) < end + 1:
                return None
            if buffer[end] != 0:
                raise StompError("frame body longer than its content-length")
        else:
            end = buffer.find(b"\0", body_start)
            if end < 0:
                return None
        if end + 1 > self.max_frame_bytes:
            raise FrameTooLarge(f"frame larger than {self.max_frame_bytes} bytes")
        return Frame(command, headers, bytes(buffer[body_start:end])), end + 1

    def _head(self, head: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
        lines = head.split(b"\n")
        if len(lines) - 1 > self.max_headers:
            raise FrameTooLarge(f"more than {self.max_headers} headers")
        command = _text(lines[0].rstrip(b"\r"))
        if command not in CLIENT_COMMANDS:
            shown = command[:32].encode("ascii", "backslashreplace").decode()
            raise StompError(f"unknown command {shown!r}")
        escaped = self.version != "1.0" and command not in _UNESCAPED
        headers = []
        for raw in lines[1:]:
            if len(raw) > self.max_header_line_bytes:
                raise FrameTooLarge(
                    f"a header line is longer than {self.max_header_line_bytes} bytes"
                )
            line = _text(raw.rstrip(b"\r"))
            name, colon, value = line.partition(":")
            if not colon:
                raise StompError("a header line without ':'")
            if escaped:
                name, value = unescape(name, self.version), unescape(value, self.version)
            if not name:
                raise StompError("a header with an empty name")
            headers.append((name, value))
        return command, tuple(headers)


def _skip_eols(buffer: bytearray) -> int:
    """How many heart-beat bytes (``\\n`` or ``\\r\\n``) open the buffer."""
    index = 0
    size = len(buffer)
    while index < size:
        byte = buffer[index]
        if byte == 0x0A:
            index += 1
        elif byte == 0x0D and index + 1 < size and buffer[index + 1] == 0x0A:
            index += 2
        else:
            break
    return index


def _end_of_headers(buffer: bytearray, limit: int) -> tuple[int, int]:
    """(end of the header block, start of the body), or (-1, -1) if not there yet.

    The block ends at the first empty line: ``\\n\\n`` or ``\\n\\r\\n``.
    Only the first ``limit`` bytes are searched (anything later is too large).
    """
    index = buffer.find(b"\n", 0, limit)
    while index >= 0:
        after = index + 1
        if buffer[after : after + 1] == b"\n":
            return _strip_cr(buffer, index), after + 1
        if buffer[after : after + 2] == b"\r\n":
            return _strip_cr(buffer, index), after + 2
        index = buffer.find(b"\n", after, limit)
    return -1, -1


def _strip_cr(buffer: bytearray, index: int) -> int:
    return index - 1 if index > 0 and buffer[index - 1] == 0x0D else index


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StompError("a frame's command and headers must be UTF-8") from None


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _content_length(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise StompError("content-length must be a non-negative integer")
    return int(text)


_UNESCAPES = {"r": "\r", "n": "\n", "c": ":", "\\": "\\"}


def unescape(text: str, version: Version) -> str:
    """Undo STOMP's header escaping; StompError on an escape ``version`` does not define."""
    if "\\" not in text:
        return text
    out = []
    chars = iter(text)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escape = next(chars, "")
        if escape == "r" and version != "1.2" or escape not in _UNESCAPES:
            raise StompError(f"undefined escape in a header: \\{escape}")
        out.append(_UNESCAPES[escape])
    return "".join(out)


def escape(text: str, version: Version) -> str:
    """A header name or value as ``version`` writes it.

    1.0 cannot carry an end of line in a header at all: it is replaced by a space.
    """
    if version == "1.0":
        return text.replace("\r", " ").replace("\n", " ")
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace(":", "\\c")
    if version == "1.2":
        return text.replace("\r", "\\r")
    return text.replace("\r", " ")  # 1.1 has no escape for it


def serialize(
    command: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    version: Version = "1.2",
    content_length: bool = True,
) -> bytes:
    """One frame, NUL-terminated. ``content-length`` is added unless told not to
    (a body with a NUL in it needs one)."""
    escaped = command not in _UNESCAPED
    lines = [command]
    for name, value in headers:
        if escaped:
            name, value = escape(name, version), escape(value, version)
        else:  # never escaped, so never allowed to break the frame either
            name, value = escape(name, "1.0"), escape(value, "1.0")
        lines.append(f"{name}:{value}")
    if content_length and (body or command in ("MESSAGE", "ERROR")):
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode() + body + b"\0"

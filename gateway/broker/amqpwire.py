"""AMQP 0-9-1 bytes of one basic.publish, built without objects. No I/O.

A client publish is always the same shape: the same six properties, three
headers of which two are fixed for the whole connection. Building it with
pamqp costs a method object, a properties object and a generic table encoder
per message (a quarter of the gateway's publish time); here the fixed parts
are encoded once (``fixed_headers``) and a publish is a few ``struct.pack``
calls. The output is byte for byte what pamqp would send
(tests/unit/test_amqpwire.py checks it against pamqp's own encoder).
"""

from __future__ import annotations

import struct

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"
BASIC_CLASS = 60
BASIC_PUBLISH = 40
PERSISTENT = 2

# Basic property flags (AMQP 0-9-1, 4.2.6.1), highest bit first.
_CONTENT_TYPE = 0x8000
_HEADERS = 0x2000
_DELIVERY_MODE = 0x1000
_MESSAGE_ID = 0x0080
_TIMESTAMP = 0x0040
_USER_ID = 0x0010

_frame_start = struct.Struct(">BHI")
_publish_start = struct.Struct(">HHH")
_header_start = struct.Struct(">HHQ")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_i64 = struct.Struct(">q")
_u64 = struct.Struct(">Q")


def short_string(value: str) -> bytes:
    """An AMQP shortstr (one length byte); ValueError beyond 255 bytes."""
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


def _long_string_entry(name: str, value: str) -> bytes:
    data = value.encode()
    return short_string(name) + b"S" + _u32.pack(len(data)) + data


def fixed_headers(headers: dict[str, str]) -> bytes:
    """Encoded table entries of string headers, to prefix ``int_header`` entries.

    Entries must be in the order pamqp writes them (sorted by name), so the
    caller's names must sort before every ``int_header`` name that follows.
    """
    return b"".join(_long_string_entry(name, headers[name]) for name in sorted(headers))


def int_header(name: str, value: int) -> bytes:
    """One table entry holding a signed 64-bit integer (pamqp's ``l``)."""
    return short_string(name) + b"l" + _i64.pack(value)


def properties(
    *,
    content_type: bytes,
    table: bytes,
    message_id: bytes,
    timestamp_s: int,
    user_id: bytes | None,
) -> bytes:
    """Property flags and values of a persistent message.

    ``content_type``, ``message_id`` and ``user_id`` are already shortstrs
    (``short_string``); ``table`` is the encoded entries of the headers table.
    """
    flags = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP
    if user_id is not None:
        flags |= _USER_ID
    parts = [
        _u16.pack(flags),
        content_type,
        _u32.pack(len(table)),
        table,
        b"\x02",  # delivery mode: persistent
        message_id,
        _u64.pack(timestamp_s),
    ]
    if user_id is not None:
        parts.append(user_id)
    return b"".join(parts)


def headers_only(table: bytes) -> bytes:
    """Properties of a transient message that carries nothing but headers."""
    return _u16.pack(_HEADERS) + _u32.pack(len(table)) + table


def string_header(name: str, value: str) -> bytes:
    """One table entry holding a long string (pamqp's ``S``)."""
    return _long_string_entry(name, value)


def publish(
    channel: int,
    exchange: bytes,
    routing_key: bytes,
    props: bytes,
    body: bytes,
    max_body_frame: int,
) -> bytes:
    """The method, header and body frames of one basic.publish (not mandatory).

    ``exchange`` and ``routing_key`` are shortstrs; ``props`` comes from
    ``properties``; bodies longer than ``max_body_frame`` bytes are split
    across body frames as the connection's frame_max requires.
    """
    method = _publish_start.pack(BASIC_CLASS, BASIC_PUBLISH, 0) + exchange + routing_key + b"\x00"
    header = _header_start.pack(BASIC_CLASS, 0, len(body)) + props
    parts = [
        _frame_start.pack(FRAME_METHOD, channel, len(method)),
        method,
        FRAME_END,
        _frame_start.pack(FRAME_HEADER, channel, len(header)),
        header,
        FRAME_END,
    ]
    for start in range(0, len(body), max_body_frame):
        chunk = body[start : start + max_body_frame]
        parts += (_frame_start.pack(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END)
    return b"".join(parts)

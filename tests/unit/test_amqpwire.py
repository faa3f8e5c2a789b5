"""The hand-built publish frames are exactly what pamqp (aio-pika's encoder) sends."""

from __future__ import annotations

from datetime import UTC, datetime

import pamqp.frame
import pytest
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from gateway.broker import amqpwire
from gateway.broker.envelope import (
    CONTENT_TYPE,
    SESSION_HEADER,
    SUB_HEADER,
    TS_HEADER,
    ClientStamp,
)

NOW_MS = 1_764_300_000_123


def pamqp_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: commands.Basic.Properties,
    body: bytes,
    max_body: int,
) -> bytes:
    frames = [
        pamqp.frame.marshal(
            commands.Basic.Publish(exchange=exchange, routing_key=routing_key), channel
        ),
        pamqp.frame.marshal(ContentHeader(0, len(body), properties), channel),
    ]
    for start in range(0, len(body), max_body):
        frames.append(pamqp.frame.marshal(ContentBody(body[start : start + max_body]), channel))
    return b"".join(frames)


def client_properties(sub: str, session: str, user: str | None) -> commands.Basic.Properties:
    return commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        headers={SUB_HEADER: sub, SESSION_HEADER: session, TS_HEADER: NOW_MS},
        delivery_mode=2,
        message_id="0" * 32,  # replaced below: ours is random
        timestamp=datetime.fromtimestamp(NOW_MS // 1000, UTC),
        user_id=user,
    )


@pytest.mark.parametrize(
    ("sub", "user", "body", "max_body"),
    [
        ("alice", "guest", b'{"text":"hi"}', 131_064),
        ("bob@example.com", "rabbitgate", b"x" * 300, 100),  # split into body frames
        ("zoë ünïcode", "guest", b'"exactly"', 9),  # body as long as one frame
        ("s" * 5000, None, b"[]", 131_064),  # long sub; no user_id
        ("carol", "guest", b"", 131_064),  # empty body: no body frame
    ],
)
def test_client_publish_matches_pamqp(
    sub: str, user: str | None, body: bytes, max_body: int
) -> None:
    stamp = ClientStamp(sub, "session-1", user)
    props = stamp.properties(NOW_MS)
    ours = amqpwire.publish(
        7,
        amqpwire.short_string("ex.chat"),
        amqpwire.short_string("chat.lobby"),
        props,
        body,
        max_body,
    )
    # Decode ours with pamqp: frame by frame, the same values.
    offset, decoded = 0, []
    while offset < len(ours):
        used, channel, frame = pamqp.frame.unmarshal(ours[offset:])
        assert channel == 7
        decoded.append(frame)
        offset += used
    publish, header, *bodies = decoded
    assert isinstance(publish, commands.Basic.Publish)
    assert (publish.exchange, publish.routing_key, publish.mandatory) == (
        "ex.chat",
        "chat.lobby",
        False,
    )
    assert isinstance(header, ContentHeader)
    assert header.body_size == len(body)
    message_id = header.properties.message_id
    assert isinstance(message_id, str) and len(message_id) == 32
    int(message_id, 16)
    assert b"".join(b.value for b in bodies) == body
    # And byte for byte what pamqp itself builds from the same properties.
    expected = client_properties(sub, "session-1", user)
    expected.message_id = message_id
    assert ours == pamqp_publish(7, "ex.chat", "chat.lobby", expected, body, max_body)
    decoded_props = header.properties
    assert decoded_props.headers == {
        SUB_HEADER: sub,
        SESSION_HEADER: "session-1",
        TS_HEADER: NOW_MS,
    }
    assert decoded_props.delivery_mode == 2
    assert decoded_props.user_id == user


def test_message_ids_differ() -> None:
    stamp = ClientStamp("alice", "s", "guest")
    assert stamp.properties(NOW_MS) != stamp.properties(NOW_MS)


def test_headers_only_matches_pamqp() -> None:
    props = amqpwire.headers_only(amqpwire.string_header("x-marker", "abc"))
    ours = amqpwire.publish(
        1, amqpwire.short_string(""), amqpwire.short_string("stream.q"), props, b"", 1000
    )
    expected = commands.Basic.Properties(headers={"x-marker": "abc"})
    assert ours == pamqp_publish(1, "", "stream.q", expected, b"", 1000)


def test_short_string_limit() -> None:
    assert amqpwire.short_string("é" * 127) == bytes((254,)) + "é".encode() * 127
    with pytest.raises(ValueError):
        amqpwire.short_string("x" * 256)

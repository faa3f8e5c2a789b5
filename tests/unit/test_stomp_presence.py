"""Presence events on STOMP (docs/presence.md "STOMP"): what the bridge makes of the
gateway's join/leave/presence_changed frames. No I/O."""

from __future__ import annotations

import orjson

from gateway.transports.stomp.bridge import StompBridge
from gateway.transports.stomp.frames import Frame, FrameParser


def stomp(data: bytes) -> tuple[str, dict[str, str], bytes]:
    command, rest = data.split(b"\n", 1)
    (frame,) = FrameParser().feed(b"SEND\n" + rest)
    return command.decode(), dict(frame.headers), frame.body


def subscribed(*ids: tuple[str, str]) -> StompBridge:
    b = StompBridge("1.2", lambda channel: "chat", 100)
    for sub_id, destination in ids:
        b.request(Frame("SUBSCRIBE", (("id", sub_id), ("destination", destination)), b""))
    return b


def test_a_join_is_one_message_per_subscription_of_its_channel_with_x_event() -> None:
    b = subscribed(("sub-0", "/topic/chat.a"), ("sub-1", "/topic/chat.a"), ("x", "/topic/chat.b"))
    join = orjson.dumps({"type": "join", "channel": "chat.a", "user": "u\nx:y", "session": "s"})
    frames, close = b.answer(join)
    assert close is None
    read = [stomp(x) for x in frames]
    assert [(c, h["subscription"], h["x-event"]) for c, h, _ in read] == [
        ("MESSAGE", "sub-0", "join"),
        ("MESSAGE", "sub-1", "join"),
    ]
    assert all(
        body == join and "x-seq" not in h for _, h, body in read
    )  # a hostile name stays in the body


def test_leave_and_presence_changed_and_other_channels() -> None:
    b = subscribed(("sub-0", "/topic/chat.a"))
    leave = orjson.dumps({"type": "leave", "channel": "chat.a", "user": "u", "session": "s"})
    changed = orjson.dumps(
        {"type": "presence_changed", "channel": "chat.a", "joined": 30, "left": 0}
    )
    elsewhere = orjson.dumps({"type": "join", "channel": "chat.z", "user": "u", "session": "s"})
    kinds = [stomp(x)[1]["x-event"] for frame in (leave, changed) for x in b.answer(frame)[0]]
    assert kinds == ["leave", "presence_changed"]
    assert b.answer(elsewhere) == ([], None)

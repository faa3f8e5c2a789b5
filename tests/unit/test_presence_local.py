"""The presence request's frames and the process-local presence (no Redis). Pure."""

from __future__ import annotations

import orjson
import pytest

from gateway.presence.local import LocalPresence
from gateway.protocol.frames import FrameError, Presence, parse_frame, presence_frame


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"presence","id":1,"channel":"chat.a"}', Presence(1, "chat.a")),
        ('{"type":"presence","id":"x","channel":"a.b-c_d"}', Presence("x", "a.b-c_d")),
    ],
)
def test_presence_requests_parse(text: str, expected: Presence) -> None:
    assert parse_frame(text) == expected


@pytest.mark.parametrize(
    ("text", "request_id"),
    [
        ('{"type":"presence","channel":"chat.a"}', None),  # no id
        ('{"type":"presence","id":2}', 2),  # no channel
        ('{"type":"presence","id":3,"channel":"chat.*"}', 3),  # wildcard
        ('{"type":"presence","id":4,"channel":""}', 4),
        ('{"type":"presence","id":5,"channel":7}', 5),
        ('{"type":"presence","id":true,"channel":"chat.a"}', None),
    ],
)
def test_bad_presence_requests_are_bad_request(text: str, request_id: object) -> None:
    with pytest.raises(FrameError) as caught:
        parse_frame(text)
    assert caught.value.code == "bad_request"
    assert caught.value.request_id == request_id


def test_presence_answer_frame() -> None:
    frame = orjson.loads(presence_frame(9, "chat.a", 3, [("alice", "s1")]))
    assert frame == {
        "type": "presence",
        "id": 9,
        "channel": "chat.a",
        "count": 3,
        "clients": [{"user": "alice", "session": "s1"}],
    }


async def test_local_presence_counts_lists_and_coalesces() -> None:
    delivered: list[tuple[str, str, list[dict[str, object]]]] = []
    local = LocalPresence(
        lambda x, c, frames: delivered.append((x, c, [orjson.loads(f) for f in frames])),
        lambda x, c: c.startswith("room."),
    )
    local.joined("ex", "room.a", "s1", "alice")
    local.joined("ex", "room.a", "s1", "alice")  # twice: once
    local.joined("ex", "room.a", "s2", "bob")
    local.joined("other", "room.a", "s3", "carol")  # another exchange, another room
    local.joined("ex", "quiet.a", "s4", "dave")  # no events wanted
    snapshot = await local.snapshot("ex", "room.a", limit=1)
    assert snapshot.count == 2 and [m.user for m in snapshot.members] == ["alice"]
    local.flush()
    assert [(x, c, [f["user"] for f in fs]) for x, c, fs in delivered] == [
        ("ex", "room.a", ["alice", "bob"]),
        ("other", "room.a", ["carol"]),
    ]
    delivered.clear()
    local.left("ex", "room.a", "s1")
    local.left("ex", "room.a", "s1")  # twice: once
    local.joined("ex", "room.a", "s9", "eve")
    local.left("ex", "room.a", "s9")  # a visit within one tick nets out
    local.flush()
    assert delivered == [
        ("ex", "room.a", [{"type": "leave", "channel": "room.a", "user": "alice", "session": "s1"}])
    ]
    for i in range(50):
        local.joined("ex", "room.a", f"n{i}", f"u{i}")
    delivered.clear()
    local.flush()
    assert delivered == [
        (
            "ex",
            "room.a",
            [{"type": "presence_changed", "channel": "room.a", "joined": 50, "left": 0}],
        )
    ]
    assert (await local.snapshot("ex", "room.a")).count == 51

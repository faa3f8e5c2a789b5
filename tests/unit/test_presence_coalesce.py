"""Join/leave coalescing per tick (gateway/presence/coalesce.py): a table, no I/O."""

from __future__ import annotations

import orjson
import pytest

from gateway.presence.coalesce import PendingEvents, PresenceEvent, render


def ev(kind: str, session: str, user: str = "u") -> PresenceEvent:
    return PresenceEvent(kind, user, session)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], []),
        ([ev("join", "s1", "alice")], [("join", "s1")]),
        ([ev("join", "s1"), ev("leave", "s1")], []),  # a visit inside one tick nets out
        ([ev("leave", "s1"), ev("join", "s1")], []),  # a reconnect inside one tick too
        ([ev("join", "s1"), ev("leave", "s1"), ev("join", "s1")], [("join", "s1")]),
        ([ev("join", "s1"), ev("join", "s1")], [("join", "s1")]),  # repeats count once
        ([ev("join", "s1"), ev("leave", "s2")], [("join", "s1"), ("leave", "s2")]),
    ],
)
def test_events_in_one_tick(events: list[PresenceEvent], expected: list[tuple[str, str]]) -> None:
    pending = PendingEvents()
    for e in events:
        pending.add(e)
    frames = [orjson.loads(f) for f in render("room.a", pending)]
    assert [(f["type"], f["session"]) for f in frames] == expected
    assert all(f["channel"] == "room.a" for f in frames)


def test_a_frame_names_the_user_and_session() -> None:
    pending = PendingEvents()
    pending.add(ev("join", "s9", "<b>mallory</b>"))
    (frame,) = render("room.a", pending)
    assert orjson.loads(frame) == {
        "type": "join",
        "channel": "room.a",
        "user": "<b>mallory</b>",
        "session": "s9",
    }


def test_churn_past_the_bound_is_one_summary_frame() -> None:
    pending = PendingEvents()
    for i in range(10_000):
        pending.add(ev("join", f"s{i}"))
    for i in range(100):
        pending.add(ev("leave", f"old{i}"))
    frames = render("room.a", pending, max_events=20)
    assert [orjson.loads(f) for f in frames] == [
        {"type": "presence_changed", "channel": "room.a", "joined": 10_000, "left": 100}
    ]


def test_exactly_the_bound_is_still_sent_one_by_one() -> None:
    pending = PendingEvents()
    for i in range(20):
        pending.add(ev("join", f"s{i}"))
    assert len(render("room.a", pending, max_events=20)) == 20
    pending.add(ev("join", "s20"))
    assert len(render("room.a", pending, max_events=20)) == 1

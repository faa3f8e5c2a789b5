"""Presence on STOMP (docs/presence.md "STOMP"): what the bridge makes of the
gateway's join/leave/presence_changed frames, and the presence request
(``SUBSCRIBE`` to ``/presence/<channel>``) from frame to answer. No I/O."""

from __future__ import annotations

import orjson
import pytest

from gateway.protocol.frames import Presence, error_frame, presence_frame
from gateway.transports.stomp.bridge import StompBridge
from gateway.transports.stomp.frames import Frame, FrameParser
from gateway.transports.stomp.mapping import PresenceQuery, Refused, parse_request


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


# --- the presence request: SUBSCRIBE to /presence/<channel> ---------------------


def f(command: str, **headers: str) -> Frame:
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()), b"")


def asked(b: StompBridge, sub_id: str, channel: str, **headers: str) -> Presence:
    step = b.request(f("SUBSCRIBE", id=sub_id, destination=f"/presence/{channel}", **headers))
    assert step.close is None and not step.frames, step
    (request,) = step.requests
    assert isinstance(request, Presence) and request.channel == channel
    return request


def test_subscribe_to_presence_parses_as_a_presence_query() -> None:
    frame = f("SUBSCRIBE", id="p-1", destination="/presence/chat.lobby", receipt="r")
    query = parse_request(frame, lambda channel: "chat")
    assert query == PresenceQuery("p-1", "chat.lobby", "r")
    assert query.destination == "/presence/chat.lobby"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"destination": "/presence/"}, "a channel"),
        ({"destination": "/presence/chat.*"}, "a channel"),
        ({"destination": "/presence/chat/lobby"}, "a channel"),
        ({"destination": "/presence/chat.a", "x_since": "3"}, "x-since"),
        ({"destination": "/presence/chat.a", "ack": "client"}, "ack:client"),
    ],
)
def test_a_bad_presence_query_is_a_bad_request(headers: dict[str, str], why: str) -> None:
    with pytest.raises(Refused) as refused:
        parse_request(f("SUBSCRIBE", id="p", receipt="r", **headers), lambda channel: "chat")
    assert refused.value.code == "bad_request" and why in refused.value.message
    assert refused.value.receipt == "r"


def test_send_to_presence_is_a_bad_request_that_points_at_subscribe() -> None:
    with pytest.raises(Refused) as refused:
        parse_request(f("SEND", destination="/presence/chat.a"), lambda channel: "chat")
    assert refused.value.code == "bad_request" and "SUBSCRIBE" in refused.value.message


def test_the_answer_is_one_message_on_the_subscription_then_the_receipt() -> None:
    b = StompBridge("1.2", lambda channel: "chat", 100)
    request = asked(b, "p-1", "chat.lobby", receipt="r1")
    answer = presence_frame(request.id, "chat.lobby", 2, [("alice", "s1"), ("bob\nx:y", "s2")])
    frames, close = b.answer(answer)
    assert close is None
    (message, receipt) = [stomp(x) for x in frames]
    command, headers, body = message
    assert command == "MESSAGE"
    assert headers["subscription"] == "p-1"
    assert headers["destination"] == "/presence/chat.lobby"
    assert headers["x-event"] == "presence"
    assert headers["content-type"] == "application/json"
    assert "x-seq" not in headers and headers["message-id"].startswith("chat.lobby@presence-")
    assert orjson.loads(body) == {
        "type": "presence",
        "channel": "chat.lobby",
        "count": 2,
        "clients": [{"user": "alice", "session": "s1"}, {"user": "bob\nx:y", "session": "s2"}],
    }
    assert receipt == ("RECEIPT", {"receipt-id": "r1"}, b"")
    # The id is free again: a second request may use it, and is a new request.
    again = asked(b, "p-1", "chat.lobby")
    assert again.id != request.id
    assert not b.subscriptions  # a presence request is no subscription


def test_a_presence_query_does_not_count_against_max_subscriptions() -> None:
    b = StompBridge("1.2", lambda channel: "chat", 1)
    b.request(f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    asked(b, "p", "chat.a")


def test_an_id_in_use_is_refused_either_way() -> None:
    b = StompBridge("1.2", lambda channel: "chat", 100)
    b.request(f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    step = b.request(f("SUBSCRIBE", id="s", destination="/presence/chat.a"))
    assert step.close == 1002 and stomp(step.frames[0])[1]["message"] == "bad_request"
    b = StompBridge("1.2", lambda channel: "chat", 100)
    asked(b, "p", "chat.a")
    step = b.request(f("SUBSCRIBE", id="p", destination="/topic/chat.a"))
    assert step.close == 1002 and "in use" in stomp(step.frames[0])[2].decode()


def test_unsubscribe_before_the_answer_drops_it_but_not_its_receipt() -> None:
    b = StompBridge("1.2", lambda channel: "chat", 100)
    request = asked(b, "p", "chat.a", receipt="r")
    step = b.request(f("UNSUBSCRIBE", id="p"))
    assert not step.requests and not step.frames  # an id the core never heard of
    frames, _ = b.answer(presence_frame(request.id, "chat.a", 0, []))
    assert [stomp(x)[0] for x in frames] == ["RECEIPT"]
    # A later request on the same id is not answered by an old answer.
    newer = asked(b, "p", "chat.a")
    assert b.answer(presence_frame(request.id, "chat.a", 0, [])) == ([], None)
    assert [stomp(x)[0] for x in b.answer(presence_frame(newer.id, "chat.a", 1, []))[0]] == [
        "MESSAGE"
    ]


@pytest.mark.parametrize(
    ("code", "close"), [("forbidden", 1008), ("unavailable", 1013), ("rate_limited", 1008)]
)
def test_a_refused_presence_query_is_an_error_with_its_receipt(code: str, close: int) -> None:
    b = StompBridge("1.2", lambda channel: "chat", 100)
    request = asked(b, "p", "chat.a", receipt="r")
    retry = 0.5 if code == "rate_limited" else None
    frames, closing = b.answer(error_frame(code, "why", request.id, retry_after=retry))
    (error,) = [stomp(x) for x in frames]
    assert error[0] == "ERROR" and error[1]["message"] == code
    assert error[1]["receipt-id"] == "r" and "destination" not in error[1]
    assert (error[1].get("retry-after") is not None) == (code == "rate_limited")
    assert closing == close
    assert b.answer(presence_frame(request.id, "chat.a", 0, [])) == ([], None)  # closed

"""One STOMP conversation over the gateway's JSON requests and answers (no I/O):
what each client frame asks of the session, and what each answer becomes."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.protocol.frames import ack_frame, error_frame, message_frame
from gateway.transports.stomp.bridge import StompBridge
from gateway.transports.stomp.frames import Frame, FrameParser


def bridge(max_subscriptions: int = 100) -> StompBridge:
    return StompBridge("1.2", lambda channel: "chat", max_subscriptions)


def f(command: str, body: bytes = b"", **headers: str) -> Frame:
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()), body)


def stomp(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """A server frame read back: (command, headers, body)."""
    command, rest = data.split(b"\n", 1)
    (frame,) = FrameParser().feed(b"SEND\n" + rest)
    return command.decode(), dict(frame.headers), frame.body


def requests(b: StompBridge, frame: Frame) -> list[dict[str, Any]]:
    step = b.request(frame)
    assert step.close is None and not step.frames, step
    return [orjson.loads(r) for r in step.requests]


def test_subscribe_becomes_a_subscribe_and_its_ack_a_receipt() -> None:
    b = bridge()
    (request,) = requests(b, f("SUBSCRIBE", id="sub-0", destination="/topic/chat.a", receipt="r1"))
    assert request == {"type": "subscribe", "id": request["id"], "channel": "chat.a"}
    frames, close = b.answer(ack_frame(request["id"], seq=5))
    assert close is None
    assert [stomp(x) for x in frames] == [("RECEIPT", {"receipt-id": "r1", "x-seq": "5"}, b"")]


def test_without_receipt_an_ack_sends_nothing() -> None:
    b = bridge()
    (request,) = requests(b, f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    assert b.answer(ack_frame(request["id"], seq=None)) == ([], None)


def test_x_since_goes_on_the_receipt_when_one_was_asked() -> None:
    b = bridge()
    (request,) = requests(
        b, f("SUBSCRIBE", id="s", destination="/topic/chat.a", x_since="3", receipt="r")
    )
    assert request["since"] == 3
    frames, _ = b.answer(ack_frame(request["id"], seq=9, recovered=True))
    assert [stomp(x) for x in frames] == [
        ("RECEIPT", {"receipt-id": "r", "x-seq": "9", "x-recovered": "true"}, b"")
    ]


def test_x_since_goes_on_the_first_message_otherwise() -> None:
    b = bridge()
    (request,) = requests(b, f("SUBSCRIBE", id="s", destination="/topic/chat.a", x_since="3"))
    assert b.answer(ack_frame(request["id"], seq=9, recovered=False)) == ([], None)
    first, _ = b.answer(message_frame("chat.a", 4, {"n": 1}, "bob", 1000))
    second, _ = b.answer(message_frame("chat.a", 5, {"n": 2}, "bob", 1001))
    assert stomp(first[0])[1]["x-recovered"] == "false"
    assert "x-recovered" not in stomp(second[0])[1]


def test_a_message_goes_to_every_subscription_of_its_channel() -> None:
    b = bridge()
    (request,) = requests(b, f("SUBSCRIBE", id="one", destination="/topic/chat.a"))
    b.answer(ack_frame(request["id"]))
    # The second id on the same channel needs nothing of the session.
    step = b.request(f("SUBSCRIBE", id="two", destination="/exchange/chat/chat.a", receipt="r"))
    assert not step.requests and [stomp(x)[0] for x in step.frames] == ["RECEIPT"]
    frames, _ = b.answer(message_frame("chat.a", 1, "hi", None, 5))
    got = [stomp(x) for x in frames]
    assert [(h["subscription"], h["destination"]) for _, h, _ in got] == [
        ("one", "/topic/chat.a"),
        ("two", "/exchange/chat/chat.a"),
    ]
    assert all(body == b'"hi"' and "x-from" not in h for _, h, body in got)
    assert b.answer(message_frame("chat.b", 1, "hi", None, 5)) == ([], None)


def test_unsubscribe_leaves_the_channel_with_its_last_id() -> None:
    b = bridge()
    requests(b, f("SUBSCRIBE", id="one", destination="/topic/chat.a"))
    b.request(f("SUBSCRIBE", id="two", destination="/topic/chat.a"))
    step = b.request(f("UNSUBSCRIBE", id="one", receipt="r1"))
    assert not step.requests and [stomp(x)[1] for x in step.frames] == [{"receipt-id": "r1"}]
    (request,) = requests(b, f("UNSUBSCRIBE", id="two", receipt="r2"))
    assert request == {"type": "unsubscribe", "id": request["id"], "channel": "chat.a"}
    assert [stomp(x)[1] for x in b.answer(ack_frame(request["id"]))[0]] == [{"receipt-id": "r2"}]
    assert b.answer(message_frame("chat.a", 1, "late", None, 5)) == ([], None)
    # An unknown id is simply done.
    assert [stomp(x)[0] for x in b.request(f("UNSUBSCRIBE", id="x", receipt="r3")).frames] == [
        "RECEIPT"
    ]


def test_send_becomes_a_publish_with_the_body_as_data() -> None:
    b = bridge()
    body = b'{"a": [1, 2]}'
    (request,) = requests(
        b, f("SEND", body, destination="/topic/chat.a", content_type="application/json")
    )
    assert request == {"type": "publish", "channel": "chat.a", "data": {"a": [1, 2]}}
    (request,) = requests(b, f("SEND", b"plain", destination="/topic/chat.a", receipt="r"))
    assert request == {"type": "publish", "id": request["id"], "channel": "chat.a", "data": "plain"}
    assert [stomp(x)[1] for x in b.answer(ack_frame(request["id"]))[0]] == [{"receipt-id": "r"}]


def test_a_refused_send_is_an_error_with_its_receipt_then_close() -> None:
    b = bridge()
    (request,) = requests(b, f("SEND", b"x", destination="/topic/chat.a", receipt="r"))
    frames, close = b.answer(error_frame("forbidden", "not allowed to publish", request["id"]))
    command, headers, body = stomp(frames[0])
    assert command == "ERROR" and close == 1008
    assert headers["message"] == "forbidden" and headers["receipt-id"] == "r"
    assert body == b"not allowed to publish"
    assert b.closed and b.answer(message_frame("chat.a", 1, "x", None, 1)) == ([], None)


def test_rate_limited_carries_retry_after() -> None:
    b = bridge()
    frames, close = b.answer(error_frame("rate_limited", "slow down", None, retry_after=1.5))
    assert close == 1008 and stomp(frames[0])[1]["retry-after"] == "1.5"


def test_a_refused_subscribe_forgets_its_id() -> None:
    b = bridge()
    (request,) = requests(b, f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    frames, close = b.answer(error_frame("forbidden", "no", request["id"]))
    assert stomp(frames[0])[1]["message"] == "forbidden" and close == 1008
    assert b.subscriptions == {} and b.by_channel == {}


def test_a_subscription_ended_by_the_policies_names_its_destination() -> None:
    b = bridge()
    (request,) = requests(b, f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    b.answer(ack_frame(request["id"]))
    frames, close = b.answer(error_frame("forbidden", "ended", channel="chat.a"))
    assert stomp(frames[0])[1]["destination"] == "/topic/chat.a" and close == 1008


def test_expected_errors_of_the_conversation() -> None:
    b = bridge(max_subscriptions=1)
    requests(b, f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    cases = [
        (f("SUBSCRIBE", id="s", destination="/topic/chat.b"), "bad_request", "in use"),
        (f("SUBSCRIBE", id="t", destination="/topic/chat.b"), "forbidden", "at most 1"),
        (f("ACK", id="m", receipt="r"), "bad_request", "not supported"),
        (f("SEND", destination="/queue/q"), "bad_request", "not supported"),
        (f("HELLO"), "bad_request", "already connected"),
    ]
    for frame, code, why in cases:
        b.closed = False
        step = b.request(frame)
        (error,) = step.frames
        _, headers, body = stomp(error)
        assert headers["message"] == code and why in body.decode(), (frame, body)
        assert step.close == (1008 if code == "forbidden" else 1002)
        assert b.closed


def test_x_since_on_a_channel_already_subscribed_is_refused() -> None:
    b = bridge()
    requests(b, f("SUBSCRIBE", id="s", destination="/topic/chat.a"))
    step = b.request(f("SUBSCRIBE", id="t", destination="/topic/chat.a", x_since="1"))
    assert stomp(step.frames[0])[1]["message"] == "bad_request"


def test_disconnect() -> None:
    step = bridge().request(f("DISCONNECT", receipt="bye"))
    assert step.disconnect is not None and step.disconnect.receipt == "bye"
    assert not step.requests and not step.frames


def test_pong_and_welcome_say_nothing() -> None:
    b = bridge()
    assert b.answer(b'{"type":"pong","id":0}') == ([], None)

"""STOMP frames <-> the gateway's requests and answers, as tables (no I/O)."""

from __future__ import annotations

import orjson
import pytest

from gateway.transports.stomp.frames import Frame, FrameParser
from gateway.transports.stomp.mapping import (
    SERVER,
    Connect,
    Destination,
    Disconnect,
    Refused,
    Send,
    Subscribe,
    Unsubscribe,
    connected_frame,
    error_frame,
    message_frame,
    message_tail,
    negotiate_heartbeat,
    negotiate_version,
    parse_connect,
    parse_heart_beat,
    parse_request,
    receipt_frame,
    select_subprotocol,
)

SUBPROTOCOLS = [
    (["v12.stomp", "v11.stomp", "v10.stomp"], "v12.stomp"),
    (["v10.stomp", "v12.stomp"], "v12.stomp"),
    (["v10.stomp", "v11.stomp"], "v11.stomp"),
    (["v10.stomp"], "v10.stomp"),
    (["stomp"], None),
    ([], None),
]


@pytest.mark.parametrize(("offered", "selected"), SUBPROTOCOLS)
def test_select_subprotocol(offered: list[str], selected: str | None) -> None:
    assert select_subprotocol(offered) == selected


VERSIONS = [
    ("1.2,1.1,1.0", "1.2", "1.2"),
    ("1.0,1.1,1.2", "1.2", "1.2"),
    ("1.1,1.0", "1.2", "1.1"),
    ("1.2,1.1,1.0", "1.1", "1.1"),  # the subprotocol caps it
    ("1.2", "1.0", None),
    (None, "1.2", "1.0"),  # no accept-version: a 1.0 client
    ("2.0", "1.2", None),
    (" 1.2 , 1.1", "1.2", "1.2"),
]


@pytest.mark.parametrize(("accept", "highest", "version"), VERSIONS)
def test_negotiate_version(accept: str | None, highest: str, version: str | None) -> None:
    if version is None:
        with pytest.raises(Refused, match="no common STOMP version"):
            negotiate_version(accept, highest)
    else:
        assert negotiate_version(accept, highest) == version


HEARTBEATS = [
    # client (cx, cy), server (sx, sy) -> (server sends every, server expects every)
    ((0, 0), (20000, 20000), (0, 0)),
    ((10000, 10000), (20000, 20000), (20000, 20000)),
    ((30000, 5000), (20000, 20000), (20000, 30000)),
    ((10000, 10000), (0, 0), (0, 0)),
    ((10000, 0), (20000, 20000), (0, 20000)),
    ((0, 10000), (20000, 20000), (20000, 0)),
]


@pytest.mark.parametrize(("client", "server", "agreed"), HEARTBEATS)
def test_negotiate_heartbeat(
    client: tuple[int, int], server: tuple[int, int], agreed: tuple[int, int]
) -> None:
    assert negotiate_heartbeat(client, server) == agreed


@pytest.mark.parametrize("text", ["1", "a,b", "1,2,3", "-1,0", "1.5,2", "9999999999,0"])
def test_bad_heart_beat(text: str) -> None:
    with pytest.raises(Refused, match="heart-beat"):
        parse_heart_beat(text)


def test_parse_connect() -> None:
    frame = Frame(
        "CONNECT",
        (
            ("accept-version", "1.2,1.1"),
            ("login", "ignored"),
            ("passcode", "jwt"),
            ("heart-beat", "10000,10000"),
        ),
    )
    assert parse_connect(frame, "1.2") == Connect("1.2", "jwt", (10000, 10000))
    stomp = Frame("STOMP", (("accept-version", "1.2"), ("passcode", "")))
    assert parse_connect(stomp, "1.2") == Connect("1.2", None, (0, 0))


@pytest.mark.parametrize("command", ["SEND", "SUBSCRIBE", "DISCONNECT", "ACK"])
def test_anything_before_connect_is_unauthorized(command: str) -> None:
    with pytest.raises(Refused) as refused:
        parse_connect(Frame(command, (("receipt", "r"),)), "1.2")
    assert refused.value.code == "unauthorized" and refused.value.receipt == "r"


def exchange_of(channel: str) -> str | None:
    """The policies of these tests: chat.* on exchange chat, news.* on news."""
    return {"chat": "chat", "news": "news"}.get(channel.split(".", 1)[0])


def f(command: str, body: bytes = b"", **headers: str) -> Frame:
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()), body)


TOPIC_A = Destination("/topic/chat.a", "chat.a", None)
REQUESTS = [
    (f("SUBSCRIBE", id="s", destination="/topic/chat.a"), Subscribe("s", TOPIC_A, None, None)),
    (
        f("SUBSCRIBE", id="s", destination="/topic/chat.a", ack="auto", x_since="42", receipt="r"),
        Subscribe("s", TOPIC_A, 42, "r"),
    ),
    (
        f("SUBSCRIBE", id="s", destination="/exchange/chat/chat.a"),
        Subscribe("s", Destination("/exchange/chat/chat.a", "chat.a", "chat"), None, None),
    ),
    (f("UNSUBSCRIBE", id="s", receipt="r"), Unsubscribe("s", "r")),
    (f("DISCONNECT", receipt="bye"), Disconnect("bye")),
    (f("DISCONNECT"), Disconnect(None)),
    # A JSON body is data as it is; anything else is data as a string.
    (
        f("SEND", b'{"a": [1]}', destination="/topic/chat.a", content_type="application/json"),
        Send(TOPIC_A, b'{"a": [1]}', None),
    ),
    (
        f(
            "SEND",
            b"[1]",
            destination="/topic/chat.a",
            content_type="Application/JSON; charset=utf-8",
        ),
        Send(TOPIC_A, b"[1]", None),
    ),
    (f("SEND", b"hello", destination="/topic/chat.a"), Send(TOPIC_A, b'"hello"', None)),
    (
        f("SEND", b'{"a":1}', destination="/topic/chat.a", content_type="text/plain", receipt="r"),
        Send(TOPIC_A, orjson.dumps('{"a":1}'), "r"),
    ),
    (f("SEND", destination="/topic/chat.a"), Send(TOPIC_A, b'""', None)),
]


@pytest.mark.parametrize(("frame", "request_"), REQUESTS)
def test_parse_request(frame: Frame, request_: object) -> None:
    assert parse_request(frame, exchange_of) == request_


REFUSALS = [
    (f("SUBSCRIBE", id="s", destination="/queue/work"), "bad_request", "not supported"),
    (f("SUBSCRIBE", id="s", destination="/amq/queue/work"), "bad_request", "not supported"),
    (f("SUBSCRIBE", id="s", destination="/temp-queue/x"), "bad_request", "not supported"),
    (f("SEND", destination="/queue/work", receipt="r"), "bad_request", "not supported"),
    (f("SUBSCRIBE", id="s", destination="/topic/chat.*"), "bad_request", "no wildcards"),
    (f("SUBSCRIBE", id="s", destination="/topic/chat.#"), "bad_request", "no wildcards"),
    (f("SUBSCRIBE", id="s", destination="/topic/#"), "bad_request", "no wildcards"),
    (f("SEND", destination="/topic/chat.*"), "bad_request", "no wildcards"),
    (f("SUBSCRIBE", id="s", destination="/topic/"), "bad_request", "no wildcards"),
    (f("SUBSCRIBE", id="s", destination="chat.a"), "bad_request", "not supported"),
    (f("SUBSCRIBE", id="s", destination="/exchange/chat"), "bad_request", "/exchange/<exchange>"),
    (f("SUBSCRIBE", id="s", destination="/exchange/news/chat.a"), "forbidden", "do not map"),
    (f("SUBSCRIBE", id="s", destination="/exchange/chat/nowhere.x"), "forbidden", "do not map"),
    (f("SUBSCRIBE", destination="/topic/chat.a"), "bad_request", "needs an id"),
    (f("SUBSCRIBE", id="", destination="/topic/chat.a"), "bad_request", "id must be"),
    (f("SUBSCRIBE", id="s" * 129, destination="/topic/chat.a"), "bad_request", "id must be"),
    (f("SUBSCRIBE", id="s"), "bad_request", "destination header is required"),
    (f("SUBSCRIBE", id="s", destination="/topic/chat.a", ack="client"), "bad_request", "ack:auto"),
    (
        f("SUBSCRIBE", id="s", destination="/topic/chat.a", ack="client-individual"),
        "bad_request",
        "ack:auto",
    ),
    (f("SUBSCRIBE", id="s", destination="/topic/chat.a", x_since="-1"), "bad_request", "x-since"),
    (f("SUBSCRIBE", id="s", destination="/topic/chat.a", x_since="1e3"), "bad_request", "x-since"),
    (f("UNSUBSCRIBE"), "bad_request", "needs an id"),
    (f("ACK", id="m"), "bad_request", "not supported"),
    (f("NACK", id="m"), "bad_request", "not supported"),
    (f("BEGIN", transaction="t"), "bad_request", "not supported"),
    (f("COMMIT", transaction="t"), "bad_request", "not supported"),
    (f("ABORT", transaction="t"), "bad_request", "not supported"),
    (f("CONNECT"), "bad_request", "already connected"),
    (
        f("SEND", b"{oops", destination="/topic/chat.a", content_type="application/json"),
        "bad_request",
        "not valid JSON",
    ),
    (f("SEND", b"\xff", destination="/topic/chat.a"), "bad_request", "UTF-8"),
    (f("SEND", receipt=""), "bad_request", "receipt must be"),
]


@pytest.mark.parametrize(("frame", "code", "why"), REFUSALS)
def test_refused_requests(frame: Frame, code: str, why: str) -> None:
    with pytest.raises(Refused, match=why) as refused:
        parse_request(frame, exchange_of)
    assert refused.value.code == code
    # The receipt the client asked for, so that the ERROR names it (an empty one is not).
    assert refused.value.receipt == (frame.header("receipt") or None)


def parse(data: bytes) -> Frame:
    """A server frame read back (the codec's parser knows only client commands)."""
    (frame,) = FrameParser().feed(data.replace(data.split(b"\n", 1)[0], b"SEND", 1))
    return frame


def test_connected_frame() -> None:
    data = connected_frame("1.2", (20000, 0), "abc")
    assert data.startswith(b"CONNECTED\n")
    assert dict(parse(data).headers) == {
        "version": "1.2",
        "heart-beat": "20000,0",
        "session": "abc",
        "server": SERVER,
    }


def test_receipt_frames() -> None:
    assert receipt_frame("r1", "1.2") == b"RECEIPT\nreceipt-id:r1\n\n\0"
    assert receipt_frame("r1", "1.2", recovered=False) == (
        b"RECEIPT\nreceipt-id:r1\nx-recovered:false\n\n\0"
    )


def test_error_frame() -> None:
    frame = parse(error_frame("rate_limited", "slow down", "1.2", "r9", retry_after=0.5))
    assert frame.header("message") == "rate_limited"
    assert frame.header("receipt-id") == "r9"
    assert frame.header("retry-after") == "0.5"
    assert frame.body == b"slow down"


def test_message_frames_share_their_tail() -> None:
    tail = message_tail("chat.a", 7, "ali:ce\n", 1700000000000, b'{"x":1}', "1.2")
    one = parse(message_frame("sub-0", "/topic/chat.a", tail, "1.2", recovered=True))
    assert dict(one.headers) == {
        "subscription": "sub-0",
        "destination": "/topic/chat.a",
        "x-recovered": "true",
        "message-id": "chat.a@7",
        "content-type": "application/json",
        "x-seq": "7",
        "x-from": "ali:ce\n",
        "x-ts": "1700000000000",
        "content-length": "7",
    }
    assert one.body == b'{"x":1}'
    two = parse(message_frame("sub-1", "/topic/chat.a", tail, "1.2"))
    assert two.header("subscription") == "sub-1" and two.header("x-recovered") is None


def test_a_backend_message_without_app_id_has_no_x_from() -> None:
    tail = message_tail("chat.a", 1, None, 1, b"1", "1.2")
    assert parse(message_frame("s", "/topic/chat.a", tail, "1.2")).header("x-from") is None

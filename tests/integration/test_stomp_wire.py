"""STOMP over the real gateway (TLS, real tokens, real RabbitMQ), frames written by hand.

The conversation as contract section 10 says it, and the hostile cases: a
bad frame, a NUL in a header, huge headers, many subscriptions, frames before
CONNECT, SEND to a queue or a wildcard, ACK. Each gets an ERROR and a close,
and the gateway goes on serving.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from gateway_fixtures import existing

from gateway.app import Gateway

from .stomp_wire import StompWire, frame, open_wire

pytestmark = pytest.mark.integration


@pytest.fixture
async def beating(settings: Any, cleanup_broker: None) -> AsyncIterator[Gateway]:
    """A gateway whose heart-beat is 200 ms (the default 20 s makes tests wait)."""
    import dataclasses

    from gateway.policy.rules import load_policy_set

    limits = dataclasses.replace(settings.limits, heartbeat_seconds=0.2)
    tuned = dataclasses.replace(settings, limits=limits)
    gw = Gateway(tuned, load_policy_set(tuned.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
def wire(gateway: Gateway, client_ssl: ssl.SSLContext) -> Callable[..., Any]:
    async def make(**kwargs: Any) -> StompWire:
        return await open_wire(gateway.port, client_ssl, **kwargs)

    return make


async def connected(wire: Callable[..., Any], token: str) -> StompWire:
    client: StompWire = await wire()
    answer = await client.connect(token)
    assert answer.command == "CONNECTED", (answer.headers, answer.body)
    return client


async def test_connect_with_passcode_subscribe_send_with_receipt_and_receive(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client: StompWire = await wire()
    answer = await client.connect(make_token("alice"), heart_beat="0,0")
    assert answer.command == "CONNECTED"
    assert answer.headers["version"] == "1.2"
    assert answer.headers["server"].startswith("rabbitgate/")
    assert answer.headers["session"]
    assert client.ws.subprotocol == "v12.stomp"
    await client.send(frame("SUBSCRIBE", id="sub-0", destination="/topic/chat.a", receipt="r1"))
    receipt = await client.recv()
    assert receipt.command == "RECEIPT" and receipt.headers["receipt-id"] == "r1"
    body = orjson.dumps({"text": "hi"})
    await client.send(
        frame(
            "SEND", body, destination="/topic/chat.a", content_type="application/json", receipt="r2"
        )
    )
    got = [await client.recv(), await client.recv()]
    receipt = next(f for f in got if f.command == "RECEIPT")
    message = next(f for f in got if f.command == "MESSAGE")
    assert receipt.headers["receipt-id"] == "r2"
    assert message.headers["subscription"] == "sub-0"
    assert message.headers["destination"] == "/topic/chat.a"
    assert message.headers["content-type"] == "application/json"
    assert message.headers["x-from"] == "alice"
    assert int(message.headers["x-seq"]) >= 0 and int(message.headers["x-ts"]) > 0
    assert message.headers["message-id"]
    assert orjson.loads(message.body) == {"text": "hi"}


async def test_the_handshake_authorization_header_needs_no_passcode(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client: StompWire = await wire(token=make_token("alice"))
    answer = await client.connect(None, login="guest")
    assert answer.command == "CONNECTED"


@pytest.mark.parametrize("passcode", [None, "guest", "not.a.jwt"])
async def test_a_missing_or_invalid_passcode_is_an_error_then_4401(
    wire: Callable[..., Any], passcode: str | None
) -> None:
    client: StompWire = await wire()
    answer = await client.connect(passcode, login="guest")
    assert answer.command == "ERROR" and answer.headers["message"] == "unauthorized"
    assert await client.closed() == 4401


async def test_an_expired_token_is_an_error_then_4401(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client = await connected(wire, make_token("alice", ttl=1.5))
    answer = await client.until("ERROR", timeout=5)
    assert answer.headers["message"] == "unauthorized" and "expired" in answer.text
    assert await client.closed() == 4401


@pytest.mark.parametrize(
    "first",
    [
        frame("SEND", "x", destination="/topic/chat.a"),
        frame("SUBSCRIBE", id="s", destination="/topic/chat.a"),
        frame("ACK", id="m"),
    ],
)
async def test_frames_before_connect_are_unauthorized(
    wire: Callable[..., Any], make_token: Callable[..., str], first: bytes
) -> None:
    client: StompWire = await wire(token=make_token("alice"))  # even with a valid header
    await client.send(first)
    answer = await client.recv()
    assert answer.command == "ERROR" and answer.headers["message"] == "unauthorized"
    assert await client.closed() == 4401


async def test_no_connect_in_time_closes_with_4408(wire: Callable[..., Any]) -> None:
    client: StompWire = await wire()
    answer = await client.recv(timeout=5)
    assert answer.command == "ERROR" and "in time" in answer.text
    assert await client.closed() == 4408


HOSTILE = [
    # (bytes after CONNECTED, error message, close code)
    (b"HELLO\n\n\0", "bad_request", 1002),
    (b"SEND\ndestination:/topic/chat.a\nk:a\0b\n\nx\0", "bad_request", 1002),
    (b"SEND\ndestination:/topic/chat.a\nk:\\t\n\nx\0", "bad_request", 1002),
    (b"SEND\nno colon\n\n\0", "bad_request", 1002),
    (b"SEND\ndestination:/topic/chat.a\ncontent-length:2\n\nxyz\0", "bad_request", 1002),
    (b"SEND\ndestination:/topic/chat.a\nbig:" + b"h" * 20_000 + b"\n\n\0", "too_large", 1009),
    (b"SEND\n" + b"".join(b"h%d:v\n" % n for n in range(100)) + b"\n\0", "too_large", 1009),
    (frame("SEND", "x", destination="/queue/jobs"), "bad_request", 1002),
    (frame("SEND", "x", destination="/amq/queue/jobs"), "bad_request", 1002),
    (frame("SUBSCRIBE", id="s", destination="/temp-queue/r"), "bad_request", 1002),
    (frame("SUBSCRIBE", id="s", destination="/topic/chat.*"), "bad_request", 1002),
    (frame("SEND", "x", destination="/topic/#"), "bad_request", 1002),
    (frame("SUBSCRIBE", id="s", destination="/topic/chat.a", ack="client"), "bad_request", 1002),
    (frame("ACK", id="m-1"), "bad_request", 1002),
    (frame("NACK", id="m-1"), "bad_request", 1002),
    (frame("BEGIN", transaction="t"), "bad_request", 1002),
    (frame("CONNECT", accept_version="1.2"), "bad_request", 1002),
    (frame("SUBSCRIBE", id="s", destination="/topic/user.bob.inbox"), "forbidden", 1008),
    (frame("SEND", "x", destination="/exchange/elsewhere/chat.a"), "forbidden", 1008),
    (frame("SEND", "x", destination="/topic/user.bob.inbox", receipt="r"), "forbidden", 1008),
    (frame("SEND", "x" * 5000, destination="/topic/chat.a"), "too_large", 1009),
]


@pytest.mark.parametrize(("data", "code", "close"), HOSTILE)
async def test_a_hostile_frame_gets_an_error_and_a_close_and_the_gateway_goes_on(
    wire: Callable[..., Any], make_token: Callable[..., str], data: bytes, code: str, close: int
) -> None:
    client = await connected(wire, make_token("alice"))
    await client.ws.send(data, text=False)  # a binary WebSocket frame is read the same way
    answer = await client.until("ERROR")
    assert answer.headers["message"] == code, answer.text
    assert await client.closed() == close
    again = await connected(wire, make_token("alice"))
    await again.send(frame("DISCONNECT", receipt="bye"))
    assert (await again.recv()).headers["receipt-id"] == "bye"
    assert await again.closed() == 1000


async def test_a_websocket_message_larger_than_the_largest_frame_closes_with_1009(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client = await connected(wire, make_token("alice"))
    await client.send(frame("SEND", "x" * 70_000, destination="/topic/chat.a"))
    assert await client.closed() == 1009


async def test_a_frame_spanning_messages_is_bounded_too(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client = await connected(wire, make_token("alice"))
    await client.send(b"SEND\ndestination:/topic/chat.a\n\n")
    for _ in range(3):
        await client.send(b"x" * 30_000)  # never a NUL: the frame never ends
    answer = await client.until("ERROR")
    assert answer.headers["message"] == "too_large"
    assert await client.closed() == 1009


async def test_a_frame_spanning_messages_is_accepted(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client = await connected(wire, make_token("alice"))
    await client.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.split", receipt="r"))
    await client.until("RECEIPT")
    whole = frame("SEND", "split body", destination="/topic/chat.split")
    await client.send(whole[:10])
    await client.send(whole[10:])
    assert (await client.until("MESSAGE")).body == b'"split body"'


async def test_many_subscriptions_stop_at_the_per_connection_limit(
    wire: Callable[..., Any], make_token: Callable[..., str], gateway: Gateway
) -> None:
    limit = gateway.settings.limits.max_channels_per_connection
    client = await connected(wire, make_token("alice"))
    for n in range(limit):
        await client.send(frame("SUBSCRIBE", id=f"s{n}", destination=f"/topic/chat.m{n}"))
    await client.send(frame("SUBSCRIBE", id="last", destination="/topic/chat.last", receipt="r"))
    answer = await client.until("ERROR", timeout=20)
    assert answer.headers["message"] == "forbidden" and answer.headers["receipt-id"] == "r"
    assert f"at most {limit}" in answer.text
    assert await client.closed() == 1008


async def test_x_since_replays_with_x_recovered(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    live = await connected(wire, make_token("alice"))
    await live.send(frame("SUBSCRIBE", id="live", destination="/topic/chat.h", receipt="r"))
    assert "x-seq" in (await live.until("RECEIPT")).headers  # where to resume from
    publisher = await connected(wire, make_token("bob"))
    for n in range(3):
        body = orjson.dumps({"n": n})
        await publisher.send(
            frame("SEND", body, destination="/topic/chat.h", content_type="application/json")
        )
    seen = [await live.until("MESSAGE") for _ in range(3)]
    assert all("x-recovered" not in m.headers for m in seen)
    since = seen[0].headers["x-seq"]
    # Without a receipt, x-recovered comes on the first MESSAGE.
    later = await connected(wire, make_token("carol"))
    await later.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.h", x_since=since))
    replayed = [await later.until("MESSAGE") for _ in range(2)]
    assert [orjson.loads(m.body) for m in replayed] == [{"n": 1}, {"n": 2}]
    assert replayed[0].headers["x-recovered"] == "true"
    assert "x-recovered" not in replayed[1].headers
    # With a receipt, the RECEIPT says it, before the replay.
    again = await connected(wire, make_token("dave"))
    await again.send(
        frame("SUBSCRIBE", id="s", destination="/topic/chat.h", x_since=since, receipt="r")
    )
    receipt = await again.recv()
    assert receipt.command == "RECEIPT" and receipt.headers["x-recovered"] == "true"
    assert [orjson.loads((await again.recv()).body) for _ in range(2)] == [{"n": 1}, {"n": 2}]
    # A since past the channel's latest seq: the history was reset.
    reset = await connected(wire, make_token("erin"))
    await reset.send(
        frame("SUBSCRIBE", id="s", destination="/topic/chat.h", x_since="999999999", receipt="r")
    )
    assert (await reset.recv()).headers["x-recovered"] == "false"


async def test_stomp_and_json_clients_share_channels(
    wire: Callable[..., Any], make_token: Callable[..., str], connect_client: Any
) -> None:
    json_client = await connect_client("bob")
    assert (await json_client.request("subscribe", channel="chat.mixed"))["type"] == "ack"
    client = await connected(wire, make_token("alice"))
    await client.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.mixed", receipt="r"))
    await client.until("RECEIPT")
    await client.send(frame("SEND", "from stomp", destination="/topic/chat.mixed"))
    message = await json_client.next_message()
    assert message["data"] == "from stomp" and message["from"] == "alice"
    assert (await client.until("MESSAGE")).body == b'"from stomp"'
    await json_client.request("publish", channel="chat.mixed", data={"from": "json"})
    got = await client.until("MESSAGE")
    assert orjson.loads(got.body) == {"from": "json"} and got.headers["x-from"] == "bob"


async def test_a_backend_message_is_delivered_without_x_from(
    wire: Callable[..., Any], make_token: Callable[..., str], amqp: Any, exchange_prefix: str
) -> None:
    import aio_pika

    client = await connected(wire, make_token("alice"))
    await client.send(frame("SUBSCRIBE", id="s", destination="/topic/news.x", receipt="r"))
    await client.until("RECEIPT")
    channel = await amqp.channel()
    exchange = await channel.get_exchange(f"{exchange_prefix}.news")
    await exchange.publish(aio_pika.Message(b"plain text from a backend"), routing_key="news.x")
    message = await client.until("MESSAGE")
    assert "x-from" not in message.headers
    assert message.body == b'"plain text from a backend"'


async def test_version_1_0_when_only_v10_stomp_is_offered(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client: StompWire = await wire(subprotocols=("v10.stomp",))
    assert client.ws.subprotocol == "v10.stomp"
    answer = await client.connect(make_token("alice"))
    assert answer.command == "CONNECTED" and answer.headers["version"] == "1.0"


async def test_unsubscribe_stops_delivery(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client = await connected(wire, make_token("alice"))
    await client.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.u", receipt="r1"))
    await client.until("RECEIPT")
    await client.send(frame("UNSUBSCRIBE", id="s", receipt="r2"))
    assert (await client.until("RECEIPT")).headers["receipt-id"] == "r2"
    await client.send(frame("SEND", "after", destination="/topic/chat.u", receipt="r3"))
    assert (await client.recv()).headers["receipt-id"] == "r3"  # and no MESSAGE before it


async def test_a_stomp_conversation_makes_the_same_audit_events_and_metrics(
    wire: Callable[..., Any], make_token: Callable[..., str], gateway: Gateway
) -> None:
    from prometheus_client import generate_latest

    from gateway.telemetry.events import TrafficEvent

    events: list[TrafficEvent] = []
    gateway.node.events.subscribe(events.append)
    token = make_token("alice")
    client = await connected(wire, token)
    await client.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.ev", receipt="r1"))
    await client.until("RECEIPT")
    await client.send(frame("SEND", "x", destination="/topic/chat.ev", receipt="r2"))
    await client.until("RECEIPT")
    metrics = generate_latest(gateway.metrics.registry).decode()
    assert 'rabbitgate_connections_open{transport="stomp"} 1.0' in metrics
    assert 'rabbitgate_connections_opened_total{transport="stomp"} 1.0' in metrics
    await client.send(frame("SEND", "x", destination="/topic/user.bob.inbox"))
    await client.until("ERROR")
    await client.closed()
    seen = [(e.kind, e.user, e.channel, e.detail) for e in events if e.user == "alice"]
    assert ("auth_ok", "alice", None, "stomp") in seen
    assert ("subscribe", "alice", "chat.ev", None) in seen
    assert ("publish", "alice", "chat.ev", None) in seen
    assert ("denied", "alice", "user.bob.inbox", "publish") in seen
    assert any(kind == "closed" for kind, *_ in seen)


async def test_heart_beats_both_ways(
    beating: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> None:
    gw = beating
    client = await open_wire(gw.port, client_ssl)
    answer = await client.connect(make_token("alice"), heart_beat="100,100")
    assert answer.headers["heart-beat"] == "200,200"
    for _ in range(5):
        await client.send(b"\n")  # the client's heart-beats are no frames to refuse
    await client.send(frame("DISCONNECT", receipt="bye"))
    while (await client.recv()).command != "RECEIPT":
        pass
    await client.closed()
    # The server's heart-beats: EOLs come every 200 ms while nothing else does.
    quiet = await open_wire(gw.port, client_ssl)
    await quiet.connect(make_token("bob"), heart_beat="0,200")
    with pytest.raises(TimeoutError):
        await quiet.recv(timeout=1.5)
    assert quiet.heartbeats >= 2
    # A client that wants none gets none.
    none = await open_wire(gw.port, client_ssl)
    assert (await none.connect(make_token("carol"), heart_beat="0,0")).command == "CONNECTED"
    with pytest.raises(TimeoutError):
        await none.recv(timeout=0.8)
    assert none.heartbeats == 0


async def test_the_operators_list_counts_stomp_frames_but_not_heart_beats(
    beating: Gateway,
    client_ssl: ssl.SSLContext,
    connect_client: Any,
    make_token: Callable[..., str],
) -> None:
    import asyncio

    from gateway.operations.connections import ConnectionFilter

    gw = beating

    async def written() -> Any:
        (row,) = (await gw.connections.list(ConnectionFilter(user="dora")))["connections"]
        assert row["transport"] == "stomp"
        return row["messages_out"]

    client = await open_wire(gw.port, client_ssl)
    connected = await client.connect(make_token("dora"), heart_beat="0,100")
    assert connected.command == "CONNECTED"
    beat_ms = int(connected.headers["heart-beat"].split(",")[0])
    assert beat_ms > 0
    await client.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.b", receipt="r"))
    assert (await client.recv()).command == "RECEIPT"
    before = await written()
    assert before == 2  # CONNECTED and the RECEIPT
    bob = await connect_client("bob", gw=gw)
    for n in range(3):
        assert (await bob.request("publish", channel="chat.b", data=n))["type"] == "ack"
    assert [(await client.recv()).command for _ in range(3)] == ["MESSAGE"] * 3
    # Two heart-beats come next, and are not counted.
    for _ in range(2):
        beat = await asyncio.wait_for(client.ws.recv(decode=False), 3 * beat_ms / 1000 + 1)
        assert not beat.strip(b"\r\n"), beat
    assert await written() == before + 3


async def test_closed_stomp_connections_are_freed_though_frozen_while_open(
    gateway: Gateway, wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    """The gateway freezes what lives longer than a second (gateway/operations/
    collector.py): a closed connection left in reference cycles would never be
    collected. Frozen while open, as in production, nothing of three STOMP
    connections (one DISCONNECTed, two just closed) is left once they close."""
    import asyncio
    import gc

    from gateway.core.session import Session
    from gateway.operations import collector
    from gateway.transports.stomp.bridge import StompBridge
    from gateway.transports.stomp.endpoint import StompTransport
    from gateway.transports.tls import TlsLayer

    kinds = (Session, StompTransport, StompBridge, TlsLayer)

    gc.collect()
    before = existing(kinds)
    try:
        clients = []
        for n in range(3):
            client: StompWire = await wire()
            assert (await client.connect(make_token(f"fz{n}"), heart_beat="0,0")).command == (
                "CONNECTED"
            )
            await client.send(frame("SUBSCRIBE", id="s", destination="/topic/chat.fz", receipt="r"))
            assert (await client.recv()).command == "RECEIPT"
            clients.append(client)
        collector.collect_and_freeze()  # while they are open
        assert existing(kinds) - before == 3 * len(kinds)
        await clients[0].send(frame("DISCONNECT", receipt="bye"))
        assert (await clients[0].recv()).command == "RECEIPT"
        for client in clients:
            await client.ws.close()
        for _ in range(100):  # the handlers end a few loop turns after the close
            if existing(kinds) == before:
                break
            await asyncio.sleep(0.02)
        assert existing(kinds) - before == 0
    finally:
        gc.unfreeze()
        gc.collect()

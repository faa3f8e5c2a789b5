"""Section 3-5 of the wire contract, end to end: real TLS WebSockets, real
signed tokens, the real RabbitMQ."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import orjson
import pytest

from gateway.app import Gateway

pytestmark = pytest.mark.integration


async def test_a_published_message_reaches_a_subscriber_with_the_verified_sender(
    connect_client: Any,
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob", header=False)  # authenticates with an auth frame
    ack = await alice.request("subscribe", channel="chat.lobby")
    assert ack["type"] == "ack" and "seq" in ack

    published = await bob.request(
        "publish", channel="chat.lobby", data={"text": "hi", "from": "mallory"}
    )
    assert published == {"type": "ack", "id": published["id"]}

    message = await alice.next_message()
    assert message["channel"] == "chat.lobby"
    assert message["data"] == {"text": "hi", "from": "mallory"}
    assert message["from"] == "bob"
    assert isinstance(message["seq"], int)
    assert abs(message["ts"] - asyncio.get_running_loop().time()) >= 0  # an int timestamp
    assert isinstance(message["ts"], int) and message["ts"] > 1_700_000_000_000


async def test_seq_strictly_increases_and_publish_order_is_kept(connect_client: Any) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.order")
    for i in range(50):
        await bob.send(type="publish", channel="chat.order", data=i, id=i)
    messages = await alice.messages_until(50)
    assert [m["data"] for m in messages] == list(range(50))
    seqs = [m["seq"] for m in messages]
    assert seqs == sorted(set(seqs))
    again = await alice.request("subscribe", channel="chat.order")
    assert again["seq"] == seqs[-1]


async def test_a_backend_queue_receives_client_publishes_with_unforgeable_headers(
    connect_client: Any, amqp: aio_pika.abc.AbstractConnection, exchange_prefix: str
) -> None:
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        f"{exchange_prefix}.chat", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "chat.#")
    bob = await connect_client("bob")
    await bob.send(
        type="publish",
        channel="chat.backend",
        data={"headers": {"x-rabbitgate-sub": "admin"}},
        id="p1",
        sub="admin",
        session="forged",
        headers={"x-rabbitgate-sub": "admin"},
    )
    message = await queue.get(timeout=5, fail=False) or await _wait_get(queue)
    assert message.routing_key == "chat.backend"
    assert message.content_type == "application/json"
    assert message.message_id and message.timestamp is not None
    assert message.headers["x-rabbitgate-sub"] == "bob"
    assert message.headers["x-rabbitgate-session"] == bob.welcome["session"]
    assert orjson.loads(message.body) == {"headers": {"x-rabbitgate-sub": "admin"}}


async def _wait_get(queue: aio_pika.abc.AbstractQueue) -> Any:
    for _ in range(50):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.1)
    raise AssertionError("nothing reached the backend queue")


async def test_a_backend_publish_reaches_websocket_subscribers(
    connect_client: Any, amqp: aio_pika.abc.AbstractConnection, exchange_prefix: str
) -> None:
    alice = await connect_client("alice")
    await alice.request("subscribe", channel="chat.ops")
    channel = await amqp.channel()
    exchange = await channel.get_exchange(f"{exchange_prefix}.chat")
    await exchange.publish(aio_pika.Message(b'{"deploy": 42}', app_id="deployer"), "chat.ops")
    await exchange.publish(aio_pika.Message(b"plain text"), "chat.ops")
    # A backend cannot claim to be a verified client: it is not the gateway's user_id.
    await exchange.publish(
        aio_pika.Message(b"1", headers={"x-rabbitgate-sub": "alice"}), "chat.ops"
    )
    first, second, third = await alice.messages_until(3)
    assert (first["data"], first["from"]) == ({"deploy": 42}, "deployer")
    assert (second["data"], second["from"]) == ("plain text", None)
    assert (third["data"], third["from"]) == (1, None)


async def test_policies_decide_who_subscribes_and_publishes(connect_client: Any) -> None:
    alice = await connect_client("alice", roles=(), tenant="acme")
    member = await connect_client("carol", roles=("member",), tenant="acme")

    async def code(client: Any, kind: str, **fields: Any) -> str:
        answer = await client.request(kind, **fields)
        return answer["type"] if answer["type"] == "ack" else answer["code"]

    assert await code(alice, "subscribe", channel="chat.lobby") == "forbidden"
    assert await code(alice, "publish", channel="chat.lobby", data=1) == "forbidden"
    assert await code(alice, "subscribe", channel="user.alice.inbox") == "ack"
    assert await code(alice, "subscribe", channel="user.bob.inbox") == "forbidden"
    assert await code(alice, "publish", channel="user.alice.inbox", data=1) == "forbidden"
    assert await code(alice, "subscribe", channel="tenant.acme.feed") == "forbidden"
    assert await code(member, "subscribe", channel="tenant.acme.feed") == "ack"
    assert await code(member, "subscribe", channel="tenant.other.feed") == "forbidden"
    assert await code(alice, "subscribe", channel="news.sport") == "ack"
    assert await code(alice, "publish", channel="news.sport", data=1) == "forbidden"
    assert await code(alice, "subscribe", channel="nomatch.x") == "forbidden"
    writer = await connect_client("dave", roles=(), scope="news.write other")
    assert await code(writer, "publish", channel="news.sport", data=1) == "ack"


async def test_data_larger_than_the_rule_allows_is_refused(connect_client: Any) -> None:
    bob = await connect_client("bob")
    answer = await bob.request("publish", channel="chat.big", data="x" * 5000)
    assert answer["code"] == "too_large"


async def test_unsubscribe_stops_delivery_and_is_acked_when_not_subscribed(
    connect_client: Any,
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    assert (await alice.request("unsubscribe", channel="chat.none"))["type"] == "ack"
    await alice.request("subscribe", channel="chat.a")
    await alice.request("subscribe", channel="chat.b")
    await alice.request("unsubscribe", channel="chat.a")
    await bob.request("publish", channel="chat.a", data="gone")
    await bob.request("publish", channel="chat.b", data="kept")
    message = await alice.next_message()
    assert (message["channel"], message["data"]) == ("chat.b", "kept")


async def test_ping_is_answered(connect_client: Any) -> None:
    alice = await connect_client("alice")
    assert await alice.request("ping", id=7) == {"type": "pong", "id": 7}


async def test_welcome_names_session_user_and_heartbeat(
    connect_client: Any, gateway: Gateway
) -> None:
    alice = await connect_client("alice")
    assert alice.welcome["user"] == "alice"
    assert alice.welcome["heartbeat"] == gateway.settings.limits.heartbeat_seconds
    assert len(alice.welcome["session"]) >= 16

"""One test per attack on the running gateway (real TLS, real RabbitMQ).

Token-level attacks are in test_jwt_attacks.py; these are the ways a client
could try to read or write what the policies do not allow it to."""

from __future__ import annotations

import base64
import json
import ssl
from typing import Any

import aio_pika
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.app import Gateway

pytestmark = pytest.mark.integration


def b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def refused_at_handshake(gateway: Gateway, tls: ssl.SSLContext, token: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect(
            f"wss://localhost:{gateway.port}/ws",
            ssl=tls,
            additional_headers={"Authorization": f"Bearer {token}"},
        )
    return refused.value.response.status_code


async def test_amqp_wildcards_cannot_widen_a_subscription(connect_client: Any) -> None:
    """rabbitmq-server#2558: binding `user.#` read everyone's inbox."""
    mallory = await connect_client("mallory")
    for channel in ("user.#", "user.*.inbox", "#", "user.mallory.inbox.#", "*"):
        answer = await mallory.request("subscribe", channel=channel)
        assert answer["code"] == "bad_request", (channel, answer)


async def test_another_users_inbox_cannot_be_read(connect_client: Any) -> None:
    mallory = await connect_client("mallory", roles=("member", "admin"))
    answer = await mallory.request("subscribe", channel="user.alice.inbox")
    assert answer["code"] == "forbidden"


async def test_a_claim_in_the_frame_does_not_count(connect_client: Any) -> None:
    mallory = await connect_client("mallory", tenant="evil")
    answer = await mallory.request(
        "subscribe", channel="tenant.acme.feed", tenant="acme", roles=["member"], sub="alice"
    )
    assert answer["code"] == "forbidden"


async def test_the_sender_cannot_be_forged(
    connect_client: Any, amqp: aio_pika.abc.AbstractConnection, exchange_prefix: str
) -> None:
    alice = await connect_client("alice")
    mallory = await connect_client("mallory")
    await alice.request("subscribe", channel="chat.forge")
    await mallory.request(
        "publish",
        channel="chat.forge",
        data={"from": "alice"},
        **{"from": "alice", "user_id": "guest", "app_id": "bank", "headers": {"x": 1}},
    )
    message = await alice.next_message()
    assert message["from"] == "mallory"


async def test_a_backend_cannot_impersonate_a_client_without_the_gateway_broker_user(
    connect_client: Any, amqp: aio_pika.abc.AbstractConnection, exchange_prefix: str
) -> None:
    alice = await connect_client("alice")
    await alice.request("subscribe", channel="chat.imp")
    channel = await amqp.channel()
    exchange = await channel.get_exchange(f"{exchange_prefix}.chat")
    forged = aio_pika.Message(b'"hi"', headers={"x-rabbitgate-sub": "bob"}, app_id="job")
    await exchange.publish(forged, "chat.imp")
    assert (await alice.next_message())["from"] == "job"


async def test_an_unsigned_token_is_refused_at_the_handshake(
    gateway: Gateway, client_ssl: ssl.SSLContext
) -> None:
    token = b64({"alg": "none", "typ": "JWT"}) + "." + b64({"sub": "admin", "exp": 4e9}) + "."
    assert await refused_at_handshake(gateway, client_ssl, token) == 401


async def test_a_token_signed_with_another_secret_is_refused(
    gateway: Gateway, client_ssl: ssl.SSLContext
) -> None:
    import jwt

    token = jwt.encode({"sub": "admin", "exp": 4_000_000_000, "iat": 1}, "x" * 40, "HS256")
    assert await refused_at_handshake(gateway, client_ssl, token) == 401


async def test_a_huge_token_is_refused_at_the_handshake(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    token = make_token("alice", padding="x" * 9000)
    # Past 8 KiB the header line itself is refused by the HTTP layer (431),
    # still before any token work.
    assert await refused_at_handshake(gateway, client_ssl, token) in (401, 431)


async def test_a_huge_token_in_an_auth_frame_closes_with_4401(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    token = make_token("alice", padding="x" * 9000)
    async with connect(f"wss://localhost:{gateway.port}/ws", ssl=client_ssl) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        await ws.wait_closed()
    assert ws.close_code == 4401


async def test_a_token_for_another_audience_is_refused(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    token = make_token("alice", aud="another-service")
    assert await refused_at_handshake(gateway, client_ssl, token) == 401


async def test_an_expired_token_cannot_be_used_for_a_refresh(
    connect_client: Any, make_token: Any
) -> None:
    alice = await connect_client("alice")
    answer = await alice.request("auth", token=make_token("alice", ttl=-60))
    assert answer["code"] == "unauthorized"


async def test_a_refresh_cannot_switch_users(connect_client: Any, make_token: Any) -> None:
    mallory = await connect_client("mallory")
    answer = await mallory.request("auth", token=make_token("alice"))
    assert answer["code"] == "unauthorized"
    assert (await mallory.request("subscribe", channel="user.alice.inbox"))["code"] == "forbidden"


async def test_a_refresh_with_fewer_roles_ends_subscriptions_it_no_longer_allows(
    connect_client: Any, make_token: Any
) -> None:
    alice = await connect_client("alice", roles=("member",))
    await alice.request("subscribe", channel="chat.vip")
    answer = await alice.request("auth", token=make_token("alice", roles=()))
    assert answer["type"] == "ack"
    ended = alice.other.pop() if alice.other else await alice.recv()
    assert (ended["code"], ended["channel"]) == ("forbidden", "chat.vip")


async def test_a_routing_key_published_to_another_exchange_does_not_reach_an_inbox(
    connect_client: Any, amqp: aio_pika.abc.AbstractConnection, exchange_prefix: str
) -> None:
    """issue 13 item 5: with chat.* followed, a message to the chat exchange with
    routing key user.bob.inbox reached bob's inbox, with the chat stream's seq."""
    bob = await connect_client("bob")
    await bob.request("subscribe", channel="chat.any")
    inbox = await bob.request("subscribe", channel="user.bob.inbox")
    channel = await amqp.channel()
    chat = await channel.get_exchange(f"{exchange_prefix}.chat")
    notify = await channel.get_exchange(f"{exchange_prefix}.notify")
    for _ in range(5):  # the chat stream moves ahead of the inbox's
        await chat.publish(aio_pika.Message(b'"chat"'), "chat.any")
    await chat.publish(aio_pika.Message(b'"forged"'), "user.bob.inbox")
    await notify.publish(aio_pika.Message(b'"real"'), "user.bob.inbox")
    got = await bob.messages_until(6)
    inbox_messages = [m for m in got if m["channel"] == "user.bob.inbox"]
    assert [m["data"] for m in inbox_messages] == ["real"], got
    # Its seq is the inbox stream's: right after where the subscribe ack left it.
    assert isinstance(inbox["seq"], int) and inbox_messages[0]["seq"] == inbox["seq"] + 1
    assert [m["data"] for m in got if m["channel"] == "chat.any"] == ["chat"] * 5

"""Attacks through a message's `data`: what one hostile publish (client or
backend) costs the publisher's connection, live subscribers and replays."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from sse_helpers import next_event, open_events
from websockets.asyncio.client import connect

from gateway.app import Gateway
from gateway.transports.sse import EventIds

pytestmark = pytest.mark.integration


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def nested_text(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


def malformed_count(gw: Gateway) -> float:
    return float(gw.metrics.malformed.labels("bad_request")._value.get())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_deeply_nested_data_is_refused_before_it_is_published(
    gateway: Gateway, connect_client: Any
) -> None:
    """issue 13 item 2: 255 levels raised in orjson.dumps (1011, traceback);
    254 was acked and could then never be delivered."""
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await bob.request("subscribe", channel="chat.deep")
    before = malformed_count(gateway)
    for depth in (33, 254, 255, 1000):
        frame = '{"type":"publish","id":"d","channel":"chat.deep","data":'
        frame += nested_text(depth) + "}"
        await alice.ws.send(frame)
        answer = await alice.recv()
        assert answer["code"] == "bad_request" and "deeper than 32" in answer["message"], depth
        assert answer["id"] == "d"
    # Past orjson's parse limit the frame is not JSON to us: bad_request too.
    await alice.ws.send('{"type":"publish","id":"x","channel":"chat.deep","data":' + "[" * 2000)
    assert (await alice.recv())["code"] == "bad_request"
    assert malformed_count(gateway) == before + 5
    assert (await alice.request("publish", channel="chat.deep", data=nested(32)))["type"] == "ack"
    assert (await bob.next_message())["data"] == nested(32)


async def test_deeply_nested_data_before_authentication_is_answered_not_fatal(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    async with connect(f"wss://localhost:{gateway.port}/ws", ssl=client_ssl) as ws:
        await ws.send('{"type":"publish","channel":"chat.x","data":' + nested_text(255) + "}")
        assert json.loads(await ws.recv())["code"] == "unauthorized"
        await ws.send(json.dumps({"type": "auth", "token": make_token("alice")}))
        assert json.loads(await ws.recv())["type"] == "welcome"
    assert malformed_count(gateway) == 1


async def test_a_backend_message_too_deep_to_frame_is_skipped_live_in_replays_and_sse(
    gateway: Gateway,
    connect_client: Any,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    http: aiohttp.ClientSession,
) -> None:
    """A backend's body at 254 levels parses but cannot be framed: it must be
    skipped and counted, never end a live subscriber, a replay or an SSE stream."""
    alice = await connect_client("alice")
    ack = await alice.request("subscribe", channel="chat.poison")
    start = ack["seq"]
    assert start is not None
    channel = await amqp.channel()
    exchange = await channel.get_exchange(f"{exchange_prefix}.chat")
    await exchange.publish(aio_pika.Message(nested_text(254).encode()), "chat.poison")
    await exchange.publish(aio_pika.Message(b'{"after":1}'), "chat.poison")
    live = await alice.next_message()
    assert live["data"] == {"after": 1}
    assert gateway.node.dropped_messages == 1
    # A reconnecting client's replay across it: recovered, the poison skipped.
    bob = await connect_client("bob")
    replayed = await bob.request("subscribe", channel="chat.poison", since=start)
    assert replayed["type"] == "ack" and replayed["recovered"] is True, replayed
    assert (await bob.next_message())["data"] == {"after": 1}
    # SSE with a Last-Event-ID from before it: 200, the good message.
    last_event_id = EventIds(["chat.poison"]).encode({"chat.poison": start})
    response = await open_events(
        http,
        gateway,
        client_ssl,
        ["chat.poison"],
        make_token("carol"),
        {"Last-Event-ID": last_event_id},
    )
    try:
        assert response.status == 200, await response.text()
        assert (await next_event(response))["event"] == "recovery"
        message = await next_event(response)
        assert orjson.loads(message["data"])["data"] == {"after": 1}
    finally:
        response.close()
    assert gateway.node.dropped_messages == 3
    assert not alice.ws.close_code and not bob.ws.close_code

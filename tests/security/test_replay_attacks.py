"""Attacks through history replay (``subscribe`` with ``since``), on the real gateway.

A replay reads an exchange's whole stream from ``since`` on; a hostile one
must cost bounded work, and never touch the AMQP connection everyone's
publishes and fan-out use.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

pytestmark = pytest.mark.integration

FLOOD = 30_000


async def flood_stream(
    amqp: aio_pika.abc.AbstractConnection, exchange: str, routing_key: str, count: int
) -> None:
    """``count`` messages straight to the exchange (a backend's publishes), confirmed."""
    channel = await amqp.channel(publisher_confirms=False)
    target = await channel.get_exchange(exchange)
    body = b'{"n":1}'
    for start in range(0, count, 2000):
        await asyncio.gather(
            *(
                target.publish(aio_pika.Message(body), routing_key)
                for _ in range(min(2000, count - start))
            )
        )
    confirmed = await amqp.channel(publisher_confirms=True)
    await (await confirmed.get_exchange(exchange)).publish(aio_pika.Message(body), routing_key)
    await channel.close()
    await confirmed.close()


@pytest.fixture
async def short_gateway(settings: Settings, cleanup_broker: None) -> AsyncIterator[Gateway]:
    # A short confirm timeout: the old code's replay timed out (2 x this) while
    # its reader still acked, which made RabbitMQ close the shared connection.
    limits = dataclasses.replace(
        settings.limits, replay_timeout_seconds=1.0, replay_scan_limit=20_000
    )
    tuned = dataclasses.replace(settings, publish_confirm_timeout_seconds=1.0, limits=limits)
    gw = Gateway(tuned, load_policy_set(tuned.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


async def test_replays_of_a_flooded_stream_do_not_break_the_shared_connection(
    short_gateway: Gateway,
    connect_client: Any,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
) -> None:
    """issue 13 item 1: ``since: 0`` over a stream of 100,000 other messages
    dropped the AMQP connection everyone publishes on (504 CHANNEL_ERROR)."""
    gw = short_gateway
    await flood_stream(amqp, f"{exchange_prefix}.chat", "chat.flood", FLOOD)
    alice = await connect_client("alice", gw=gw)
    await alice.request("subscribe", channel="chat.room")
    mallory = [await connect_client("mallory", gw=gw) for _ in range(3)]
    connection = gw.node.broker._connection
    answers: list[dict[str, Any]] = []

    async def publish_meanwhile() -> None:
        for n in range(30):
            answers.append(await alice.request("publish", channel="chat.room", data=n))
            await asyncio.sleep(0.05)

    replayed, _ = await asyncio.gather(
        asyncio.gather(
            *(m.request("subscribe", channel="chat.victim", since=0, timeout=30) for m in mallory)
        ),
        publish_meanwhile(),
    )
    assert [a["type"] for a in answers] == ["ack"] * 30, answers
    assert gw.node.broker._connection is connection and gw.node.broker.connected
    # Two reads of one user at once; the third is refused, with a retry_after.
    refused = [a for a in replayed if a["type"] == "error"]
    assert [a["code"] for a in refused] == ["rate_limited"], replayed
    assert refused[0]["retry_after"] > 0
    # The others ended at a bound (time or messages read), not recovered.
    assert [a.get("recovered") for a in replayed if a["type"] == "ack"] == [False, False]
    assert gw.node.broker.history.scanned_total <= 2 * 20_000
    assert (await alice.request("publish", channel="chat.room", data="after"))["type"] == "ack"
    assert gw.node.broker._connection is connection and gw.node.broker.connected
    # What the refused one read is charged: its budget is not spent.
    assert gw.node.replays.in_flight("mallory") == 0


async def test_a_replay_stops_as_soon_as_the_history_is_exceeded(
    gateway: Gateway,
    connect_client: Any,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
) -> None:
    """A replay of a channel with ``history: 3`` reads 4 of its messages, not the stream."""
    await flood_stream(amqp, f"{exchange_prefix}.small", "small.x", 5000)
    mallory = await connect_client("mallory")
    answer = await mallory.request("subscribe", channel="small.x", since=0, timeout=30)
    assert answer["type"] == "ack" and answer["recovered"] is False
    assert gateway.node.broker.history.scanned_total <= 10


async def test_a_replay_past_the_scan_limit_is_not_recovered(
    settings: Settings,
    cleanup_broker: None,
    connect_client: Any,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
) -> None:
    limits = dataclasses.replace(settings.limits, replay_scan_limit=500)
    gw = Gateway(
        dataclasses.replace(settings, limits=limits), load_policy_set(settings.policies_dir)
    )
    await gw.start()
    try:
        await flood_stream(amqp, f"{exchange_prefix}.chat", "chat.other", 3000)
        alice = await connect_client("alice", gw=gw)
        answer = await alice.request("subscribe", channel="chat.quiet", since=0, timeout=30)
        assert answer["type"] == "ack" and answer["recovered"] is False
        assert gw.node.broker.history.scanned_total <= 501
    finally:
        await gw.stop()

"""Replay with `since` and the `recovered` flag (sections 3-4): history lives in
RabbitMQ streams, so it survives a gateway restart and is the same through
every gateway process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

pytestmark = pytest.mark.integration


async def publish_all(client: Any, channel: str, values: list[Any]) -> None:
    for value in values:
        answer = await client.request("publish", channel=channel, data=value)
        assert answer["type"] == "ack", answer


async def test_resubscribing_with_since_replays_exactly_what_was_missed(
    connect_client: Any,
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.r")
    await publish_all(bob, "chat.r", [1, 2, 3])
    seen = await alice.messages_until(3)
    await alice.close()

    await publish_all(bob, "chat.r", [4, 5, 6])
    await publish_all(bob, "chat.other", ["noise"])
    again = await connect_client("alice")
    ack = await again.request("subscribe", channel="chat.r", since=seen[-1]["seq"])
    assert ack["recovered"] is True
    missed = await again.messages_until(3)
    assert [m["data"] for m in missed] == [4, 5, 6]
    assert missed[0]["seq"] > seen[-1]["seq"]
    assert ack["seq"] == missed[-1]["seq"]
    await publish_all(bob, "chat.r", [7])
    live = await again.next_message()
    assert live["data"] == 7
    assert not again.messages, "a message was delivered twice"


async def test_nothing_missed_is_recovered_with_no_messages(connect_client: Any) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.quiet")
    await publish_all(bob, "chat.quiet", ["only"])
    (message,) = await alice.messages_until(1)
    other = await connect_client("alice")
    ack = await other.request("subscribe", channel="chat.quiet", since=message["seq"])
    assert (ack["recovered"], ack["seq"]) == (True, message["seq"])
    await publish_all(bob, "chat.quiet", ["next"])
    assert (await other.next_message())["data"] == "next"
    assert not other.messages


async def test_history_survives_a_gateway_restart(
    settings: Settings, connect_client: Any, gateway: Gateway
) -> None:
    alice = await connect_client("alice")
    await alice.request("subscribe", channel="chat.restart")
    bob = await connect_client("bob")
    await publish_all(bob, "chat.restart", ["before"])
    (last,) = await alice.messages_until(1)
    await gateway.stop()

    second = Gateway(settings, load_policy_set(settings.policies_dir))
    await second.start()
    try:
        carol = await connect_client("carol", gw=second)
        await publish_all(carol, "chat.restart", ["while away 1", "while away 2"])
        back = await connect_client("alice", gw=second)
        ack = await back.request("subscribe", channel="chat.restart", since=last["seq"])
        assert ack["recovered"] is True
        assert [m["data"] for m in await back.messages_until(2)] == ["while away 1", "while away 2"]
    finally:
        await second.stop()


async def test_two_gateway_processes_share_messages_and_numbering(
    settings: Settings, connect_client: Any, gateway: Gateway
) -> None:
    second = Gateway(settings, load_policy_set(settings.policies_dir))
    await second.start()
    try:
        alice = await connect_client("alice")
        bob = await connect_client("bob", gw=second)
        await alice.request("subscribe", channel="chat.both")
        await bob.request("subscribe", channel="chat.both")
        await publish_all(alice, "chat.both", ["from 1"])
        await publish_all(bob, "chat.both", ["from 2"])
        on_first = await alice.messages_until(2)
        on_second = await bob.messages_until(2)
        assert [(m["seq"], m["data"], m["from"]) for m in on_first] == [
            (m["seq"], m["data"], m["from"]) for m in on_second
        ]
        # A client can come back through the other process with the seq it had.
        carol = await connect_client("carol", gw=second)
        ack = await carol.request("subscribe", channel="chat.both", since=on_first[0]["seq"])
        assert ack["recovered"] is True
        assert (await carol.next_message())["data"] == "from 2"
    finally:
        await second.stop()


async def test_a_since_beyond_the_end_of_history_is_not_recovered(connect_client: Any) -> None:
    alice = await connect_client("alice")
    ack = await alice.request("subscribe", channel="chat.future", since=10**12)
    assert ack["recovered"] is False
    bob = await connect_client("bob")
    await publish_all(bob, "chat.future", ["live"])
    assert (await alice.next_message())["data"] == "live"


async def test_a_seq_is_a_position_in_the_exchanges_history(connect_client: Any) -> None:
    """A seq seen on one channel is a valid `since` for another channel of the
    same exchange: it names a point in the shared stream."""
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.x")
    await publish_all(bob, "chat.x", ["x"])
    (x,) = await alice.messages_until(1)
    await publish_all(bob, "chat.y", ["y after x"])
    carol = await connect_client("carol")
    ack = await carol.request("subscribe", channel="chat.y", since=x["seq"])
    assert ack["recovered"] is True
    assert (await carol.next_message())["data"] == "y after x"


async def test_a_subscriber_that_received_nothing_recovers_from_the_ack_seq(
    settings: Settings, connect_client: Any, gateway: Gateway
) -> None:
    """The ack of a first subscribe always carries a usable seq, even on a
    channel that never had a message, so nothing published while the client
    is away (here: during a gateway restart) is lost."""
    alice = await connect_client("alice")
    ack = await alice.request("subscribe", channel="chat.empty")
    assert isinstance(ack["seq"], int)
    await gateway.stop()
    second = Gateway(settings, load_policy_set(settings.policies_dir))
    await second.start()
    try:
        bob = await connect_client("bob", gw=second)
        await publish_all(bob, "chat.empty", ["first ever"])
        back = await connect_client("alice", gw=second)
        again = await back.request("subscribe", channel="chat.empty", since=ack["seq"])
        assert again["recovered"] is True
        assert (await back.next_message())["data"] == "first ever"
    finally:
        await second.stop()


async def test_more_missed_than_the_rule_keeps_is_not_recovered(connect_client: Any) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="small.t")
    await publish_all(bob, "small.t", [0])
    (first,) = await alice.messages_until(1)
    await publish_all(bob, "small.t", [1, 2, 3])  # history: 3 -> still recoverable
    ok = await connect_client("carol")
    assert (await ok.request("subscribe", channel="small.t", since=first["seq"]))["recovered"]
    assert [m["data"] for m in await ok.messages_until(3)] == [1, 2, 3]
    await publish_all(bob, "small.t", [4])  # now 4 missed since `first`
    late = await connect_client("dave")
    ack = await late.request("subscribe", channel="small.t", since=first["seq"])
    assert ack["recovered"] is False
    await publish_all(bob, "small.t", [5])
    # Not recovered: no partial history, only what comes live after the ack.
    assert (await late.next_message())["data"] == 5


async def test_replay_while_publishing_misses_nothing_and_duplicates_nothing(
    connect_client: Any,
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.busy")
    await publish_all(bob, "chat.busy", [0])
    (start,) = await alice.messages_until(1)
    total = 90  # below the rule's history (100): recovery never depends on timing

    async def publish_steadily() -> None:
        for i in range(1, total + 1):
            await bob.send(type="publish", channel="chat.busy", data=i, id=i)
            if i % 10 == 0:
                await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish_steadily())
    await asyncio.sleep(0.05)  # some published before, some during, some after
    carol = await connect_client("carol")
    ack = await carol.request("subscribe", channel="chat.busy", since=start["seq"])
    assert ack["recovered"] is True
    await publisher
    got = await carol.messages_until(total, timeout=20)
    assert [m["data"] for m in got] == list(range(1, total + 1))
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(set(seqs))

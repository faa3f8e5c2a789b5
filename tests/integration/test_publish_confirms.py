"""Publisher confirms: an ack means RabbitMQ confirmed, `unavailable` means it did not.

The confirm timeout measures the broker, not the gateway's event loop: a loop
that was too busy to read a confirm in time must not answer `unavailable`
for a message RabbitMQ has confirmed (the client would retry and publish it
twice). A broker that really confirms nothing still gets `unavailable`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

from .conftest import Client
from .test_chaos import CHAOS_URL, chaos_node, open_client  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

CONFIRM_TIMEOUT = 0.5


@pytest.fixture
async def quick_gateway(settings: Settings, cleanup_broker: None) -> AsyncIterator[Gateway]:
    """A gateway on the main broker whose confirm wait is short."""
    quick = dataclasses.replace(settings, publish_confirm_timeout_seconds=CONFIRM_TIMEOUT)
    gw = Gateway(quick, load_policy_set(settings.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


async def publish_window(
    client: Client, channel: str, count: int, window: int, stall_every: int
) -> dict[int, dict[str, Any]]:
    """Publish 0..count-1 keeping ``window`` unanswered; every ``stall_every``
    publishes, block the whole event loop (gateway included) for four confirm
    timeouts, while publishes are on their way to RabbitMQ."""
    answers: dict[int, dict[str, Any]] = {}
    room = asyncio.Semaphore(window)

    async def read() -> None:
        while len(answers) < count:
            frame = await client.recv(timeout=30)
            if frame["type"] in ("ack", "error"):
                answers[int(frame["id"])] = frame
                room.release()

    reader = asyncio.create_task(read())
    for i in range(count):
        await room.acquire()
        await client.send(type="publish", id=str(i), channel=channel, data=i)
        if i % stall_every == stall_every - 1:
            await asyncio.sleep(0.002)  # the gateway reads and forwards some of them
            time.sleep(CONFIRM_TIMEOUT * 4)  # noqa: ASYNC251 - the point: a stalled loop
    await asyncio.wait_for(reader, 60)
    return answers


def chaos_node_pid() -> int:
    """The OS process of the throwaway RabbitMQ node (scripts/chaos-broker)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "-n", "rgchaos@localhost", "eval", "os:getpid()."],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return int(out.strip().strip('"'))


async def test_a_stalled_event_loop_does_not_turn_confirms_into_unavailable(
    quick_gateway: Gateway, make_token: Any, client_ssl: Any
) -> None:
    port = quick_gateway.port
    alice = await open_client(port, make_token("alice"), client_ssl)
    bob = await open_client(port, make_token("bob"), client_ssl)
    assert (await alice.request("subscribe", channel="chat.stall"))["type"] == "ack"

    answers = await publish_window(bob, "chat.stall", count=240, window=32, stall_every=40)

    refused = {i: frame for i, frame in answers.items() if frame["type"] != "ack"}
    assert refused == {}, "a publish RabbitMQ confirmed was answered unavailable"
    received = [message["data"] for message in await alice.messages_until(240, timeout=30)]
    assert received == list(range(240)), "lost, duplicated or reordered"


async def test_a_broker_that_confirms_nothing_gets_unavailable(
    settings: Settings,
    chaos_node: None,  # noqa: F811  (the fixture imported above)
    make_token: Any,
    client_ssl: Any,
) -> None:
    stalled = dataclasses.replace(
        settings, amqp_url=CHAOS_URL, publish_confirm_timeout_seconds=CONFIRM_TIMEOUT
    )
    gw = Gateway(stalled, load_policy_set(settings.policies_dir))
    await gw.start()
    beam = chaos_node_pid()
    try:
        bob = await open_client(gw.port, make_token("bob"), client_ssl)
        assert (await bob.request("publish", channel="chat.frozen", data="before"))["type"] == "ack"
        # Frozen, not gone: the TCP connection stays up, nothing is answered.
        os.kill(beam, signal.SIGSTOP)
        try:
            answer = await bob.request("publish", channel="chat.frozen", data="lost?", timeout=30)
        finally:
            os.kill(beam, signal.SIGCONT)
        assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        # The broker is back: publishing works again on the same connection.
        # Retried on `unavailable`, as the contract lets clients do: a broker
        # just thawed can take longer than the 0.5 s confirm timeout for the
        # first publishes on a loaded machine, and that is not what this tests.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            after = await bob.request("publish", channel="chat.frozen", data="after", timeout=30)
            if after.get("code") != "unavailable" or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        assert after["type"] == "ack", after
    finally:
        await gw.stop()

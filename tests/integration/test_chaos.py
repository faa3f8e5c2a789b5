"""Chaos: RabbitMQ stops and starts, a gateway process is killed, client
connections are cut at random. Each time, every message acked to a publisher
reaches every subscriber exactly once and in order (or the subscriber is told
`recovered: false`).

The broker outage runs on a second, throwaway RabbitMQ node (port 5673,
scripts/chaos-broker), so it never disturbs the main broker."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

from .conftest import Client
from .processes import GatewayProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHAOS_URL = "amqp://guest:guest@127.0.0.1:5673/"


def chaos_broker(command: str) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "chaos-broker"), command], check=True, timeout=120
    )


@pytest.fixture(scope="module")
def chaos_node() -> Iterator[None]:
    chaos_broker("start")
    yield
    chaos_broker("stop")


@pytest.fixture
async def chaos_gateway(settings: Settings, chaos_node: None) -> AsyncIterator[Gateway]:
    chaos_settings = dataclasses.replace(
        settings, amqp_url=CHAOS_URL, publish_confirm_timeout_seconds=2.0
    )
    gw = Gateway(chaos_settings, load_policy_set(settings.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


async def open_client(port: int, token: str, tls: ssl.SSLContext) -> Client:
    ws = await connect(
        f"wss://localhost:{port}/ws",
        ssl=tls,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_queue=None,
    )
    client = Client(ws)
    assert (await client.recv())["type"] == "welcome"
    return client


def assert_exactly_once_in_order(received: list[Any], acked: list[int]) -> None:
    assert len(received) == len(set(received)), "a message was delivered twice"
    delivered_acked = [value for value in received if value in set(acked)]
    assert delivered_acked == sorted(acked), "an acked message is missing or out of order"


async def test_a_broker_outage_loses_no_acked_message(
    chaos_gateway: Gateway, make_token: Any, client_ssl: ssl.SSLContext
) -> None:
    port = chaos_gateway.port
    alice = await open_client(port, make_token("alice"), client_ssl)
    bob = await open_client(port, make_token("bob"), client_ssl)
    assert (await alice.request("subscribe", channel="chat.chaos"))["type"] == "ack"
    acked: list[int] = []
    unavailable: list[int] = []

    async def publish(count: int) -> None:
        for i in range(count):
            answer = await bob.request("publish", channel="chat.chaos", data=i, timeout=10)
            if answer["type"] == "ack":
                acked.append(i)
            else:
                assert answer["code"] == "unavailable", answer
                unavailable.append(i)
            await asyncio.sleep(0.01)

    publishing = asyncio.create_task(publish(400))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(chaos_broker, "stop_app")
    await asyncio.sleep(2.0)
    await asyncio.to_thread(chaos_broker, "start_app")
    await publishing
    assert unavailable, "the outage was not noticed: no publish was refused"
    # Once the gateway is back on the broker, publishing works again.
    for _ in range(300):
        if chaos_gateway.node.broker.connected:
            break
        await asyncio.sleep(0.1)
    final = await bob.request("publish", channel="chat.chaos", data="end", timeout=10)
    assert final["type"] == "ack", final

    received: list[Any] = []
    while not received or received[-1] != "end":
        received.append((await alice.next_message(timeout=15))["data"])
    assert_exactly_once_in_order(received[:-1], acked)


async def test_clients_move_to_another_gateway_when_one_is_killed(
    settings: Settings,
    tmp_path: Path,
    make_token: Any,
    client_ssl: ssl.SSLContext,
    cleanup_broker: None,
) -> None:
    first = GatewayProcess(settings, tmp_path).start()
    second = GatewayProcess(settings, tmp_path).start()
    try:
        alice = await open_client(first.port, make_token("alice"), client_ssl)
        bob = await open_client(second.port, make_token("bob"), client_ssl)
        await alice.request("subscribe", channel="chat.failover")
        acked: list[int] = []

        async def publish(values: range) -> None:
            for i in values:
                if (await bob.request("publish", channel="chat.failover", data=i))["type"] == "ack":
                    acked.append(i)

        await publish(range(0, 30))
        seen = await alice.messages_until(30)
        first.kill()  # kill -9: no goodbye to anyone
        await publish(range(30, 60))  # while alice is away
        alice = await open_client(second.port, make_token("alice"), client_ssl)
        ack = await alice.request("subscribe", channel="chat.failover", since=seen[-1]["seq"])
        assert ack["recovered"] is True
        await publish(range(60, 80))
        rest = await alice.messages_until(50)
        assert_exactly_once_in_order([m["data"] for m in seen + rest], acked)
    finally:
        first.stop()
        second.stop()


async def test_random_connection_cuts_lose_nothing(
    gateway: Gateway, make_token: Any, client_ssl: ssl.SSLContext
) -> None:
    rng = random.Random(7)
    bob = await open_client(gateway.port, make_token("bob"), client_ssl)
    total = 300
    acked: list[int] = []

    async def publish() -> None:
        for i in range(total):
            if (await bob.request("publish", channel="chat.cuts", data=i))["type"] == "ack":
                acked.append(i)
            await asyncio.sleep(0.004)

    received: list[Any] = []
    last_seq: int | None = None
    cuts = 0
    alice = await open_client(gateway.port, make_token("alice"), client_ssl)
    await alice.request("subscribe", channel="chat.cuts")
    publishing = asyncio.create_task(publish())
    while True:
        deadline = asyncio.get_running_loop().time() + rng.uniform(0.05, 0.25)
        try:
            while asyncio.get_running_loop().time() < deadline:
                message = await alice.next_message(
                    timeout=deadline - asyncio.get_running_loop().time()
                )
                received.append(message["data"])
                last_seq = message["seq"]
        except TimeoutError:
            pass
        if publishing.done() and len(set(received)) >= len(acked):
            break
        alice.ws.transport.abort()  # the network drops: no close frame
        cuts += 1
        alice = await open_client(gateway.port, make_token("alice"), client_ssl)
        fields: dict[str, Any] = {"channel": "chat.cuts"}
        if last_seq is not None:
            fields["since"] = last_seq
        ack = await alice.request("subscribe", **fields)
        assert ack.get("recovered", True) is True, ack
    await publishing
    assert cuts >= 3
    assert_exactly_once_in_order(received, acked)

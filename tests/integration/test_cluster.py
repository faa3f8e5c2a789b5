"""A three-node RabbitMQ cluster (scripts/cluster: rgc1-3 on 5681-5683) under
gateways that were given all three URLs: a node killed with -9, every node
restarted in turn, a cluster that lost its majority. Each time, every message
acked to a publisher reaches every subscriber exactly once, in order.

The cluster runs beside the main broker (5672), which these tests never touch.
History streams are replicated to all three nodes (x-initial-cluster-size 3,
the default for three URLs), so a publish is confirmed once a majority holds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

from .conftest import Client
from .processes import GatewayProcess
from .test_workers import open_client

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
NODES = {1: 5681, 2: 5682, 3: 5683}
CLUSTER_URL = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in NODES.values())


def cluster(*command: str) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "cluster"), *command], check=True, timeout=180)


async def streams_work(url: str, timeout: float = 90) -> None:
    """Until a replicated stream can be declared: a new cluster's stream
    coordinator forms a little after its nodes have joined."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    arguments = {"x-queue-type": "stream", "x-initial-cluster-size": 3}
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
            try:
                channel = await connection.channel()
                await channel.declare_queue("rgtest.probe", durable=True, arguments=arguments)
                await channel.queue_delete("rgtest.probe")
                return
            finally:
                await connection.close()
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(1)


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[str]:
    cluster("start")
    asyncio.run(streams_work(CLUSTER_URL.split(",")[0]))
    yield CLUSTER_URL
    cluster("stop")


@pytest.fixture
def cluster_settings(settings: Settings, rabbit_cluster: str) -> Settings:
    return dataclasses.replace(
        settings,
        amqp_url=rabbit_cluster,
        publish_confirm_timeout_seconds=3.0,
        broker_connect_timeout_seconds=30,
    )


@pytest.fixture
async def cluster_cleanup(exchange_prefix: str, rabbit_cluster: str) -> AsyncIterator[None]:
    yield
    for url in rabbit_cluster.split(","):
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception:
            continue
        try:
            for kind in ("chat", "notify", "feeds", "news", "small"):
                channel = await connection.channel()
                await channel.queue_delete(f"rabbitgate.stream.{exchange_prefix}.{kind}")
                await channel.exchange_delete(f"{exchange_prefix}.{kind}")
                await channel.close()
        finally:
            await connection.close()
        return


@pytest.fixture
async def cluster_gateway(
    cluster_settings: Settings, cluster_cleanup: None
) -> AsyncIterator[Gateway]:
    gw = Gateway(cluster_settings, load_policy_set(cluster_settings.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


def node_of(url: str) -> int:
    port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
    return next(n for n, p in NODES.items() if p == port)


def connected_node(log: Path) -> int:
    """The node a gateway process last connected to, from its log."""
    found = re.findall(
        r"connected to RabbitMQ [^\"]*?at amqp://guest:\*\*\*@127\.0\.0\.1:(\d+)/", log.read_text()
    )
    assert found, log.read_text()[-2000:]
    return next(n for n, p in NODES.items() if p == int(found[-1]))


class Publisher:
    """Publishes values in order through a gateway, recording each answer."""

    def __init__(self, client: Client, channel: str, tag: str) -> None:
        self.client, self.channel, self.tag = client, channel, tag
        self.acked: list[str] = []
        self.unavailable: list[str] = []

    async def run(self, count: int, pause: float = 0.01) -> None:
        for i in range(count):
            value = f"{self.tag}{i}"
            answer = await self.client.request(
                "publish", channel=self.channel, data=value, timeout=15
            )
            if answer["type"] == "ack":
                self.acked.append(value)
            else:
                assert answer["code"] == "unavailable", answer
                self.unavailable.append(value)
            await asyncio.sleep(pause)


async def receive_frames(
    client: Client, wanted: set[str], timeout: float = 40
) -> list[dict[str, Any]]:
    """Message frames until every value of ``wanted`` has come (or the timeout)."""
    frames: list[dict[str, Any]] = []
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not wanted <= seen:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            frame = await client.next_message(timeout=left)
        except TimeoutError:
            break
        frames.append(frame)
        seen.add(frame["data"])
    return frames


async def subscribe_when_ready(
    client: Client, channel: str, since: int | None = None, timeout: float = 60
) -> dict[str, Any]:
    """The first subscribe of a test, retried while the broker answers ``unavailable``.

    A cluster that was just started may not yet have a stream coordinator to
    place a new replicated stream, and a stream whose leader was on a killed
    node is unreadable until a replica is elected (RabbitMQ refuses the read
    meanwhile); the contract says the client may retry on ``unavailable``, as
    the client libraries do. What the tests check is what the ack then says.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    fields: dict[str, Any] = {"channel": channel}
    if since is not None:
        fields["since"] = since
    while True:
        answer = await client.request("subscribe", timeout=15, **fields)
        if answer["type"] == "ack":
            return answer
        assert answer.get("code") == "unavailable", answer
        assert loop.time() < deadline, f"the cluster never took the subscribe: {answer}"
        await asyncio.sleep(1.0)


async def receive_all(client: Client, wanted: set[str], timeout: float = 40) -> list[str]:
    return [frame["data"] for frame in await receive_frames(client, wanted, timeout)]


def assert_every_acked_once_in_order(received: list[str], publishers: list[Publisher]) -> None:
    assert len(received) == len(set(received)), "a message was delivered twice"
    for publisher in publishers:
        acked = set(publisher.acked)
        mine = [value for value in received if value in acked]
        assert mine == publisher.acked, (
            f"{publisher.tag}: an acked message is missing or out of order"
        )
        published = acked | set(publisher.unavailable)
        stray = [v for v in received if v.startswith(publisher.tag) and v not in published]
        assert not stray, stray


async def test_killing_the_node_a_gateway_uses_loses_no_acked_message(
    cluster_settings: Settings,
    tmp_path: Path,
    make_token: Any,
    client_ssl: ssl.SSLContext,
    cluster_cleanup: None,
) -> None:
    first = GatewayProcess(cluster_settings, tmp_path).start(timeout=40)
    second = GatewayProcess(cluster_settings, tmp_path).start(timeout=40)
    victim = connected_node(first.log)
    try:
        alice = await open_client(first.port, make_token("alice"), client_ssl)
        carol = await open_client(second.port, make_token("carol"), client_ssl)
        for subscriber in (alice, carol):
            await subscribe_when_ready(subscriber, "chat.kill")
        bob = Publisher(
            await open_client(first.port, make_token("bob"), client_ssl), "chat.kill", "b"
        )
        dave = Publisher(
            await open_client(second.port, make_token("dave"), client_ssl), "chat.kill", "d"
        )
        running = [asyncio.create_task(p.run(250)) for p in (bob, dave)]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster, "kill", str(victim))
        try:
            await asyncio.gather(*running)
        finally:
            # The node comes back for the next tests (it rejoins from its data dir).
            await asyncio.to_thread(cluster, "start_node", str(victim))
        assert bob.acked and dave.acked
        assert connected_node(first.log) != victim, "the gateway did not move to another node"
        wanted = set(bob.acked) | set(dave.acked)
        frames = await receive_frames(alice, wanted)
        assert_every_acked_once_in_order([f["data"] for f in frames], [bob, dave])
        assert_every_acked_once_in_order(await receive_all(carol, wanted), [bob, dave])
        # A subscriber that comes back later resumes from the stream's replicas
        # (the channel's history is 100 messages: resume 50 back).
        erin = await open_client(second.port, make_token("erin"), client_ssl)
        since = frames[-51]["seq"]
        ack = await subscribe_when_ready(erin, "chat.kill", since=since)
        assert ack["type"] == "ack" and ack["recovered"] is True, ack
        replayed = await erin.messages_until(50, timeout=15)
        assert [f["data"] for f in replayed] == [f["data"] for f in frames[-50:]]
    finally:
        first.stop()
        second.stop()


async def test_a_rolling_restart_of_every_node_loses_no_acked_message(
    cluster_gateway: Gateway, make_token: Any, client_ssl: ssl.SSLContext
) -> None:
    alice = await open_client(cluster_gateway.port, make_token("alice"), client_ssl)
    await subscribe_when_ready(alice, "chat.rolling")
    bob = Publisher(
        await open_client(cluster_gateway.port, make_token("bob"), client_ssl), "chat.rolling", "r"
    )
    publishing = asyncio.create_task(bob.run(100_000, pause=0.02))
    moves = []
    try:
        for node in NODES:
            await asyncio.sleep(1.0)
            moves.append(node_of(cluster_gateway.node.broker._url))
            await asyncio.to_thread(cluster, "stop_node", str(node))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(cluster, "start_node", str(node))
        await asyncio.sleep(2.0)
        moves.append(node_of(cluster_gateway.node.broker._url))
    finally:
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing
    assert len(bob.acked) > 100
    assert len(set(moves)) >= 2, f"the gateway never moved: {moves}"
    received = await receive_all(alice, set(bob.acked))
    assert_every_acked_once_in_order(received, [bob])
    assert cluster_gateway.node.broker.connected


async def test_a_cluster_without_a_majority_answers_unavailable_never_hangs(
    cluster_gateway: Gateway, make_token: Any, client_ssl: ssl.SSLContext
) -> None:
    alice = await open_client(cluster_gateway.port, make_token("alice"), client_ssl)
    await subscribe_when_ready(alice, "chat.quorum")
    bob = await open_client(cluster_gateway.port, make_token("bob"), client_ssl)
    assert (await bob.request("publish", channel="chat.quorum", data="before"))["type"] == "ack"
    keep = node_of(cluster_gateway.node.broker._url)
    others = [n for n in NODES if n != keep]
    try:
        for node in others:
            await asyncio.to_thread(cluster, "stop_node", str(node))
        answers = []
        for i in range(5):
            # Within the confirm timeout (3 s) and a margin, never a hang.
            answer = await bob.request("publish", channel="chat.quorum", data=f"q{i}", timeout=10)
            answers.append(answer["type"] if answer["type"] == "ack" else answer["code"])
        assert answers[-1] == "unavailable", answers
    finally:
        for node in others:
            await asyncio.to_thread(cluster, "start_node", str(node))
    for _ in range(300):
        answer = await bob.request("publish", channel="chat.quorum", data="after", timeout=10)
        if answer["type"] == "ack":
            break
        await asyncio.sleep(0.2)
    assert answer["type"] == "ack", answer
    received = await receive_all(alice, {"before", "after"})
    assert received[0] == "before" and received[-1] == "after"
    assert len(received) == len(set(received))

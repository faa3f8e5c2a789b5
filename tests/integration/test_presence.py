"""Presence end to end (spec section 11, docs/presence.md): real TLS gateways, real
tokens, the real RabbitMQ and Redis. Two Gateway instances (or a served process
killed with SIGKILL) share one Redis, so presence must be exact across them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_fixtures import Client, ConnectFn
from websockets.asyncio.client import connect

from gateway.app import Gateway
from gateway.config import LimitSettings, Settings
from gateway.policy.rules import load_policy_set
from tests.integration.processes import GatewayProcess

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"

POLICY = """
version: 1
rules:
  - channel: "room.{{name}}"
    exchange: {p}.rooms
    subscribe: [role:member]
    publish: [role:member]
    presence: [role:member]
    presence_events: true
  - channel: "quiet.{{name}}"
    exchange: {p}.quiet
    subscribe: [anyone]
    publish: [anyone]
    presence: [role:member]
  - channel: "secret.{{name}}"
    exchange: {p}.secret
    subscribe: [anyone]
    publish: [anyone]
"""


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-presence.yaml").write_text(POLICY.format(p=exchange_prefix))
    return folder


@pytest.fixture
def redis_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, redis_url=REDIS_URL)


@pytest.fixture
async def two_gateways(
    redis_settings: Settings, cleanup_broker: None
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    made = []
    for _ in range(2):
        gw = Gateway(redis_settings, load_policy_set(redis_settings.policies_dir))
        await gw.start()
        made.append(gw)
    yield made[0], made[1]
    for gw in made:
        await gw.stop()


async def presence(client: Client, channel: str) -> dict[str, Any]:
    await client.send(type="presence", id="p", channel=channel)
    while True:
        frame = await client.recv()
        if frame.get("id") == "p":
            return frame
        client.other.append(frame)


async def next_of(
    client: Client, kinds: set[str], user: str | None = None, timeout: float = 10
) -> dict[str, Any]:
    def wanted(frame: dict[str, Any]) -> bool:
        return frame["type"] in kinds and (user is None or frame.get("user") == user)

    for i, frame in enumerate(client.other):
        if wanted(frame):
            return client.other.pop(i)
    while True:
        frame = await client.recv(timeout)
        if wanted(frame):
            return frame
        client.other.append(frame)


async def eventually_count(client: Client, channel: str, count: int) -> dict[str, Any]:
    for _ in range(200):
        answer = await presence(client, channel)
        if answer.get("count") == count:
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError(f"presence of {channel} never reached {count}: {answer}")


async def test_presence_is_exact_and_events_cross_two_gateways(
    two_gateways: tuple[Gateway, Gateway], connect_client: ConnectFn
) -> None:
    one, two = two_gateways
    alice = await connect_client("alice", gw=one)
    bob = await connect_client("bob", gw=two)
    assert (await alice.request("subscribe", channel="room.a"))["type"] == "ack"
    answer = await eventually_count(bob, "room.a", 1)
    assert answer["type"] == "presence" and answer["channel"] == "room.a"
    assert answer["clients"] == [{"user": "alice", "session": alice.welcome["session"]}]  # type: ignore[attr-defined]

    assert (await bob.request("subscribe", channel="room.a"))["type"] == "ack"
    # alice (on the other process) is told bob joined.
    join = await next_of(alice, {"join"}, user="bob")
    assert join == {
        "type": "join",
        "channel": "room.a",
        "user": "bob",
        "session": bob.welcome["session"],  # type: ignore[attr-defined]
    }
    both = await eventually_count(alice, "room.a", 2)
    assert sorted(c["user"] for c in both["clients"]) == ["alice", "bob"]

    await bob.request("unsubscribe", channel="room.a")
    leave = await next_of(alice, {"leave"}, user="bob")
    assert leave["user"] == "bob" and leave["channel"] == "room.a"
    await eventually_count(alice, "room.a", 1)
    await bob.close()


async def test_no_events_without_presence_events_and_forbidden_reveals_nothing(
    two_gateways: tuple[Gateway, Gateway], connect_client: ConnectFn
) -> None:
    one, two = two_gateways
    alice = await connect_client("alice", gw=one)
    guest = await connect_client("guest", gw=two, roles=())
    await alice.request("subscribe", channel="secret.full")
    await alice.request("subscribe", channel="quiet.q")
    await guest.request("subscribe", channel="quiet.q")
    # The same answer for a channel with a subscriber, one without, and one with no rule.
    answers = [await presence(guest, c) for c in ("secret.full", "secret.empty", "nothing.here")]
    assert [a["code"] for a in answers] == ["forbidden"] * 3
    assert {a["message"].split(" of ")[0] for a in answers} == {"not allowed to see presence"}
    member_view = await presence(alice, "secret.full")
    assert member_view["code"] == "forbidden"  # presence defaults to nobody
    counted = await eventually_count(alice, "quiet.q", 2)
    assert counted["count"] == 2
    # quiet.* has no presence_events: a ping round trip shows no join came first.
    assert (await alice.request("ping"))["type"] == "pong"
    assert not [f for f in alice.other if f["type"] in ("join", "leave", "presence_changed")]


async def test_at_most_1000_listed_with_an_exact_count_and_churn_coalesced(
    redis_settings: Settings, connect_client: ConnectFn, gateway: Gateway
) -> None:
    # Many subscribers on one process (the node's own path, as a transport uses it),
    # one real client watching from a second process.
    other = Gateway(redis_settings, load_policy_set(redis_settings.policies_dir))
    await other.start()
    try:
        watcher = await connect_client("watcher", gw=other)
        await watcher.request("subscribe", channel="room.big")
        node = other.node
        fakes = [FakeSubscriber(f"user{i}", f"s{i:05d}") for i in range(1_200)]
        for fake in fakes:
            node.presence.joined(other_exchange(node, "room.big"), "room.big", fake.id, fake.user)
        answer = await eventually_count(watcher, "room.big", 1_201)
        assert len(answer["clients"]) == 1_000
        # 1,200 joins in one tick: one presence_changed frame, not 1,200 joins.
        changed = await next_of(watcher, {"presence_changed"})
        assert changed["type"] == "presence_changed", changed
        assert changed["joined"] + changed["left"] > 20
        assert not [f for f in watcher.other if f["type"] == "join" and f["user"] != "watcher"]
    finally:
        await other.stop()


@dataclasses.dataclass(frozen=True)
class FakeSubscriber:
    user: str
    id: str


def other_exchange(node: Any, channel: str) -> str:
    found = node.policies.rule_for(channel)
    assert found is not None
    return str(found[0].exchange)


async def test_redis_down_answers_unavailable_while_publishes_go_on(
    settings: Settings, connect_client: ConnectFn, cleanup_broker: None, tmp_path: Path
) -> None:
    # A Redis that accepts connections and never answers (the worst kind of down).
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    down = dataclasses.replace(
        settings,
        redis_url=f"redis://127.0.0.1:{port}/0",
        limits=LimitSettings(auth_timeout_seconds=1.0, redis_timeout_seconds=0.2),
    )
    gw = Gateway(down, load_policy_set(down.policies_dir))
    await gw.start()
    try:
        alice = await connect_client("alice", gw=gw)
        assert (await alice.request("subscribe", channel="room.r"))["type"] == "ack"
        answer = await asyncio.wait_for(presence(alice, "room.r"), 5)
        assert answer["type"] == "error" and answer["code"] == "unavailable"
        ack = await alice.request("publish", channel="room.r", data={"n": 1})
        assert ack["type"] == "ack"
        message = await alice.next_message()
        assert message["data"] == {"n": 1}
    finally:
        await gw.stop()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_presence_requests_are_rate_limited(
    gateway: Gateway, connect_client: ConnectFn
) -> None:
    alice = await connect_client("alice")
    answers = [
        await presence(alice, "room.x") for _ in range(gateway.settings.limits.presence_burst + 3)
    ]
    kinds = [a["type"] if a["type"] != "error" else a["code"] for a in answers]
    assert kinds[0] == "presence" and kinds[-1] == "rate_limited", kinds


async def test_sse_streams_get_join_and_leave_events(
    gateway: Gateway,
    connect_client: ConnectFn,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    async with aiohttp.ClientSession() as http:
        response = await http.get(
            f"https://localhost:{gateway.sse_port}/events",
            params=[("channel", "room.sse")],
            headers={"Authorization": f"Bearer {make_token('streamer')}"},
            ssl=client_ssl,
        )
        assert response.status == 200
        bob = await connect_client("bob")
        await bob.request("subscribe", channel="room.sse")
        text = ""
        while "event: join" not in text or '"user":"bob"' not in text:
            chunk = await asyncio.wait_for(response.content.readany(), 10)
            assert chunk, text
            text += chunk.decode()
        assert '"type":"join","channel":"room.sse"' in text
        response.close()


async def test_a_killed_gateway_process_disappears_from_presence(
    redis_settings: Settings,
    connect_client: ConnectFn,
    gateway: Gateway,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITGATE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("RABBITGATE_PRESENCE_TTL_SECONDS", "2")
    monkeypatch.setenv("RABBITGATE_STREAM_MAX_BYTES", str(redis_settings.stream_max_bytes))
    served = GatewayProcess(redis_settings, tmp_path).start()
    try:
        ws = await connect(
            f"wss://localhost:{served.port}/ws",
            ssl=client_ssl,
            additional_headers={"Authorization": f"Bearer {make_token('doomed')}"},
            subprotocols=["rabbitgate.v1"],
        )
        doomed = Client(ws)
        assert (await doomed.recv())["type"] == "welcome"
        assert (await doomed.request("subscribe", channel="room.k"))["type"] == "ack"
        other = Gateway(redis_settings, load_policy_set(redis_settings.policies_dir))
        await other.start()
        try:
            watcher = await connect_client("watcher", gw=other)
            await eventually_count(watcher, "room.k", 1)
            served.kill()  # SIGKILL: no clean stop, its entries must lapse
            answer = await eventually_count(watcher, "room.k", 0)
            assert answer["clients"] == []
        finally:
            await other.stop()
    finally:
        served.stop()


async def test_the_python_client_lists_presence_and_hears_join_and_leave(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> None:
    from rabbitgate_client import PresenceEvent, RabbitgateClient, RabbitgateError

    heard: list[PresenceEvent] = []
    url = f"wss://localhost:{gateway.port}/ws"
    async with (
        RabbitgateClient(
            url,
            token=make_token("alice"),
            ssl=client_ssl,
            on_message=lambda m: None,
            on_join=heard.append,
            on_leave=heard.append,
        ) as alice,
        RabbitgateClient(url, token=make_token("bob"), ssl=client_ssl) as bob,
    ):
        await alice.subscribe("room.py")
        await bob.subscribe("room.py")
        info = await alice.presence("room.py")
        assert info.count == 2
        assert sorted(user for user, _ in info.clients) == ["alice", "bob"]

        async def heard_of(kind: str) -> None:
            for _ in range(200):
                if any(e.kind == kind and e.user == "bob" for e in heard):
                    return
                await asyncio.sleep(0.05)

        # A join and a leave within one tick net out: wait for the join first.
        await heard_of("join")
        await bob.unsubscribe("room.py")
        await heard_of("leave")
        kinds = [(e.kind, e.user) for e in heard if e.user == "bob"]
        assert kinds == [("join", "bob"), ("leave", "bob")]
        with pytest.raises(RabbitgateError) as refused:
            await alice.presence("secret.x")
        assert refused.value.code == "forbidden"


async def test_a_gateway_that_stops_cleanly_leaves_at_once_and_says_so(
    two_gateways: tuple[Gateway, Gateway], connect_client: ConnectFn, redis_settings: Settings
) -> None:
    one, _ = two_gateways
    third = Gateway(redis_settings, load_policy_set(redis_settings.policies_dir))
    await third.start()
    watcher = await connect_client("watcher", gw=one)
    await watcher.request("subscribe", channel="room.stop")
    leaving = await connect_client("leaving", gw=third)
    await leaving.request("subscribe", channel="room.stop")
    await next_of(watcher, {"join"}, user="leaving")
    await third.stop()
    leave = await next_of(watcher, {"leave"}, user="leaving")
    assert leave["channel"] == "room.stop"
    answer = await presence(watcher, "room.stop")
    assert answer["count"] == 1 and [c["user"] for c in answer["clients"]] == ["watcher"]


async def test_stomp_subscribers_count_and_get_join_and_leave_as_x_event_messages(
    gateway: Gateway,
    connect_client: ConnectFn,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    import orjson

    from tests.integration.stomp_wire import frame, open_wire

    stomp = await open_wire(gateway.port, client_ssl)
    assert (await stomp.connect(make_token("stella"))).command == "CONNECTED"
    await stomp.send(frame("SUBSCRIBE", id="sub-0", destination="/topic/room.st", receipt="r1"))
    assert (await stomp.recv()).command == "RECEIPT"
    bob = await connect_client("bob")
    await bob.request("subscribe", channel="room.st")
    answer = await eventually_count(bob, "room.st", 2)
    assert sorted(c["user"] for c in answer["clients"]) == ["bob", "stella"]
    events = []
    while not any(e["user"] == "bob" for e in events):
        message = await stomp.until("MESSAGE", timeout=10)
        assert message.headers["subscription"] == "sub-0"
        assert message.headers["destination"] == "/topic/room.st"
        assert message.headers["x-event"] == "join"
        events.append(orjson.loads(message.body))
    assert events[-1] == {
        "type": "join",
        "channel": "room.st",
        "user": "bob",
        "session": bob.welcome["session"],  # type: ignore[attr-defined]
    }
    await bob.request("unsubscribe", channel="room.st")
    leave = await stomp.until("MESSAGE", timeout=10)
    assert leave.headers["x-event"] == "leave" and orjson.loads(leave.body)["user"] == "bob"
    await stomp.ws.close()

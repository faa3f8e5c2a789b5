"""The STOMP presence request (docs/stomp.md "Presence", docs/presence.md "STOMP"):
``SUBSCRIBE`` to ``/presence/<channel>``, answered by one ``MESSAGE`` on that
subscription. Real TLS gateways, real tokens, the real RabbitMQ and Redis
(two Gateway instances sharing it), STOMP frames written by hand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from gateway_fixtures import ConnectFn

from gateway.app import Gateway
from gateway.config import LimitSettings, Settings
from gateway.policy.rules import load_policy_set
from tests.integration.stomp_wire import ServerFrame, StompWire, frame, open_wire
from tests.integration.test_presence import (
    POLICY,
    REDIS_URL,
    FakeSubscriber,
    eventually_count,
    other_exchange,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-presence.yaml").write_text(POLICY.format(p=exchange_prefix))
    return folder


@pytest.fixture
async def two_gateways(
    settings: Settings, cleanup_broker: None
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    shared = dataclasses.replace(settings, redis_url=REDIS_URL)
    made = []
    for _ in range(2):
        gw = Gateway(shared, load_policy_set(shared.policies_dir))
        await gw.start()
        made.append(gw)
    yield made[0], made[1]
    for gw in made:
        await gw.stop()


@pytest.fixture
def stomp_client(client_ssl: ssl.SSLContext, make_token: Callable[..., str]) -> Callable[..., Any]:
    async def connect(gw: Gateway, sub: str, **token_args: Any) -> StompWire:
        wire = await open_wire(gw.port, client_ssl)
        answer = await wire.connect(make_token(sub, **token_args), heart_beat="0,0")
        assert answer.command == "CONNECTED", (answer.headers, answer.body)
        return wire

    return connect


async def ask(wire: StompWire, channel: str, sub_id: str = "p-0") -> list[ServerFrame]:
    """A presence request with a receipt: the frames up to its RECEIPT (or an ERROR)."""
    await wire.send(
        frame("SUBSCRIBE", id=sub_id, destination=f"/presence/{channel}", receipt=f"r-{sub_id}")
    )
    got = []
    while not got or got[-1].command not in ("RECEIPT", "ERROR"):
        got.append(await wire.recv(timeout=10))
    return got


async def answer_of(wire: StompWire, channel: str, sub_id: str = "p-0") -> dict[str, Any]:
    *messages, receipt = await ask(wire, channel, sub_id)
    assert receipt.command == "RECEIPT", (receipt.headers, receipt.body)
    assert receipt.headers["receipt-id"] == f"r-{sub_id}"
    (message,) = [m for m in messages if m.headers.get("subscription") == sub_id]
    assert message.command == "MESSAGE"
    assert message.headers["destination"] == f"/presence/{channel}"
    assert message.headers["x-event"] == "presence"
    assert message.headers["content-type"] == "application/json"
    answer: dict[str, Any] = orjson.loads(message.body)
    return answer


async def eventually_stomp_count(wire: StompWire, channel: str, count: int) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    for n in range(40):
        answer = await answer_of(wire, channel, f"p-{n}")
        if answer["count"] == count:
            return answer
        await asyncio.sleep(0.5)  # no faster than the presence rate limit refills (2/s)
    raise AssertionError(f"presence of {channel} never reached {count}: {answer}")


async def test_the_answer_counts_every_subscriber_on_both_gateways(
    two_gateways: tuple[Gateway, Gateway],
    stomp_client: Callable[..., Any],
    connect_client: ConnectFn,
) -> None:
    one, two = two_gateways
    stella: StompWire = await stomp_client(one, "stella")
    await stella.send(frame("SUBSCRIBE", id="sub-0", destination="/topic/room.q", receipt="s"))
    assert (await stella.recv()).command == "RECEIPT"
    bob = await connect_client("bob", gw=two)  # a JSON client on the other process
    assert (await bob.request("subscribe", channel="room.q"))["type"] == "ack"
    answer = await eventually_stomp_count(stella, "room.q", 2)
    # The JSON protocol's answer, without its id (the subscription header ties it).
    assert set(answer) == {"type", "channel", "count", "clients"}
    assert answer["type"] == "presence" and answer["channel"] == "room.q"
    assert sorted(c["user"] for c in answer["clients"]) == ["bob", "stella"]
    json_view = await eventually_count(bob, "room.q", 2)
    assert sorted(map(orjson.dumps, json_view["clients"])) == sorted(
        map(orjson.dumps, answer["clients"])
    )
    # The conversation goes on: the presence request made no subscription, so
    # the same id asks again, and messages still flow on sub-0.
    again = await answer_of(stella, "room.q", "p-0")
    assert again["count"] == 2
    await stella.send(frame("SEND", "hi", destination="/topic/room.q", receipt="sent"))
    got = [await stella.recv(), await stella.recv()]
    message = next(f for f in got if f.command == "MESSAGE" and "x-seq" in f.headers)
    assert message.headers["subscription"] == "sub-0" and message.body == b'"hi"'
    # An UNSUBSCRIBE of a presence id, as stompjs sends it, is simply done.
    await stella.send(frame("UNSUBSCRIBE", id="p-0", receipt="u"))
    assert (await stella.until("RECEIPT")).headers["receipt-id"] == "u"
    await stella.ws.close()


async def test_forbidden_reveals_nothing_and_closes_like_any_refusal(
    two_gateways: tuple[Gateway, Gateway],
    stomp_client: Callable[..., Any],
    connect_client: ConnectFn,
) -> None:
    one, two = two_gateways
    alice = await connect_client("alice", gw=two)
    assert (await alice.request("subscribe", channel="secret.full"))["type"] == "ack"
    assert (await alice.request("subscribe", channel="quiet.q"))["type"] == "ack"
    await eventually_count(alice, "quiet.q", 1)
    bodies = {}
    # A channel with a subscriber, one without, one with no rule (presence: nobody
    # by default), and for a user without the role, one the members may see.
    for channel, roles in [
        ("secret.full", ("member",)),
        ("secret.empty", ("member",)),
        ("nothing.here", ("member",)),
        ("quiet.q", ()),
    ]:
        guest: StompWire = await stomp_client(one, "guest", roles=roles)
        (error,) = await ask(guest, channel)
        assert error.command == "ERROR" and error.headers["message"] == "forbidden"
        assert error.headers["receipt-id"] == "r-p-0"
        assert "destination" not in error.headers
        assert await guest.closed() == 1008
        bodies[channel] = error.text.replace(channel, "C")
    assert set(bodies.values()) == {"not allowed to see presence of C"}, bodies


async def test_bad_presence_requests_are_bad_requests(
    two_gateways: tuple[Gateway, Gateway], stomp_client: Callable[..., Any]
) -> None:
    one, _ = two_gateways
    for bad in [
        frame("SUBSCRIBE", id="p", destination="/presence/room.*"),
        frame("SUBSCRIBE", id="p", destination="/presence/"),
        frame("SUBSCRIBE", id="p", destination="/presence/room.a", x_since="0"),
        frame("SEND", "x", destination="/presence/room.a"),
    ]:
        wire: StompWire = await stomp_client(one, "alice")
        await wire.send(bad)
        error = await wire.recv()
        assert error.command == "ERROR" and error.headers["message"] == "bad_request", bad
        assert await wire.closed() == 1002
    # An id already taken by a subscription of the connection.
    wire = await stomp_client(one, "alice")
    await wire.send(frame("SUBSCRIBE", id="sub-0", destination="/topic/room.a", receipt="s"))
    assert (await wire.recv()).command == "RECEIPT"
    (error,) = await ask(wire, "room.a", "sub-0")
    assert error.headers["message"] == "bad_request" and "in use" in error.text
    assert await wire.closed() == 1002


async def test_at_most_1000_clients_are_listed_and_the_count_is_exact(
    two_gateways: tuple[Gateway, Gateway], stomp_client: Callable[..., Any]
) -> None:
    one, two = two_gateways
    node = two.node
    exchange = other_exchange(node, "room.big")
    for i in range(1_100):  # subscribers of the other process, as a transport adds them
        fake = FakeSubscriber(f"user{i}", f"s{i:05d}")
        node.presence.joined(exchange, "room.big", fake.id, fake.user)
    wire: StompWire = await stomp_client(one, "watcher")
    answer = await eventually_stomp_count(wire, "room.big", 1_100)
    assert len(answer["clients"]) == 1_000
    assert all(c["user"].startswith("user") for c in answer["clients"])


async def test_presence_requests_share_the_json_rate_limit(
    two_gateways: tuple[Gateway, Gateway], stomp_client: Callable[..., Any]
) -> None:
    one, two = two_gateways
    burst = one.settings.limits.presence_burst
    wire: StompWire = await stomp_client(one, "alice")
    other: StompWire = await stomp_client(two, "alice")  # the same user, the other process
    for n in range(burst // 2):
        assert (await ask(other, "room.x", f"o-{n}"))[-1].command == "RECEIPT"
    answers: list[ServerFrame] = []
    while not answers or answers[-1].command == "RECEIPT":
        assert len(answers) <= burst, "the user's presence bucket never ran out"
        answers.append((await ask(wire, "room.x", f"p-{len(answers)}"))[-1])
    # The bucket is the user's, shared through Redis: about half of it was used
    # on the other process (a token or two may have come back since).
    assert 1 <= len(answers) - 1 < burst, [a.command for a in answers]
    refused = answers[-1]
    assert refused.command == "ERROR" and refused.headers["message"] == "rate_limited"
    assert float(refused.headers["retry-after"]) > 0
    assert refused.headers["receipt-id"] == f"r-p-{len(answers) - 1}"
    assert await wire.closed() == 1008


async def test_redis_down_answers_unavailable_fast(
    settings: Settings,
    cleanup_broker: None,
    stomp_client: Callable[..., Any],
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
        wire: StompWire = await stomp_client(gw, "alice")
        await wire.send(frame("SUBSCRIBE", id="sub-0", destination="/topic/room.r", receipt="s"))
        assert (await wire.recv()).command == "RECEIPT"
        # Publishing and delivery do not wait on Redis.
        await wire.send(frame("SEND", "before", destination="/topic/room.r", receipt="sent"))
        got = {(await wire.recv()).command, (await wire.recv()).command}
        assert got == {"RECEIPT", "MESSAGE"}
        loop = asyncio.get_running_loop()
        started = loop.time()
        (error,) = await ask(wire, "room.r")
        assert loop.time() - started < 2.0  # bounded by the Redis timeouts, not a stall
        assert error.command == "ERROR" and error.headers["message"] == "unavailable"
        assert error.headers["receipt-id"] == "r-p-0"
        assert await wire.closed() == 1013
    finally:
        await gw.stop()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_flood_of_presence_requests_ends_in_one_error_and_the_gateway_goes_on(
    two_gateways: tuple[Gateway, Gateway], stomp_client: Callable[..., Any]
) -> None:
    one, _ = two_gateways
    wire: StompWire = await stomp_client(one, "mallory")
    flood = b"".join(
        frame("SUBSCRIBE", id=f"p-{n}", destination="/presence/room.f", receipt=f"r-{n}")
        for n in range(200)
    )
    await wire.send(flood)  # one WebSocket message of 200 frames
    got: list[ServerFrame] = []
    while not got or got[-1].command != "ERROR":
        got.append(await wire.recv(timeout=10))
    assert await wire.closed() == 1008
    answered = [f for f in got if f.command == "RECEIPT"]
    assert 1 <= len(answered) <= one.settings.limits.presence_burst
    assert got[-1].headers["message"] == "rate_limited"
    assert not wire.frames  # nothing after the ERROR
    # Each answered request got its one MESSAGE, and on its own id.
    messages = [f.headers["subscription"] for f in got if f.command == "MESSAGE"]
    assert sorted(messages) == sorted(f"p-{r.headers['receipt-id'][2:]}" for r in answered)
    other: StompWire = await stomp_client(one, "alice")
    assert (await answer_of(other, "room.f"))["count"] == 0

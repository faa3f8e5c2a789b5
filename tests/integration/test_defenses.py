"""Rate limits and connection-level defenses against the real gateway: each
limit answers with the contract's error frame, HTTP status or close code, and
what it refuses never reaches RabbitMQ (protocol.md sections 1, 4 and 7)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set
from gateway.telemetry.events import TrafficEvent

pytestmark = pytest.mark.integration

POLICY = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [anyone]
    publish: [anyone]
    limits: {{publish: "5/second", burst: 5, max_bytes: 4096}}
  - channel: "news.{{topic}}"
    exchange: {p}.news
    subscribe: [anyone]
    publish: [anyone]
"""


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-limits.yaml").write_text(POLICY.format(p=exchange_prefix))
    return folder


StartFn = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(settings: Settings, cleanup_broker: None) -> AsyncIterator[StartFn]:
    """start_gateway(limits={...}, allowed_origins=...) -> a running Gateway."""
    started: list[Gateway] = []

    async def start(*, limits: dict[str, Any] | None = None, **top: Any) -> Gateway:
        custom = dataclasses.replace(
            settings, limits=dataclasses.replace(settings.limits, **(limits or {})), **top
        )
        gw = Gateway(custom, load_policy_set(custom.policies_dir))
        await gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.stop()


def record(gw: Gateway) -> list[TrafficEvent]:
    events: list[TrafficEvent] = []
    gw.node.events.subscribe(events.append)
    return events


def url(gw: Gateway) -> str:
    return f"wss://localhost:{gw.port}/ws"


async def read_until_closed(ws: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """Every frame until the server closes the connection.

    After a 4429 the gateway no longer reads the connection; over TLS the TCP
    connection then ends with the server's close timeout (5 s), which is when
    a client library reports the close it already received.
    """
    frames = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return frames


async def refused_status(gw: Gateway, client_ssl: ssl.SSLContext, token: str) -> Any:
    with pytest.raises(InvalidStatus) as refused:
        await connect(
            url(gw), ssl=client_ssl, additional_headers={"Authorization": f"Bearer {token}"}
        )
    return refused.value.response


# --- per-rule publish limit, strikes and 4429 --------------------------------


async def test_a_publish_flood_is_rate_limited_then_closed_and_refusals_never_reach_rabbitmq(
    start_gateway: StartFn,
    connect_client: Any,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
) -> None:
    gw = await start_gateway(
        limits={"rate_limited_strikes_before_close": 5, "rate_limited_strike_window_seconds": 60}
    )
    events = record(gw)
    channel = await amqp.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(f"{exchange_prefix}.chat", routing_key="chat.flood")

    flooder = await connect_client("mallory", gw=gw)
    for i in range(40):
        await flooder.send(type="publish", id=i, channel="chat.flood", data={"n": i})
    frames = await read_until_closed(flooder.ws)
    assert flooder.ws.close_code == 4429

    acked = sorted(f["id"] for f in frames if f["type"] == "ack")
    limited = [f for f in frames if f.get("code") == "rate_limited"]
    assert acked == [0, 1, 2, 3, 4]  # the rule's burst
    assert [f["id"] for f in limited] == [5, 6, 7, 8, 9]  # five strikes, then the close
    assert all(0 < f["retry_after"] <= 0.2 for f in limited)  # a token every 0.2 s
    kinds = [(e.kind, e.detail) for e in events if e.user == "mallory"]
    assert kinds.count(("rate_limited", "publish")) == 6
    assert ("banned", "4429") in kinds

    received: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.5):
            async with queue.iterator() as messages:
                async for message in messages:
                    received.append(orjson.loads(message.body)["n"])
                    await message.ack()
    assert sorted(received) == acked


async def test_an_address_that_keeps_getting_4429_is_refused_at_the_handshake(
    start_gateway: StartFn, connect_client: Any, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(
        limits={
            "rate_limited_strikes_before_close": 1,
            "strikeouts_per_minute_per_address": 1,
            "strikeouts_burst": 2,
        }
    )
    events = record(gw)
    for round_ in range(2):
        flooder = await connect_client(f"flooder{round_}", gw=gw)
        for i in range(10):
            await flooder.send(type="ping", id=i)
            await flooder.send(type="publish", id=f"p{i}", channel="chat.x", data=i)
        await read_until_closed(flooder.ws)
        assert flooder.ws.close_code == 4429
    verified = len([e for e in events if e.kind.startswith("auth")])
    response = await refused_status(gw, client_ssl, make_token("newcomer"))
    assert response.status_code == 429 and 50 <= int(response.headers["Retry-After"]) <= 60
    assert len([e for e in events if e.kind.startswith("auth")]) == verified  # no token work
    assert ("rate_limited", "strikeouts") in [(e.kind, e.detail) for e in events]


async def test_a_client_that_waits_retry_after_is_admitted_again(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway()
    alice = await connect_client("alice", gw=gw)
    answers = [await alice.request("publish", channel="chat.a", data=i) for i in range(6)]
    assert [a["type"] for a in answers] == ["ack"] * 5 + ["error"]
    assert answers[-1]["code"] == "rate_limited"
    await asyncio.sleep(answers[-1]["retry_after"])
    assert (await alice.request("publish", channel="chat.a", data=6))["type"] == "ack"
    # Another rule without limits, another user: their own buckets.
    assert (await alice.request("publish", channel="news.a", data=0))["type"] == "ack"
    bob = await connect_client("bob", gw=gw)
    assert (await bob.request("publish", channel="chat.a", data=0))["type"] == "ack"


async def test_the_publish_limit_is_per_user_across_connections(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway()
    first, second = await connect_client("carol", gw=gw), await connect_client("carol", gw=gw)
    answers = []
    for i in range(5):
        answers.append(await first.request("publish", channel="chat.a", data=i))
        answers.append(await second.request("publish", channel="chat.a", data=i))
    assert [a["type"] for a in answers].count("ack") == 5


# --- per-connection frames and subscribes ------------------------------------


async def test_a_frame_flood_is_rate_limited_with_the_id_echoed_then_closed(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(
        limits={
            "frames_per_second": 0.1,
            "frames_burst": 10,
            "rate_limited_strikes_before_close": 3,
        }
    )
    alice = await connect_client("alice", gw=gw)
    for i in range(30):
        await alice.send(type="ping", id=f"p{i}")
    frames = await read_until_closed(alice.ws)
    assert [f["type"] for f in frames] == ["pong"] * 10 + ["error"] * 3
    assert [f["id"] for f in frames[10:]] == ["p10", "p11", "p12"]
    assert {f["code"] for f in frames[10:]} == {"rate_limited"}
    assert alice.ws.close_code == 4429


async def test_malformed_frames_count_against_the_frame_limit(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(limits={"frames_per_second": 0.1, "frames_burst": 3})
    alice = await connect_client("alice", gw=gw)
    for _ in range(4):
        await alice.ws.send("{not json")
    codes = [(await alice.recv())["code"] for _ in range(4)]
    assert codes == ["bad_request"] * 3 + ["rate_limited"]


async def test_frames_before_auth_are_limited_too(
    start_gateway: StartFn, client_ssl: ssl.SSLContext
) -> None:
    gw = await start_gateway(
        limits={
            "frames_per_second": 0.1,
            "frames_burst": 2,
            "rate_limited_strikes_before_close": 2,
            "auth_timeout_seconds": 5.0,
        }
    )
    async with connect(url(gw), ssl=client_ssl) as ws:
        for i in range(10):
            await ws.send(orjson.dumps({"type": "ping", "id": i}).decode())
        frames = await read_until_closed(ws)
        assert [f["code"] for f in frames] == ["unauthorized"] * 2 + ["rate_limited"] * 2
        assert ws.close_code == 4429


async def test_subscribe_requests_have_their_own_bucket(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(limits={"subscribes_per_second": 0.1, "subscribes_burst": 3})
    events = record(gw)
    alice = await connect_client("alice", gw=gw)
    answers = [await alice.request("subscribe", channel=f"news.t{i}") for i in range(4)]
    assert [a["type"] for a in answers] == ["ack"] * 3 + ["error"]
    assert answers[-1]["code"] == "rate_limited" and answers[-1]["retry_after"] > 5
    assert ("rate_limited", "subscribes") in [(e.kind, e.detail) for e in events]
    assert (await alice.request("ping"))["type"] == "pong"  # other frames still flow


async def test_default_limits_never_touch_a_dashboard_or_a_chat_client(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(limits={"max_channels_per_connection": 100})
    events = record(gw)
    dashboard = await connect_client("dashboard", gw=gw)
    for i in range(100):  # a dashboard (re)subscribing to all its channels at once
        await dashboard.send(type="subscribe", id=i, channel=f"news.panel{i}")
    answers = [await dashboard.recv(timeout=10) for _ in range(100)]
    assert {a["type"] for a in answers} == {"ack"}
    chat = await connect_client("chatter", gw=gw)
    for i in range(8):  # a fast typist: several messages a second
        assert (await chat.request("publish", channel="chat.room", data=i))["type"] == "ack"
        await asyncio.sleep(0.25)
    assert not [e for e in events if e.kind == "rate_limited"]


# --- handshake: per-address limits, before any token work ---------------------


async def test_too_many_connects_from_one_address_get_429_before_any_token_work(
    start_gateway: StartFn, connect_client: Any, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(limits={"connects_per_second_per_address": 0.2, "connects_burst": 3})
    events = record(gw)
    verified = 0
    verify = gw.verifier.verify

    async def counting_verify(token: str) -> Any:
        nonlocal verified
        verified += 1
        return await verify(token)

    gw.verifier.verify = counting_verify  # type: ignore[method-assign]
    for i in range(3):
        await connect_client(f"user{i}", gw=gw)
    assert verified == 3
    response = await refused_status(gw, client_ssl, make_token("user9"))
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 5
    assert verified == 3  # the token of the refused connection was never looked at
    assert [e.kind for e in events if e.kind.startswith("auth")] == ["auth_ok"] * 3
    assert ("rate_limited", "connects") in [(e.kind, e.detail) for e in events]


async def test_an_address_with_many_failed_authentications_is_refused_with_429(
    start_gateway: StartFn, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(
        limits={"auth_failures_per_minute_per_address": 1, "auth_failures_burst": 3}
    )
    events = record(gw)
    for _ in range(2):  # through the handshake header
        assert (await refused_status(gw, client_ssl, "not-a-token")).status_code == 401
    async with connect(url(gw), ssl=client_ssl) as ws:  # through the auth frame
        await ws.send('{"type":"auth","token":"bad"}')
        await read_until_closed(ws)
        assert ws.close_code == 4401
    # Now even a valid token is refused, before it is verified.
    response = await refused_status(gw, client_ssl, make_token("alice"))
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert [e.kind for e in events].count("auth_failed") == 3
    assert "auth_ok" not in [e.kind for e in events]


async def test_concurrent_connections_per_address_are_capped(
    start_gateway: StartFn, connect_client: Any, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(limits={"max_connections_per_address": 3})
    clients = [await connect_client(f"u{i}", gw=gw) for i in range(3)]
    response = await refused_status(gw, client_ssl, make_token("u3"))
    assert response.status_code == 429 and "Retry-After" in response.headers
    await clients[0].close()
    await asyncio.sleep(0.2)
    assert gw.node.limiter.held("address", "127.0.0.1") == 2
    await connect_client("u3", gw=gw)


async def test_a_refused_handshake_gives_its_address_slot_back(
    start_gateway: StartFn, client_ssl: ssl.SSLContext
) -> None:
    gw = await start_gateway(limits={"max_connections_per_address": 2})
    for _ in range(5):
        assert (await refused_status(gw, client_ssl, "not-a-token")).status_code == 401
    await asyncio.sleep(0.2)
    assert gw.node.limiter.held("address", "127.0.0.1") == 0


async def test_concurrent_connections_per_user_close_with_1008(
    start_gateway: StartFn, connect_client: Any, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(limits={"max_connections_per_user": 2})
    first = await connect_client("dave", gw=gw)
    await connect_client("dave", gw=gw)
    headers = {"Authorization": f"Bearer {make_token('dave')}"}
    async with connect(url(gw), ssl=client_ssl, additional_headers=headers) as ws:
        assert await read_until_closed(ws) == []
        assert ws.close_code == 1008 and ws.close_reason == "too many connections"
    await connect_client("erin", gw=gw)  # other users are not affected
    await first.close()
    await asyncio.sleep(0.2)
    await connect_client("dave", gw=gw)


# --- connection-level defenses ------------------------------------------------


async def test_a_frame_over_the_maximum_closes_with_1009_even_before_auth(
    start_gateway: StartFn, client_ssl: ssl.SSLContext
) -> None:
    gw = await start_gateway(limits={"max_frame_bytes": 1024})
    async with connect(url(gw), ssl=client_ssl) as ws:
        await ws.send('{"type":"auth","token":"' + "x" * 2000 + '"}')
        await read_until_closed(ws)
        assert ws.close_code == 1009


async def test_compression_offered_by_a_client_is_not_negotiated(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    async with connect(
        url(gateway), ssl=client_ssl, additional_headers=headers, compression="deflate"
    ) as ws:
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []
        assert orjson.loads(await ws.recv())["type"] == "welcome"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://allowed.example", True),
        (None, True),  # not a browser: cross-site hijacking needs one
        ("https://evil.example", False),
        ("https://allowed.example.evil", False),
        ("https://evil.allowed.example", False),
        ("http://allowed.example", False),
        ("https://allowed.example:8443", False),
        ("null", False),
    ],
)
async def test_the_origin_allowlist_takes_exact_matches_only(
    start_gateway: StartFn,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    origin: str | None,
    allowed: bool,
) -> None:
    gw = await start_gateway(allowed_origins=("https://allowed.example",))
    events = record(gw)
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    async with connect(
        url(gw),
        ssl=client_ssl,
        additional_headers=headers,
        origin=origin,  # type: ignore[arg-type]
    ) as ws:
        if allowed:
            assert orjson.loads(await ws.recv())["type"] == "welcome"
        else:
            assert await read_until_closed(ws) == []
            assert ws.close_code == 1008
            assert not [e for e in events if e.kind.startswith("auth")]  # no token work


async def test_the_channel_cap_refuses_one_more_channel(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(limits={"max_channels_per_connection": 3})
    alice = await connect_client("alice", gw=gw)
    for i in range(3):
        assert (await alice.request("subscribe", channel=f"news.c{i}"))["type"] == "ack"
    refused = await alice.request("subscribe", channel="news.c3")
    assert refused["type"] == "error" and refused["code"] == "forbidden"
    assert "3 channels" in refused["message"]
    # Resubscribing to a channel it holds is not one more; freeing one makes room.
    assert (await alice.request("subscribe", channel="news.c0"))["type"] == "ack"
    await alice.request("unsubscribe", channel="news.c0")
    assert (await alice.request("subscribe", channel="news.c3"))["type"] == "ack"


async def test_slowloris_half_open_handshakes_do_not_block_others_and_are_closed(
    start_gateway: StartFn, connect_client: Any, client_ssl: ssl.SSLContext
) -> None:
    gw = await start_gateway(limits={"handshake_timeout_seconds": 1.0})
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for i in range(60):
        if i % 2:  # TLS done, then half an HTTP request, then nothing
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.port, ssl=client_ssl, server_hostname="localhost"
            )
            writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
            await writer.drain()
        else:  # a TCP connection that never even starts TLS
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        stalled.append((reader, writer))
    loop = asyncio.get_running_loop()
    started = loop.time()
    alice = await connect_client("alice", gw=gw)
    assert (await alice.request("ping"))["type"] == "pong"
    assert loop.time() - started < 1.0  # served while the stalled ones still hang

    async def closed_by_server(reader: asyncio.StreamReader) -> bool:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await reader.read(1024):
                pass
        return True

    async with asyncio.timeout(4):
        done = await asyncio.gather(*(closed_by_server(reader) for reader, _ in stalled))
    assert all(done)
    for _, writer in stalled:
        writer.transport.abort()
    assert (await alice.request("ping"))["type"] == "pong"


async def test_an_idle_connection_is_closed_with_1000(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(limits={"idle_timeout_seconds": 0.6})
    idle = await connect_client("idle", gw=gw)
    busy = await connect_client("busy", gw=gw)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The idle client's WebSocket layer still answers pings: that does not count.
    await idle.ws.ping()
    for _ in range(8):
        await asyncio.sleep(0.2)
        assert (await busy.request("ping"))["type"] == "pong"
    assert await read_until_closed(idle.ws, timeout=1) == []
    assert idle.ws.close_code == 1000 and idle.ws.close_reason == "idle timeout"
    assert 0.6 <= loop.time() - started < 2.0
    assert (await busy.request("ping"))["type"] == "pong"


async def test_a_client_that_stops_answering_pings_is_dropped(
    start_gateway: StartFn, connect_client: Any
) -> None:
    gw = await start_gateway(limits={"heartbeat_seconds": 0.2, "heartbeat_timeout_seconds": 0.3})
    events = record(gw)
    silent = await connect_client("silent", gw=gw)
    assert silent.ws.transport is not None
    silent.ws.transport.pause_reading()  # never sees the pings, never answers
    started = time.time()
    # Closed after the ping timeout; the handler ends once the close times out too.
    for _ in range(100):
        await asyncio.sleep(0.1)
        if any(e.kind == "closed" and e.user == "silent" for e in events):
            break
    closed = [e for e in events if e.kind == "closed" and e.user == "silent"]
    # 1011 "keepalive ping timeout" was sent, but the silent client never
    # answered the close either: the server records an abnormal closure.
    assert closed and closed[0].detail in ("1011", "1006")
    assert closed[0].at - started < 8  # ping interval + timeout + close timeout (5 s)
    silent.ws.transport.abort()


def rss_bytes() -> int:
    """Resident memory of this process (the gateway runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_slow_consumers_are_closed_with_4409_and_memory_stays_flat(
    start_gateway: StartFn,
    connect_client: Any,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
) -> None:
    gw = await start_gateway()
    events = record(gw)
    slow = [await connect_client(f"slow{i}", gw=gw) for i in range(10)]
    for client in slow:
        assert (await client.request("subscribe", channel="news.firehose"))["type"] == "ack"
        assert client.ws.transport is not None
        client.ws.transport.pause_reading()  # stops reading: the socket buffers fill up
    channel = await amqp.channel()
    exchange = await channel.get_exchange(f"{exchange_prefix}.news")
    body = orjson.dumps("x" * 64 * 1024)

    async def overflowed(user: str) -> None:
        while not any(s.principal.sub == user and s.outbox.overflowed for s in gw.node.sessions):
            if any(e.kind == "closed" and e.user == user for e in events):
                return  # overflowed and already gone
            await asyncio.sleep(0.01)

    async def first_slow_client_sees_4409() -> list[dict[str, Any]]:
        await overflowed("slow0")
        assert slow[0].ws.transport is not None
        slow[0].ws.transport.resume_reading()  # reads what was queued, then the close frame
        return await read_until_closed(slow[0].ws, timeout=10)

    watcher = asyncio.create_task(first_slow_client_sees_4409())
    rss_before = rss_bytes()
    pushed = 0
    while pushed < 110 * 1024 * 1024:  # at each of the ten slow clients
        await asyncio.gather(
            *(
                exchange.publish(aio_pika.Message(body), routing_key="news.firehose")
                for _ in range(16)
            )
        )
        pushed += 16 * len(body)
    async with asyncio.timeout(40):
        await asyncio.gather(*(overflowed(f"slow{i}") for i in range(10)))
        drained = await watcher
    rss_growth = rss_bytes() - rss_before
    assert slow[0].ws.close_code == 4409
    # What fitted in its buffers: the 1 MiB send buffer plus the kernel's socket
    # buffers (loopback autotuning reaches several MiB), never the 1,700 pushed.
    assert 0 < len(drained) < 400
    # The others never read, not even the close frame: they are dropped once
    # the closing handshake and the TLS shutdown time out (about 15 s here).
    for _ in range(400):
        if sum(e.kind == "closed" and (e.user or "").startswith("slow") for e in events) == 10:
            break
        await asyncio.sleep(0.1)
    assert not [s for s in gw.node.sessions if s.principal.sub.startswith("slow")]
    assert rss_growth < 50 * 1024 * 1024, f"RSS grew by {rss_growth / 2**20:.0f} MiB"
    for client in slow:
        if client.ws.transport is not None:
            client.ws.transport.abort()


# --- an address that ignores Retry-After is refused before TLS ------------------


async def attempt(port: int, client_ssl: ssl.SSLContext, token: str, source: str) -> str:
    """One connection from ``source``: "welcome", "429", or "dropped" (closed
    before the TLS handshake could finish: no certificate work was done)."""
    try:
        ws = await connect(
            f"wss://localhost:{port}/ws",
            ssl=client_ssl,
            additional_headers={"Authorization": f"Bearer {token}"},
            local_addr=(source, 0),
            open_timeout=5,
        )
    except InvalidStatus as refused:
        status = refused.response.status_code
        assert status != 429 or refused.response.headers["Retry-After"]
        return str(status)
    except (ConnectionError, ssl.SSLError, EOFError) as exc:
        return f"dropped ({type(exc).__name__})"
    async with ws:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        return str(welcome["type"])


IGNORING_LIMITS = {
    "connects_per_second_per_address": 0.5,  # Retry-After about 2 s once over
    "connects_burst": 1,
    "handshake_refusals_before_drop": 2,
}


async def test_an_address_that_ignores_retry_after_is_dropped_before_tls(
    start_gateway: StartFn, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(limits=IGNORING_LIMITS)
    events = record(gw)
    token = make_token("mallory")
    outcomes = [await attempt(gw.port, client_ssl, token, "127.0.0.2") for _ in range(5)]
    # One admitted, then told to wait three times (the first refusal and two
    # ignored ones); the next attempt inside that Retry-After is cut at TCP.
    assert outcomes[:4] == ["welcome", "429", "429", "429"], outcomes
    assert outcomes[4].startswith("dropped"), outcomes
    dropped = [e for e in events if e.detail == "ignored_retry_after"]
    assert [(e.kind, e.address) for e in dropped] == [("rate_limited", "127.0.0.2")]
    # Everyone else is served meanwhile.
    assert await attempt(gw.port, client_ssl, make_token("alice"), "127.0.0.1") == "welcome"
    # Once the Retry-After it was given has passed, the address is heard again.
    await asyncio.sleep(2.2)
    assert await attempt(gw.port, client_ssl, token, "127.0.0.2") == "welcome"


async def test_a_client_that_honours_retry_after_is_never_dropped(
    start_gateway: StartFn, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(limits=IGNORING_LIMITS)
    token = make_token("carol")
    assert await attempt(gw.port, client_ssl, token, "127.0.0.3") == "welcome"
    for _ in range(4):
        try:
            await connect(
                url(gw),
                ssl=client_ssl,
                additional_headers={"Authorization": f"Bearer {token}"},
                local_addr=("127.0.0.3", 0),
            )
        except InvalidStatus as refused:
            assert refused.response.status_code == 429
            await asyncio.sleep(int(refused.response.headers["Retry-After"]))
        else:
            raise AssertionError("expected 429 after the burst")
        assert await attempt(gw.port, client_ssl, token, "127.0.0.3") == "welcome"


async def test_dropping_before_tls_can_be_turned_off(
    start_gateway: StartFn, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(limits={**IGNORING_LIMITS, "handshake_refusals_before_drop": 0})
    token = make_token("mallory")
    outcomes = [await attempt(gw.port, client_ssl, token, "127.0.0.4") for _ in range(6)]
    assert outcomes == ["welcome"] + ["429"] * 5


async def test_the_served_gateway_drops_before_tls_too(
    settings: Settings,
    cleanup_broker: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client_ssl: ssl.SSLContext,
    make_token: Any,
) -> None:
    """The same through `rabbitgate serve`, which runs on uvloop: its TLS
    protocol is started differently (see gateway/transports/admission.py)."""
    from tests.integration.processes import GatewayProcess

    for name, value in IGNORING_LIMITS.items():
        monkeypatch.setenv(f"RABBITGATE_LIMITS_{name.upper()}", str(value))
    served = GatewayProcess(settings, tmp_path).start()
    try:
        token = make_token("mallory")
        outcomes = [await attempt(served.port, client_ssl, token, "127.0.0.5") for _ in range(5)]
        assert outcomes[:4] == ["welcome", "429", "429", "429"], outcomes
        assert outcomes[4].startswith("dropped"), outcomes
        assert await attempt(served.port, client_ssl, make_token("alice"), "127.0.0.1") == "welcome"
        # A huge header still gets its HTTP answer through the TLS started here.
        padded = make_token("alice", padding="x" * 9000)
        assert await attempt(served.port, client_ssl, padded, "127.0.0.1") in ("401", "431")
    finally:
        await asyncio.to_thread(served.stop)


# --- behind a trusted proxy ---------------------------------------------------


async def test_behind_a_trusted_proxy_limits_and_events_follow_the_forwarded_client(
    start_gateway: StartFn, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    """127.0.0.1 plays the proxy: each forwarded client has its own connect
    bucket; a forged hop left of the proxy's changes nothing; SSE too."""
    gw = await start_gateway(
        limits={"connects_per_second_per_address": 0.2, "connects_burst": 2},
        trusted_proxies=("127.0.0.0/8",),
    )
    events = record(gw)

    async def handshake(forwarded_for: str) -> int:
        headers = {
            "Authorization": f"Bearer {make_token('alice')}",
            "X-Forwarded-For": forwarded_for,
        }
        try:
            async with connect(url(gw), ssl=client_ssl, additional_headers=headers) as ws:
                assert orjson.loads(await ws.recv())["type"] == "welcome"
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    assert [await handshake("198.51.100.1") for _ in range(3)] == [101, 101, 429]
    # A client of the same proxy, and one that forges another client's hop.
    assert await handshake("198.51.100.2") == 101
    assert await handshake("198.51.100.2, 198.51.100.1") == 429
    connects = [e.address for e in events if e.kind == "connect"]
    assert connects == ["198.51.100.1"] * 3 + ["198.51.100.2", "198.51.100.1"]
    assert ("auth_ok", "198.51.100.2") in [(e.kind, e.address) for e in events]

    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"https://localhost:{gw.sse_port}/events",
            params={"channel": "chat.ok"},
            headers={
                "Authorization": f"Bearer {make_token('alice')}",
                "X-Forwarded-For": "198.51.100.3",
            },
            ssl=client_ssl,
        ) as response:
            assert response.status == 200
    assert ("connect", "198.51.100.3", "sse") in [(e.kind, e.address, e.detail) for e in events]


async def test_an_untrusted_peer_cannot_pick_its_address_with_x_forwarded_for(
    start_gateway: StartFn, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    gw = await start_gateway(
        limits={"connects_per_second_per_address": 0.2, "connects_burst": 2},
        trusted_proxies=("192.0.2.0/24",),  # not us
    )
    events = record(gw)
    statuses = []
    for n in range(3):
        headers = {
            "Authorization": f"Bearer {make_token('alice')}",
            "X-Forwarded-For": f"198.51.100.{n}",  # a new "client" every time
        }
        try:
            async with connect(url(gw), ssl=client_ssl, additional_headers=headers):
                statuses.append(101)
        except InvalidStatus as refused:
            statuses.append(refused.response.status_code)
    assert statuses == [101, 101, 429]
    assert {e.address for e in events if e.kind == "connect"} == {"127.0.0.1"}

"""The Python client (clients/python, rabbitgate_client) against the real TLS gateway on the real
RabbitMQ: receive, reconnect by itself, recover with `since`, queue publishes,
refresh its token in band; and against a hostile fake server, to show that bad
frames never crash it."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.app import Gateway
from gateway.config import Settings
from gateway.limits.restrictions import Rule
from gateway.policy.rules import load_policy_set
from rabbitgate_client import (
    CannotConnect,
    ClientClosed,
    Message,
    QueueFull,
    RabbitgateClient,
    RabbitgateError,
)
from rabbitgate_client.client import SUBPROTOCOL

from .processes import free_port

pytestmark = pytest.mark.integration


def url(gateway: Gateway) -> str:
    return f"wss://localhost:{gateway.port}/ws"


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def take(inbox: asyncio.Queue[Message], count: int, timeout: float = 10) -> list[Any]:
    async with asyncio.timeout(timeout):
        return [(await inbox.get()).data for _ in range(count)]


def drop(gateway: Gateway, sub: str, code: int = 4409) -> None:
    """The server ends every connection of ``sub`` (as it does a slow consumer)."""
    for session in list(gateway.node.sessions):
        if session.principal.sub == sub:
            session.close(code, "dropped by the test")


async def test_the_client_subscribes_publishes_and_receives_over_tls(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> None:
    async with RabbitgateClient(url(gateway), token=make_token("alice"), ssl=client_ssl) as alice:
        await alice.subscribe("chat.lobby")
        await alice.publish("chat.lobby", {"text": "hi"})
        messages = alice.messages()
        message = await asyncio.wait_for(anext(messages), 5)
        assert (message.channel, message.data, message.sender) == (
            "chat.lobby",
            {"text": "hi"},
            "alice",
        )
        assert isinstance(message.seq, int) and message.ts and message.ts > 1_700_000_000_000
        assert await alice.ping() < 5

        with pytest.raises(RabbitgateError) as denied:
            await alice.publish("news.today", "needs scope news.write")
        assert denied.value.code == "forbidden"
        with pytest.raises(RabbitgateError) as refused:
            await alice.subscribe("user.bob.inbox")
        assert refused.value.code == "forbidden"


async def test_after_the_gateway_restarts_the_client_reconnects_resubscribes_and_sends_its_queue(
    gateway: Gateway,
    settings: Settings,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
    connect_client: Any,
) -> None:
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        return make_token("carol")

    inbox: asyncio.Queue[Message] = asyncio.Queue()
    lost: list[str] = []
    port = gateway.port
    client = RabbitgateClient(
        url(gateway),
        token=token,
        ssl=client_ssl,
        on_message=inbox.put_nowait,
        on_recovery_lost=lost.append,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    await client.connect()
    second: Gateway | None = None
    try:
        await client.subscribe("chat.restart")
        await client.publish("chat.restart", "before")
        assert await take(inbox, 1) == ["before"]
        first_session = client.session

        await gateway.stop()  # every client is closed with 1001
        await wait_until(lambda: client.session is None)
        queued = [
            asyncio.create_task(client.publish("chat.restart", f"queued {i}")) for i in (1, 2)
        ]
        await asyncio.sleep(0.5)  # the client keeps trying a closed port meanwhile
        assert not any(task.done() for task in queued)

        second = Gateway(
            dataclasses.replace(settings, port=port), load_policy_set(settings.policies_dir)
        )
        await second.start()
        await asyncio.wait_for(asyncio.gather(*queued), 10)  # sent after reconnect, and acked
        assert client.session not in (None, first_session)
        assert calls >= 2  # a fresh token for the new connection

        bob = await connect_client("bob", gw=second)
        assert (await bob.request("publish", channel="chat.restart", data="after"))["type"] == "ack"
        assert await take(inbox, 3) == ["queued 1", "queued 2", "after"]
        assert lost == []  # the history in RabbitMQ covered the gap
        await asyncio.sleep(0.3)
        assert inbox.empty(), "a message was delivered twice"
    finally:
        await client.close()
        if second is not None:
            await second.stop()


async def test_messages_published_while_the_client_was_away_are_replayed_once(
    gateway: Gateway,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
    connect_client: Any,
) -> None:
    calls = 0
    gate = asyncio.Event()

    async def token() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await gate.wait()  # hold the reconnect until the test has published
        return make_token("carol")

    inbox: asyncio.Queue[Message] = asyncio.Queue()
    lost: list[str] = []
    bob = await connect_client("bob")
    async with RabbitgateClient(
        url(gateway),
        token=token,
        ssl=client_ssl,
        on_message=inbox.put_nowait,
        on_recovery_lost=lost.append,
        backoff_base=0.01,
    ) as client:
        await client.subscribe("chat.away")
        await bob.request("publish", channel="chat.away", data=1)
        assert await take(inbox, 1) == [1]

        drop(gateway, "carol")
        await wait_until(lambda: calls == 2)  # reconnecting, waiting for its token
        for value in (2, 3):
            assert (await bob.request("publish", channel="chat.away", data=value))["type"] == "ack"
        gate.set()
        assert await take(inbox, 2) == [2, 3]
        await bob.request("publish", channel="chat.away", data=4)
        assert await take(inbox, 1) == [4]
        assert lost == [] and client.connections == 2
        await asyncio.sleep(0.3)
        assert inbox.empty(), "a message was delivered twice"


async def test_when_the_history_no_longer_covers_the_gap_the_app_is_told_to_reload(
    gateway: Gateway,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
    connect_client: Any,
) -> None:
    calls = 0
    gate = asyncio.Event()

    async def token() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await gate.wait()
        return make_token("carol")

    events: list[Any] = []
    received = asyncio.Event()

    def on_message(message: Message) -> None:
        events.append(message.data)
        received.set()

    bob = await connect_client("bob")
    async with RabbitgateClient(
        url(gateway),
        token=token,
        ssl=client_ssl,
        on_message=on_message,
        on_recovery_lost=lambda channel: events.append(("reload", channel)),
        backoff_base=0.01,
    ) as client:
        await client.subscribe("chat.gap")
        await bob.request("publish", channel="chat.gap", data="seen")
        await asyncio.wait_for(received.wait(), 5)
        drop(gateway, "carol")
        await wait_until(lambda: calls == 2)
        for i in range(130):  # the rule keeps 100 messages of history
            await bob.send(type="publish", channel="chat.gap", data=i, id=f"m{i}")
        acked = 0
        while acked < 130:
            frame = await bob.recv()
            assert frame["type"] == "ack", frame
            acked += 1
        gate.set()
        await wait_until(lambda: ("reload", "chat.gap") in events)
        await bob.request("publish", channel="chat.gap", data="fresh")
        await wait_until(lambda: events[-1] == "fresh")
        assert events[:2] == ["seen", ("reload", "chat.gap")]
        assert client.connections == 2


async def test_the_token_is_refreshed_in_band_before_it_expires(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> None:
    issued: list[str] = []

    def token() -> str:  # a plain (not async) callback works too
        issued.append(make_token("dave", ttl=3))
        return issued[-1]

    async with RabbitgateClient(
        url(gateway), token=token, ssl=client_ssl, refresh_margin=2, backoff_base=0.01
    ) as client:
        session = client.session
        await client.subscribe("chat.refresh")
        await asyncio.sleep(5)  # past the first token's exp
        assert client.session == session and client.connections == 1
        assert len(issued) >= 3  # the connect, then about one refresh a second
        await client.publish("chat.refresh", "still here")
        assert await client.ping() < 5


async def test_a_fixed_token_that_is_refused_stops_the_client(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> None:
    client = RabbitgateClient(url(gateway), token=make_token("erin", ttl=-10), ssl=client_ssl)
    with pytest.raises(ClientClosed) as closed:
        await asyncio.wait_for(client.connect(), 10)
    assert closed.value.close_code == 4401
    with pytest.raises(ClientClosed):
        await client.publish("chat.x", 1)
    await client.close()


async def test_a_token_callback_that_fails_at_first_is_retried_with_backoff(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> None:
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("identity provider down")
        return make_token("erin", ttl=-10 if calls == 2 else 600)  # then refused with 4401

    async with RabbitgateClient(
        url(gateway), token=token, ssl=client_ssl, backoff_base=0.01
    ) as client:
        assert calls == 3 and client.connections == 1
        assert await client.ping() < 5


@pytest.mark.parametrize("kind", ["user", "address"])
async def test_a_ban_stops_the_client_for_good(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str], kind: str
) -> None:
    calls = 0

    def token() -> str:
        nonlocal calls
        calls += 1
        return make_token("mallory")

    # A banned user is closed with 4403; a banned address refused with HTTP 403.
    key = "mallory" if kind == "user" else "127.0.0.1"
    gateway.node.restrictions.add(Rule(kind, key, "ban", time.time() + 60))
    client = RabbitgateClient(url(gateway), token=token, ssl=client_ssl, backoff_base=0.01)
    with pytest.raises(ClientClosed) as closed:
        await asyncio.wait_for(client.connect(), 10)
    assert closed.value.close_code == 4403
    await asyncio.sleep(0.2)
    assert calls == 1  # no retry
    await client.close()


async def test_publishes_beyond_the_queue_bound_are_refused_while_disconnected() -> None:
    client = RabbitgateClient("ws://127.0.0.1:9/ws", token="t", max_queued_publishes=2)
    waiting = [asyncio.create_task(client.publish("chat.q", i)) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await client.publish("chat.q", 3)
    await client.close()
    for task in waiting:
        with pytest.raises(ClientClosed):
            await task


# --- what retrying cannot fix fails at once -----------------------------------


def counting_token(make_token: Callable[..., str], sub: str) -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return make_token(sub)

    return token, calls


async def test_a_certificate_that_does_not_verify_fails_at_once_saying_how_to_trust_the_ca(
    gateway: Gateway, make_token: Callable[..., str]
) -> None:
    """The dev gateway's certificate is signed by certs/ca.pem, which the system does not
    trust: without ``ssl=`` the client stops at the first attempt (it used to retry for ever)."""
    token, calls = counting_token(make_token, "alice")
    client = RabbitgateClient(url(gateway), token=token, backoff_base=0.01)
    with pytest.raises(CannotConnect) as failed:
        await asyncio.wait_for(client.connect(), 10)
    assert "does not verify" in failed.value.message
    assert "ssl.create_default_context(cafile=" in failed.value.message
    assert "certs/ca.pem" in failed.value.message
    await asyncio.sleep(0.1)
    assert len(calls) == 1  # no retry
    with pytest.raises(CannotConnect):
        await client.publish("chat.lobby", "after the failure")
    await client.close()


@pytest.mark.parametrize("where", ["wrong path", "admin port", "sse port"])
async def test_a_server_that_is_not_a_rabbitgate_endpoint_fails_at_once(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str], where: str
) -> None:
    """A wrong path on the gateway's port, or another of its ports, answers the
    upgrade with an HTTP error that the same request would get again."""
    target = {
        "wrong path": f"wss://localhost:{gateway.port}/socket",
        "admin port": f"ws://127.0.0.1:{gateway.admin_port}/ws",
        "sse port": f"wss://localhost:{gateway.sse_port}/ws",
    }[where]
    token, calls = counting_token(make_token, "alice")
    ssl_arg = client_ssl if target.startswith("wss:") else None
    client = RabbitgateClient(target, token=token, ssl=ssl_arg, backoff_base=0.01)
    with pytest.raises(CannotConnect) as failed:
        await asyncio.wait_for(client.connect(), 10)
    assert "not a rabbitgate endpoint" in failed.value.message
    assert "HTTP 4" in failed.value.message
    await asyncio.sleep(0.1)
    assert len(calls) == 1
    await client.close()


async def test_a_server_that_does_not_select_the_subprotocol_fails_at_once() -> None:
    """A WebSocket server that is not rabbitgate accepts the upgrade without
    selecting rabbitgate.v1: nothing it would answer could be understood."""
    opened = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal opened
        opened += 1
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:  # selects no subprotocol
        port = server.sockets[0].getsockname()[1]
        client = RabbitgateClient(f"ws://127.0.0.1:{port}/ws", token="t", backoff_base=0.01)
        with pytest.raises(CannotConnect) as failed:
            await asyncio.wait_for(client.connect(), 10)
        assert "did not select the rabbitgate.v1 subprotocol" in failed.value.message
        await asyncio.sleep(0.1)
        assert opened == 1
        await client.close()


async def test_a_wss_url_for_a_port_without_tls_fails_at_once(
    gateway: Gateway, client_ssl: ssl.SSLContext
) -> None:
    """wss:// to the admin port (plain HTTP): OpenSSL reads an HTTP answer to its hello."""
    client = RabbitgateClient(
        f"wss://localhost:{gateway.admin_port}/ws", token="t", ssl=client_ssl, backoff_base=0.01
    )
    with pytest.raises(CannotConnect) as failed:
        await asyncio.wait_for(client.connect(), 10)
    assert "does not speak TLS on this port" in failed.value.message
    await client.close()


async def test_a_ws_url_for_a_tls_port_is_retried_with_a_hint(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """ws:// to the TLS port: the gateway closes without an HTTP answer, which it also
    does to an address it throttles, so this is retried; the WARNING says what to check."""
    token_calls: list[int] = []

    def token() -> str:
        token_calls.append(1)
        return "t"

    client = RabbitgateClient(f"ws://localhost:{gateway.port}/ws", token=token, backoff_cap=0.05)
    connecting = asyncio.create_task(client.connect())
    await wait_until(lambda: len(token_calls) >= 3)
    assert not connecting.done()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("a TLS port? then the URL is wss://" in w for w in warnings), warnings
    await client.close()
    with pytest.raises(ClientClosed):
        await connecting


def test_a_url_that_is_not_ws_or_wss_is_refused_by_the_constructor(gateway: Gateway) -> None:
    with pytest.raises(ValueError, match="must start with wss://"):
        RabbitgateClient(f"https://localhost:{gateway.port}/ws", token="t")


async def test_a_network_failure_is_retried_until_the_gateway_is_there(
    settings: Settings,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
    cleanup_broker: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connection refused (no gateway yet) is what retrying fixes: the client says so once
    at WARNING and connects when the gateway comes up on that port."""
    port = free_port()  # nobody listening on it yet
    token, calls = counting_token(make_token, "alice")
    client = RabbitgateClient(
        f"wss://localhost:{port}/ws", token=token, ssl=client_ssl, backoff_cap=0.2
    )
    connecting = asyncio.create_task(client.connect())
    await wait_until(lambda: len(calls) >= 3)
    assert not connecting.done()
    assert any("failed" in r.message and r.levelname == "WARNING" for r in caplog.records)
    gw = Gateway(dataclasses.replace(settings, port=port), load_policy_set(settings.policies_dir))
    await gw.start()
    try:
        await asyncio.wait_for(connecting, 10)
        assert client.session is not None
    finally:
        await client.close()
        await gw.stop()


# --- a hostile server -------------------------------------------------------

GARBAGE = [
    "not json",
    "[1, 2]",
    '"a string"',
    '{"type": 5}',
    '{"type": "surprise"}',
    '{"no": "type"}',
    '{"type": "message", "channel": "c.x", "seq": "2", "data": "bad seq"}',
    '{"type": "message", "channel": 7, "seq": 2, "data": "bad channel"}',
    '{"type": "message", "channel": "c.x", "seq": true, "data": "bool seq"}',
    '{"type": "message", "channel": "c.other", "seq": 9, "data": "not subscribed"}',
    '{"type": "ack", "id": [1]}',
    '{"type": "ack", "id": 99999}',
    '{"type": "error"}',
    '{"type": "pong", "id": {"a": 1}}',
]


async def test_malformed_frames_from_the_server_are_skipped_and_the_client_carries_on() -> None:
    opened = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal opened
        opened += 1
        assert orjson.loads(await ws.recv())["type"] == "auth"
        await ws.send("garbage before welcome")
        await ws.send('{"type": "welcome", "session": "s1", "user": "u", "heartbeat": 20}')
        subscribe = orjson.loads(await ws.recv())
        await ws.send(orjson.dumps({"type": "ack", "id": subscribe["id"], "seq": 1}).decode())
        for frame in GARBAGE:
            await ws.send(frame)
        await ws.send(b"\xff\xfe binary")
        good = {"type": "message", "channel": "c.x", "seq": 2, "data": "ok", "from": "u", "ts": 1}
        await ws.send(orjson.dumps(good).decode())
        await ws.send(orjson.dumps(good).decode())  # a duplicate
        await ws.send(orjson.dumps({**good, "seq": 1, "data": "old"}).decode())
        await ws.send(
            orjson.dumps({**good, "seq": 3, "data": "next", "from": 7, "ts": "x"}).decode()
        )
        ping = orjson.loads(await ws.recv())
        await ws.send(orjson.dumps({"type": "pong", "id": ping["id"]}).decode())
        await ws.recv()  # the client says something more, or closes
        await ws.close(4403, "banned")

    errors: list[RabbitgateError] = []
    async with serve(handler, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL]) as server:
        port = server.sockets[0].getsockname()[1]
        client = RabbitgateClient(
            f"ws://127.0.0.1:{port}/ws", token="t", on_error=errors.append, backoff_base=0.01
        )
        await client.connect()
        await client.subscribe("c.x")
        stream = client.messages()
        first = await asyncio.wait_for(anext(stream), 5)
        second = await asyncio.wait_for(anext(stream), 5)
        assert (first.data, first.seq, first.sender, first.ts) == ("ok", 2, "u", 1)
        assert (second.data, second.seq, second.sender, second.ts) == ("next", 3, None, None)
        assert [e.code for e in errors] == ["internal"]  # the id-less error frame, reported
        assert await client.ping() < 5  # still connected, still answering
        await client._ws.send("{}")  # type: ignore[union-attr]  # let the server ban us
        with pytest.raises(ClientClosed) as banned:
            await asyncio.wait_for(anext(stream), 5)
        assert banned.value.close_code == 4403
        await asyncio.sleep(0.2)
        assert opened == 1  # banned: no reconnect
        await client.close()


async def test_a_listen_only_client_is_not_closed_as_idle(
    settings: Any, client_ssl: ssl.SSLContext, make_token: Callable[..., str], cleanup_broker: None
) -> None:
    limits = dataclasses.replace(settings.limits, idle_timeout_seconds=1.0, heartbeat_seconds=0.3)
    idle_settings = dataclasses.replace(settings, limits=limits)
    gw = Gateway(idle_settings, load_policy_set(settings.policies_dir))
    await gw.start()
    try:
        async with RabbitgateClient(url(gw), token=make_token("ivy"), ssl=client_ssl) as ivy:
            await ivy.subscribe("news.quiet")
            first = ivy.session
            await asyncio.sleep(3.0)  # three idle timeouts, only the client's pings
            assert ivy.session == first and ivy.connections == 1
    finally:
        await gw.stop()

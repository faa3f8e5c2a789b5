"""Attacks on the SSE listener (GET /events) of the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_fixtures import existing
from sse_helpers import next_event, open_events

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set
from gateway.transports.sse import EventIds

pytestmark = pytest.mark.integration

Streams = list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def guarded(settings: Settings, cleanup_broker: None) -> AsyncIterator[Gateway]:
    limits = dataclasses.replace(
        settings.limits, handshake_timeout_seconds=1.0, max_connections_per_address=10
    )
    tuned = dataclasses.replace(settings, limits=limits)
    gw = Gateway(tuned, load_policy_set(settings.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


async def dropped(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Did the gateway end the connection (EOF or reset) within ``timeout``?"""
    try:
        while await asyncio.wait_for(reader.read(4096), timeout):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


async def answer_to_a_client_hello(port: int) -> bytes:
    """What the listener sends back to a TLS ClientHello on a new TCP connection
    (a ServerHello, or nothing when it drops the connection at accept)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        writer.write(outgoing.read())
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.transport.abort()
    return answer


async def until_held(guard: Any, count: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while guard.open.held("127.0.0.1") != count and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert guard.open.held("127.0.0.1") == count


async def test_half_open_sse_sockets_are_dropped_and_ws_and_readyz_keep_working(
    guarded: Gateway,
    connect_client: Any,
    client_ssl: ssl.SSLContext,
    http: aiohttp.ClientSession,
    make_token: Any,
) -> None:
    """issue 13 item 4: raw TCP connections lived 60 s and half-sent requests
    over TLS more than 90 s; enough of them exhausted the descriptors."""
    gw = guarded
    assert gw.sse_port is not None
    guard = gw.ops._sse.guard  # type: ignore[union-attr]
    assert guard is not None
    # Below the cap, a ClientHello gets its ServerHello (a TLS record: 0x16).
    assert (await answer_to_a_client_hello(gw.sse_port))[:1] == b"\x16"
    await until_held(guard, 0)
    held: Streams = []
    try:
        for _ in range(5):  # TCP, not even a TLS ClientHello
            held.append(await asyncio.open_connection("127.0.0.1", gw.sse_port))
        for _ in range(5):  # TLS, then a request line and half the headers
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.sse_port, ssl=client_ssl, server_hostname="localhost"
            )
            writer.write(b"GET /events?channel=chat.x HTTP/1.1\r\nHost: localhost\r\n")
            held.append((reader, writer))
        # The cap of 10 open per address is full, counted from TCP accept as on
        # /ws: more are dropped as they come, before TLS. A flood from one
        # address costs no TLS handshake past its cap.
        await until_held(guard, 10)
        refused = guard.open.refused
        assert await answer_to_a_client_hello(gw.sse_port) == b""
        for _ in range(10):
            held.append(await asyncio.open_connection("127.0.0.1", gw.sse_port))
        assert all(await asyncio.gather(*(dropped(reader, 5) for reader, _ in held[10:])))
        assert guard.open.refused == refused + 11 and guard.open.held("127.0.0.1") == 10
        # Meanwhile the WebSocket port and /readyz answer.
        alice = await connect_client("alice", gw=gw)
        assert (await alice.request("subscribe", channel="chat.x"))["type"] == "ack"
        ready = await http.get(f"http://127.0.0.1:{gw.admin_port}/readyz")
        assert ready.status == 200
        ready.close()
        # Each is dropped once the handshake timeout (1 s) passes, not after a
        # minute: the raw ones in their TLS handshake, the others waiting for
        # the rest of their headers.
        results = await asyncio.gather(*(dropped(reader, 8) for reader, _ in held[:10]))
        assert all(results), results.count(False)
        await until_held(guard, 0)
        assert not guard.handshakes
        # And a real SSE client is served as before.
        response = await open_events(http, gw, client_ssl, ["chat.x"], make_token("bob"))
        assert response.status == 200
        await alice.request("publish", channel="chat.x", data="hi")
        assert (await next_event(response))["event"] == "message"
        response.close()
    finally:
        for _, writer in held:
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_a_policy_reload_during_a_slow_sse_replay_still_revokes_the_stream(
    gateway: Gateway,
    policies_dir: Path,
    client_ssl: ssl.SSLContext,
    http: aiohttp.ClientSession,
    make_token: Any,
    tmp_path: Path,
) -> None:
    """issue 13 item 6: a stream that joined (Last-Event-ID replays) while a
    reload forbade its channels still received messages after the revocation."""
    text = (policies_dir / "10-test.yaml").read_text()
    revoked_dir = tmp_path / "revoked"
    revoked_dir.mkdir()
    (revoked_dir / "10-test.yaml").write_text(
        text.replace("subscribe: [role:member]", "subscribe: [role:admin]", 1)
    )
    revoked = load_policy_set(revoked_dir)
    broker = gateway.node.broker
    read_history = broker.replay
    swapped = asyncio.Event()
    joining = asyncio.Event()

    async def replay_after_swap(*args: Any, **kwargs: Any) -> Any:
        joining.set()
        await swapped.wait()
        return await read_history(*args, **kwargs)

    broker.replay = replay_after_swap  # type: ignore[method-assign]
    last_event_id = EventIds(["chat.race"]).encode({"chat.race": 0})
    opening = asyncio.ensure_future(
        open_events(
            http,
            gateway,
            client_ssl,
            ["chat.race"],
            make_token("alice"),
            {"Last-Event-ID": last_event_id},
        )
    )
    try:
        await asyncio.wait_for(joining.wait(), 10)
        await gateway.node.swap_policies(revoked)
    finally:
        swapped.set()  # (also when failing: a held read would stall the gateway's stop)
    response = await opening
    assert response.status == 403, response.status
    response.close()
    assert list(gateway.node.hub.subscribers("chat.race")) == []


async def test_a_closed_sse_stream_is_freed_without_the_cycle_collector(
    guarded: Gateway,
    connect_client: Any,
    client_ssl: ssl.SSLContext,
    http: aiohttp.ClientSession,
    make_token: Any,
) -> None:
    """The gateway freezes what lives longer than a second (gc_freeze_seconds,
    gateway/operations/collector.py): a closed stream left in reference cycles
    is then never collected. Each one was (stream and outbox, and through them
    its TLS layer and the listener's guard). Frozen while open, as in
    production, every one of them must be gone once the stream is closed."""
    import gc

    from gateway.operations import collector
    from gateway.transports.httplistener import _Guarded
    from gateway.transports.sse import SseOutbox
    from gateway.transports.sse_server import SseStream
    from gateway.transports.tls import TlsLayer

    kinds = (TlsLayer, _Guarded, SseStream, SseOutbox)

    gw = guarded
    alice = await connect_client("alice", gw=gw)
    gc.collect()
    before = existing(kinds)
    try:
        streams = []
        for n in range(3):
            response = await open_events(http, gw, client_ssl, ["chat.x"], make_token(f"s{n}"))
            assert response.status == 200
            streams.append(response)
        await alice.request("publish", channel="chat.x", data="hi")
        for response in streams:
            assert (await next_event(response))["event"] == "message"
        collector.collect_and_freeze()  # while they are open
        assert existing(kinds) - before == 3 * len(kinds)
        collector.collect_and_freeze()
        for response in streams:
            response.close()
        guard = gw.ops._sse.guard  # type: ignore[union-attr]
        assert guard is not None
        await until_held(guard, 0)
        for _ in range(20):  # the stream handlers end a few loop turns after the close
            await asyncio.sleep(0.01)
        assert existing(kinds) - before == 0
    finally:
        gc.unfreeze()
        gc.collect()

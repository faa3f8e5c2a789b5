"""Attacks on the SSE listener (GET /events) of the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from sse_helpers import next_event, open_events

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

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
    held: Streams = []
    try:
        for _ in range(20):  # TCP, not even a TLS ClientHello
            held.append(await asyncio.open_connection("127.0.0.1", gw.sse_port))
        for _ in range(20):  # TLS, then a request line and half the headers
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.sse_port, ssl=client_ssl, server_hostname="localhost"
            )
            writer.write(b"GET /events?channel=chat.x HTTP/1.1\r\nHost: localhost\r\n")
            held.append((reader, writer))
        # Past the cap of 10 open per address (counted once TLS is up, which
        # itself must end within the handshake timeout): dropped as they come.
        guard = gw.ops._sse.guard  # type: ignore[union-attr]
        assert guard is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while guard.open.refused < 10 and loop.time() < deadline:
            await asyncio.sleep(0.02)  # the gateway's side of the TLS handshakes
        assert guard.open.refused >= 10 and guard.open.held("127.0.0.1") == 10
        # Meanwhile the WebSocket port and /readyz answer.
        alice = await connect_client("alice", gw=gw)
        assert (await alice.request("subscribe", channel="chat.x"))["type"] == "ack"
        ready = await http.get(f"http://127.0.0.1:{gw.admin_port}/readyz")
        assert ready.status == 200
        ready.close()
        # Each is dropped once the handshake timeout (1 s) passes, not after a minute.
        results = await asyncio.gather(*(dropped(reader, 8) for reader, _ in held))
        assert all(results), results.count(False)
        assert guard.open.held("127.0.0.1") == 0
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

"""Attacks with WebSocket control frames (pings, pongs) on the real gateway.

websockets answers each ping with a pong at once; those never reach the
frame loop where data frames are metered. A peer that pings and does not
read must be stopped by the frame limits and the send buffer, and the auth
timeout must hold whatever it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

pytestmark = pytest.mark.integration

# A client's ping: masked (with a zero mask), 125 bytes of payload.
Held = list[Gateway | ClientConnection]
PING = b"\x89" + bytes((0x80 | 125,)) + b"\0\0\0\0" + b"p" * 125


async def start(settings: Settings, **limits: Any) -> Gateway:
    tuned = dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **limits))
    gw = Gateway(tuned, load_policy_set(tuned.policies_dir))
    await gw.start()
    return gw


@pytest.fixture
async def stopping() -> AsyncIterator[Held]:
    """Gateways to stop and clients to drop at the end (however the test went)."""
    started: Held = []
    yield started
    for item in reversed(started):
        if isinstance(item, Gateway):
            await item.stop()
        else:
            item.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(item.wait_closed(), 5)


async def ping_without_reading(ws: ClientConnection, count: int) -> None:
    ws.transport.pause_reading()
    for start_at in range(0, count, 100):
        if ws.transport.is_closing():
            return
        ws.transport.write(PING * min(100, count - start_at))
        await asyncio.sleep(0)


async def ended(ws: ClientConnection, timeout: float) -> int | None:
    """Read again and wait (bounded) for the end; the close code seen (None: dropped)."""
    ws.transport.resume_reading()
    await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code


async def test_a_ping_flood_before_authentication_is_closed_by_the_frame_limit(
    settings: Settings, cleanup_broker: None, client_ssl: ssl.SSLContext, stopping: Held
) -> None:
    """issue 13 item 3: pings without a token were ponged without limit."""
    gw = await start(settings, auth_timeout_seconds=30.0, frames_burst=200)
    stopping.append(gw)
    ws = await connect(f"wss://localhost:{gw.port}/ws", ssl=client_ssl, max_queue=None)
    stopping.append(ws)
    await ping_without_reading(ws, 3000)
    # Not the auth timeout's 4408 (30 s away): the frame limit's 4429.
    assert await ended(ws, 15) in (4429, 1006)


async def test_a_peer_that_pings_and_never_reads_is_dropped_at_the_send_buffer(
    settings: Settings, cleanup_broker: None, client_ssl: ssl.SSLContext, stopping: Held
) -> None:
    """Pongs count against the send buffer, and the auth timeout holds: the
    connection does not outlive auth timeout + close timeout (it lived 21 s)."""
    gw = await start(
        settings,
        auth_timeout_seconds=4.0,
        frames_per_second=1e6,  # under the frame limit: only the buffer can stop it
        frames_burst=1_000_000,
        send_buffer_bytes=64 * 1024,
        heartbeat_seconds=120.0,  # the heartbeat's overdue-close abort comes too late
    )
    stopping.append(gw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    ws = await connect(
        f"wss://localhost:{gw.port}/ws",
        ssl=client_ssl,
        sock=sock,
        server_hostname="localhost",
        max_queue=None,
    )
    stopping.append(ws)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert gw._server is not None
    (conn,) = gw._server.connections
    ws.transport.pause_reading()
    most = 0  # the most the gateway held unsent for this peer
    # Pings, never a read, for up to 30 s or until the gateway drops the connection.
    while conn.protocol.state is not State.CLOSED and loop.time() < started + 30:
        if not ws.transport.is_closing():
            ws.transport.write(PING * 500)
        if conn.transport is not None:
            most = max(most, conn.transport.get_write_buffer_size())
        await asyncio.sleep(0.005)
    lived = loop.time() - started
    # The send buffer (64 KiB) and one frame, not megabytes of pongs.
    assert most <= 64 * 1024 + gw.settings.limits.max_frame_bytes + 4096, most
    # auth timeout (4 s) + close timeout (5 s), with room for a loaded machine.
    assert conn.protocol.state is State.CLOSED and lived < 15, lived

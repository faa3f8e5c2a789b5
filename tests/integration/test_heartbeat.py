"""WebSocket heartbeats from the gateway's one heartbeat task (gateway/transports/heartbeat.py),
over real TLS with real tokens: a peer that answers stays, one that does not is
closed 1011 within the ping timeout."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set
from gateway.telemetry.events import TrafficEvent

pytestmark = pytest.mark.integration

INTERVAL = 0.2
TIMEOUT = 0.3


@pytest.fixture
async def beating(settings: Settings, cleanup_broker: None) -> AsyncIterator[Gateway]:
    limits = dataclasses.replace(
        settings.limits, heartbeat_seconds=INTERVAL, heartbeat_timeout_seconds=TIMEOUT
    )
    custom = dataclasses.replace(settings, limits=limits)
    gw = Gateway(custom, load_policy_set(custom.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


def never_answer_pings(ws: Any) -> None:
    """Make a websockets client read everything but drop the pongs it would send."""
    protocol = ws.protocol
    send_frame = protocol.send_frame

    def send_all_but_pongs(frame: Frame) -> None:
        if frame.opcode is not Opcode.PONG:
            send_frame(frame)

    protocol.send_frame = send_all_but_pongs


def server_connection(gw: Gateway, user: str) -> Any:
    (session,) = [s for s in gw.node.sessions if s.principal.sub == user]
    return session.outbox.connection


async def test_a_peer_that_never_answers_is_closed_and_one_that_answers_stays(
    beating: Gateway, connect_client: Any
) -> None:
    events: list[TrafficEvent] = []
    beating.node.events.subscribe(events.append)
    loop = asyncio.get_running_loop()
    answering = await connect_client("answering", gw=beating)
    silent = await connect_client("silent", gw=beating)
    never_answer_pings(silent.ws)
    started = loop.time()
    # The silent one keeps reading: it sees the server's close frame.
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(silent.ws.recv(), timeout=10)
    closed_after = loop.time() - started
    assert silent.ws.close_code == 1011
    assert silent.ws.close_reason == "keepalive ping timeout"
    # First ping one interval in, closed when its timeout ran out (a tick
    # late at most); generous for a busy machine, far below "never".
    assert closed_after < INTERVAL + TIMEOUT + 2.0
    assert beating.heartbeat is not None and beating.heartbeat.expired == 1

    # The answering one was pinged all along and is still served.
    await asyncio.sleep(5 * INTERVAL)
    assert answering.ws.protocol.state is State.OPEN
    assert (await answering.request("ping"))["type"] == "pong"
    assert server_connection(beating, "answering").latency > 0  # pongs were matched
    for _ in range(100):  # the silent one's handler ends after its close
        if any(e.kind == "closed" and e.user == "silent" for e in events):
            break
        await asyncio.sleep(0.05)
    closed = {e.user: e.detail for e in events if e.kind == "closed"}
    # The server sent 1011 and did not wait for the peer's close frame (as
    # websockets' keepalive does), so it records an abnormal closure.
    assert closed == {"silent": "1006"}
    assert len(beating.heartbeat) == 1


async def test_connections_that_end_leave_the_heartbeat(
    beating: Gateway, connect_client: Any
) -> None:
    clients = [await connect_client(f"u{i}", gw=beating) for i in range(5)]
    assert beating.heartbeat is not None and len(beating.heartbeat) == 5
    for client in clients[:3]:
        await client.close()
    for _ in range(100):
        if len(beating.heartbeat) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(beating.heartbeat) == 2
    await asyncio.sleep(3 * INTERVAL)
    assert all(c.ws.protocol.state is State.OPEN for c in clients[3:])
    assert beating.heartbeat.expired == 0


async def test_a_connection_keeps_nothing_of_its_handshake(
    beating: Gateway, connect_client: Any
) -> None:
    """The Authorization header (the token) is not held for the connection's life."""
    token_holder = await connect_client("holder", gw=beating)
    connection = server_connection(beating, "holder")
    assert connection.request is not None and "Authorization" not in connection.request.headers
    assert connection.response is not None and not connection.response.headers
    assert (await token_holder.request("ping"))["type"] == "pong"

"""Graceful shutdown: stop accepting, answer in-flight publishes, close with 1001."""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.config import Settings
from gateway.server import Gateway

from .processes import GatewayProcess

pytestmark = pytest.mark.integration


async def test_stop_answers_every_in_flight_publish_then_closes_with_1001(
    connect_client: Any, gateway: Gateway
) -> None:
    bob = await connect_client("bob")
    for i in range(200):
        await bob.send(type="publish", channel="chat.bye", data=i, id=i)
    stopping = asyncio.create_task(gateway.stop())
    answered: set[int] = set()
    with pytest.raises(ConnectionClosed):
        while True:
            frame = await bob.recv(10)
            if frame["type"] in ("ack", "error"):
                assert frame["type"] == "ack" or frame["code"] == "unavailable", frame
                answered.add(frame["id"])
    await stopping
    assert bob.ws.close_code == 1001
    assert answered == set(range(200)), "a publish was left unanswered"


async def test_sigterm_stops_the_process_within_bounds(
    settings: Settings,
    tmp_path: Path,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    cleanup_broker: None,
) -> None:
    process = GatewayProcess(settings, tmp_path).start()
    try:
        headers = {"Authorization": f"Bearer {make_token('alice')}"}
        async with connect(
            f"wss://localhost:{process.port}/ws", ssl=client_ssl, additional_headers=headers
        ) as ws:
            assert orjson.loads(await ws.recv())["type"] == "welcome"
            started = time.monotonic()
            process.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1001
        assert await asyncio.to_thread(process.wait, 15) == 0
        assert time.monotonic() - started < 15
    finally:
        process.stop()

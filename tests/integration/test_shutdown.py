"""Graceful shutdown: stop accepting, answer in-flight publishes, close with 1001."""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.app import Gateway
from gateway.config import Settings

from .processes import GatewayProcess, free_port

pytestmark = pytest.mark.integration


async def test_stop_answers_every_publish_it_read_then_closes_with_1001(
    connect_client: Any,
    gateway: Gateway,
    amqp: aio_pika.abc.AbstractConnection,
    exchange_prefix: str,
) -> None:
    channel = await amqp.channel()
    backend = await channel.declare_queue(exclusive=True)
    await backend.bind(f"{exchange_prefix}.chat", "chat.bye")
    bob = await connect_client("bob")
    for i in range(200):
        await bob.send(type="publish", channel="chat.bye", data=i, id=i)
    stopping = asyncio.create_task(gateway.stop())
    answers: dict[int, str] = {}
    with pytest.raises(ConnectionClosed):
        while True:
            frame = await bob.recv(10)
            if frame["type"] in ("ack", "error"):
                assert frame["type"] == "ack" or frame["code"] == "unavailable", frame
                answers[frame["id"]] = frame["type"]
    await stopping
    assert bob.ws.close_code == 1001
    # Frames the server had read are all answered, in order; the rest were never
    # read, and the client (seeing no ack) knows to publish them again elsewhere.
    assert answers and sorted(answers) == list(range(len(answers))), "a read publish was dropped"
    acked = [i for i, kind in sorted(answers.items()) if kind == "ack"]
    stored: list[int] = []
    while len(stored) < len(acked):
        message = await backend.get(timeout=5)
        stored.append(orjson.loads(message.body))
        await message.ack()
    assert stored[: len(acked)] == acked, "an acked publish is not in RabbitMQ"


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


async def test_with_a_shutdown_delay_readyz_turns_503_while_clients_are_still_served(
    settings: Settings,
    tmp_path: Path,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    cleanup_broker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM with `shutdown_delay_seconds`: a load balancer polling /readyz stops
    sending new clients while the gateway still serves; then the usual 1001."""
    admin_port = free_port()
    monkeypatch.setenv("RABBITGATE_ADMIN_PORT", str(admin_port))
    monkeypatch.setenv("RABBITGATE_SHUTDOWN_DELAY_SECONDS", "3")
    process = GatewayProcess(settings, tmp_path).start()

    async def readyz() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
                return response.status, await response.json()

    url = f"wss://localhost:{process.port}/ws"
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    try:
        assert (await readyz())[0] == 200
        async with connect(url, ssl=client_ssl, additional_headers=headers) as ws:
            assert orjson.loads(await ws.recv())["type"] == "welcome"
            process.signal(signal.SIGTERM)
            deadline = time.monotonic() + 2
            while (status := await readyz())[0] == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert status == (503, {"status": "unavailable", "reason": "shutting down"})
            # Still serving: the open connection answers, a new one is let in.
            await ws.send('{"type":"ping","id":1}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
            async with connect(url, ssl=client_ssl, additional_headers=headers) as late:
                assert orjson.loads(await late.recv())["type"] == "welcome"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1001
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        process.stop()

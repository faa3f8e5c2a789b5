"""Helpers of the anomaly integration tests: a baseline model, clients from
chosen loopback addresses, reading alerts (fixtures: tests/anomaly_fixtures.py)."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aio_pika
from websockets.asyncio.client import ClientConnection, connect

from gateway.app import Gateway


async def open_ws(
    port: int, client_ssl: ssl.SSLContext, token: str, address: str
) -> ClientConnection:
    """A WebSocket from ``address`` (any 127.x.y.z) authenticated with a header."""
    return await connect(
        f"wss://localhost:{port}/ws",
        ssl=client_ssl,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=["rabbitgate.v1"],  # type: ignore[list-item]
        local_addr=(address, 0),
        max_queue=None,
    )


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame["type"] == "welcome", frame
    return dict(frame)


async def scan_channels(ws: ClientConnection, count: int) -> None:
    """Subscribe to other people's inboxes (each one refused), waiting for every answer."""
    for n in range(count):
        await ws.send(json.dumps({"type": "subscribe", "id": n, "channel": f"user.u{n}.inbox"}))
    answered = 0
    while answered < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame.get("type") == "error" and frame.get("code") == "forbidden":
            answered += 1


async def closed_with(ws: ClientConnection, timeout: float = 5) -> int | None:
    async def drain() -> None:
        try:
            async for _ in ws:
                pass
        except Exception:
            pass

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code


async def next_alert(queue: aio_pika.abc.AbstractQueue, timeout: float = 10) -> tuple[str, dict]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            assert message.content_type == "application/json"
            return message.routing_key or "", json.loads(message.body)
        await asyncio.sleep(0.05)
    raise AssertionError("no alert published")


async def user_alert_for(gateway: Gateway, user: str) -> dict[str, Any]:
    store = gateway.anomaly.detector.store
    found = await asyncio.to_thread(store.find, subject=user)
    about_user = [a for a in found if a["subject"]["kind"] == "user"]
    assert about_user, f"no alert about user {user}"
    return about_user[0]

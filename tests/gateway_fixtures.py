"""Fixtures that run a real gateway (TLS, real tokens, the real RabbitMQ) and a test client."""

from __future__ import annotations

import asyncio
import gc
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.app import Gateway
from gateway.config import Settings
from gateway.devtools.devcerts import client_ssl_context
from gateway.policy.rules import load_policy_set


class Client:
    """A test client over a real TLS WebSocket. Keeps ``message`` frames that
    arrive while it waits for an answer, so no frame is ever thrown away."""

    _ids = itertools.count(1)

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        return frame

    async def request(self, kind: str, timeout: float = 5, **fields: Any) -> dict[str, Any]:
        """Send a frame with a fresh id and return its ack or error."""
        request_id = fields.pop("id", None) or f"r{next(self._ids)}"
        await self.send(type=kind, id=request_id, **fields)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - loop.time()))
            if frame.get("id") == request_id and frame["type"] in ("ack", "error", "pong"):
                return frame
            self._keep(frame)

    async def next_message(self, timeout: float = 5) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == "message":
                return frame
            self.other.append(frame)

    async def messages_until(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        got = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(got) < count:
            got.append(await self.next_message(max(0.01, deadline - loop.time())))
        return got

    def _keep(self, frame: dict[str, Any]) -> None:
        (self.messages if frame.get("type") == "message" else self.other).append(frame)

    async def close(self) -> None:
        await self.ws.close()


def existing(kinds: tuple[type, ...]) -> int:
    """Objects of ``kinds`` that exist in any form, garbage in frozen cycles included.

    Counted after ``gc.unfreeze`` and before any collection. By ``type``, not
    ``isinstance``: ``isinstance`` on a dead weak proxy raises.
    """
    gc.unfreeze()
    return sum(issubclass(type(o), kinds) for o in gc.get_objects())


@pytest.fixture
def client_ssl(certs: Any) -> ssl.SSLContext:
    return client_ssl_context(certs.ca_cert)


@pytest.fixture
async def gateway(settings: Settings, cleanup_broker: None) -> AsyncIterator[Gateway]:
    gw = Gateway(settings, load_policy_set(settings.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


ConnectFn = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect_client(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Callable[..., str]
) -> AsyncIterator[ConnectFn]:
    """connect_client("alice") -> a Client already past ``welcome``."""
    opened: list[Client] = []

    async def open_client(
        sub: str | None = None,
        *,
        token: str | None = None,
        header: bool = True,
        gw: Gateway | None = None,
        **token_args: Any,
    ) -> Client:
        target = gw or gateway
        if token is None and sub is not None:
            token = make_token(sub, **token_args)
        headers = {"Authorization": f"Bearer {token}"} if header and token else None
        ws = await connect(
            f"wss://localhost:{target.port}/ws",
            ssl=client_ssl,
            additional_headers=headers,
            subprotocols=["rabbitgate.v1"],
            max_queue=None,  # tests read lazily; never stall the server on us
        )
        client = Client(ws)
        opened.append(client)
        if not header and token:
            await client.send(type="auth", token=token)
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        client.welcome = welcome  # type: ignore[attr-defined]
        return client

    yield open_client
    for client in opened:
        await client.ws.close()

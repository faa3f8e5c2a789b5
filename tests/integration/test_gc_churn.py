"""Connections frozen out of the collector's sight are still freed when they end.

``gateway/operations/collector.py`` freezes every object that survives a collection, so a
connection that lives a second is frozen; if it were left in a reference
cycle when it closes, nothing would ever free it. ``ws_adapter.release``
breaks those cycles. These tests churn real connections (TLS, tokens,
subscribe, publish through RabbitMQ, a refused handshake, a client that
leaves without a close frame) on uvloop, as ``rabbitgate serve`` runs,
freezing while the connections are alive, and count what of them remains.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidStatus
from websockets.server import ServerProtocol

from gateway.app import Gateway
from gateway.config import Settings
from gateway.core.session import Session
from gateway.operations import collector
from gateway.policy.rules import load_policy_set
from gateway.transports import ws_adapter
from gateway.transports.outbox import Outbox
from tests.gateway_fixtures import Client

pytestmark = pytest.mark.integration

ROUNDS = 4
PER_ROUND = 6
# Kept a while after their connection by design, each bounded: heartbeat wheel
# entries until their tick (heartbeat.py), cancelled deadlines until they come
# due or the heap is compacted (deadlines.py), confirmed publishes until the
# next sweep (publisher.py). Not what this test is about.
BOUNDED = {"_Beat", "Deadline", "_Pending"}


@pytest.fixture
def frozen_cleanup() -> Iterator[None]:
    """Whatever a test froze goes back to the collector afterwards."""
    yield
    gc.unfreeze()
    gc.collect()


def server_side_objects() -> dict[str, int]:
    """Objects of a server connection that exist in any form, garbage included.

    Counted after ``gc.unfreeze`` and before any collection: a connection left
    in a frozen cycle is counted here even though nothing reaches it.
    """
    gc.unfreeze()
    counts = {"connections": 0, "protocols": 0, "sessions": 0, "outboxes": 0, "gateway": 0}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: a dead weak proxy raises on it
        if issubclass(kind, ServerConnection):
            counts["connections"] += 1
        elif issubclass(kind, ServerProtocol):
            counts["protocols"] += 1
        elif issubclass(kind, Session):
            counts["sessions"] += 1
        elif issubclass(kind, Outbox):
            counts["outboxes"] += 1
        elif kind.__name__ in BOUNDED:
            continue
        if str(getattr(kind, "__module__", "")).startswith("gateway."):
            counts["gateway"] += 1
    return counts


async def settle(gateway: Any) -> None:
    """Until websockets is done with every connection and each was released."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while gateway._server.connections or gateway._server.handler_tasks:
        assert loop.time() < deadline, "connections did not end"
        await asyncio.sleep(0.02)
    for _ in range(5):  # release runs call_soon after the handler task's end
        await asyncio.sleep(0)


class Churn:
    """A real gateway on uvloop (as ``rabbitgate serve`` runs it) and its clients."""

    def __init__(self, gateway: Gateway, make_token: Any, client_ssl: Any) -> None:
        self.gateway = gateway
        self.make_token = make_token
        self.client_ssl = client_ssl

    async def open(self, sub: str) -> Client:
        ws = await connect(
            f"wss://localhost:{self.gateway.port}/ws",
            ssl=self.client_ssl,
            additional_headers={"Authorization": f"Bearer {self.make_token(sub)}"},
            subprotocols=["rabbitgate.v1"],
            max_queue=None,
        )
        client = Client(ws)
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        return client

    async def round(self, n: int) -> None:
        clients = [await self.open(f"churn{n}-{i}") for i in range(PER_ROUND)]
        for client in clients[::2]:
            ack = await client.request("subscribe", channel="chat.lobby")
            assert ack["type"] == "ack", ack
        ack = await clients[1].request("publish", channel="chat.lobby", data={"n": n})
        assert ack["type"] == "ack", ack
        await clients[0].next_message()
        with pytest.raises(InvalidStatus):  # refused in the handshake: 401
            async with connect(
                f"wss://localhost:{self.gateway.port}/ws",
                ssl=self.client_ssl,
                additional_headers={"Authorization": "Bearer not-a-token"},
                subprotocols=["rabbitgate.v1"],
            ):
                pass
        # While they are all alive: everything they are made of is frozen now.
        collector.collect_and_freeze()
        for client in clients[:-1]:
            await client.close()
        clients[-1].ws.transport.abort()  # leaves without a closing handshake
        await settle(self.gateway)


def run_churn(settings: Settings, make_token: Any, client_ssl: Any, scenario: Any) -> Any:
    async def main() -> Any:
        gateway = Gateway(settings, load_policy_set(settings.policies_dir))
        await gateway.start()
        try:
            return await scenario(Churn(gateway, make_token, client_ssl))
        finally:
            await gateway.stop()

    return uvloop.run(main())


def test_churned_connections_leave_nothing_behind_when_frozen_alive(
    settings: Settings,
    make_token: Any,
    client_ssl: Any,
    cleanup_broker: None,
    frozen_cleanup: None,
) -> None:
    async def scenario(churn: Churn) -> tuple[dict[str, int], dict[str, int]]:
        await churn.round(0)  # warm caches up
        gc.collect()
        before = server_side_objects()
        for n in range(1, ROUNDS + 1):
            await churn.round(n)
        return before, server_side_objects()

    before, after = run_churn(settings, make_token, client_ssl, scenario)
    # Counted against ``before``: under pytest-xdist this process ran other
    # test files first, and one may still hold a session of its own.
    for kind in ("connections", "protocols", "sessions", "outboxes"):
        assert after[kind] - before[kind] <= 0, (kind, before, after)
    # Nothing else of the gateway's grows with the connections it has served
    # (less than one object per round of them).
    assert after["gateway"] - before["gateway"] < ROUNDS, (before, after)


def test_without_release_frozen_connections_are_never_freed(
    settings: Settings,
    make_token: Any,
    client_ssl: Any,
    cleanup_broker: None,
    frozen_cleanup: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: the same churn with ``release`` a no-op leaves every
    connection behind, so the test above can fail."""
    monkeypatch.setattr(ws_adapter, "release", lambda connection: None)

    async def scenario(churn: Churn) -> dict[str, int]:
        await churn.round(0)
        gc.collect()
        await churn.round(1)
        return server_side_objects()

    after = run_churn(settings, make_token, client_ssl, scenario)
    assert after["connections"] >= PER_ROUND, after

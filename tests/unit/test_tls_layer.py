"""The TLS layer (gateway/transports/tls.py) over real loopback TCP and real TLS.

Each test runs on uvloop (what ``rabbitgate serve`` runs) and on asyncio's
own loop (what the rest of the suite runs): their TCP transports differ in
how ``set_protocol`` and reads interleave.
"""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from gateway.devtools.devcerts import client_ssl_context, server_ssl_context
from gateway.transports.tls import TlsLayer

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


class Echo(asyncio.Protocol):
    """The application side: echoes what it reads, records what happened."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        self.context = context
        self.timeout = timeout
        self.events: list[str] = []
        self.layer: TlsLayer | None = None
        self.received = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        if isinstance(transport, TlsLayer):
            self.events.append("open")
            self.layer = transport
        else:
            TlsLayer(transport, self, self.context, self.timeout, self._opened, self._failed)

    def _opened(self, layer: TlsLayer) -> None:
        self.connection_made(layer)

    def _failed(self, layer: TlsLayer) -> None:
        self.events.append("failed")
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received += data
        assert self.layer is not None
        self.layer.write(data)

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(None)


Body = Callable[[int, list[Echo], ssl.SSLContext], Awaitable[None]]


def run(loop_name: str, body: Body, certs: Any, timeout: float = 5.0) -> None:
    async def main() -> None:
        server_context = server_ssl_context(certs.server_cert, certs.server_key)
        apps: list[Echo] = []

        def factory() -> Echo:
            apps.append(Echo(server_context, timeout))
            return apps[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(body(port, apps, client_ssl_context(certs.ca_cert)), 20)
        finally:
            server.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


async def connect_tls(
    port: int, client: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")


@pytest.mark.parametrize("loop_name", LOOPS)
def test_bytes_cross_both_ways_in_records_of_every_size(loop_name: str, certs: Any) -> None:
    async def body(port: int, apps: list[Echo], client: ssl.SSLContext) -> None:
        reader, writer = await connect_tls(port, client)
        payload = os.urandom(300_000)  # many records, several TCP reads
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        assert bytes(apps[0].received) == payload
        layer = apps[0].layer
        assert layer is not None
        assert isinstance(layer.get_extra_info("ssl_object"), ssl.SSLObject)
        assert layer.get_extra_info("peername")[0] == "127.0.0.1"
        assert layer.get_extra_info("cipher") is not None
        assert not layer.can_write_eof() and not layer.is_closing()
        writer.close()
        await writer.wait_closed()

    run(loop_name, body, certs)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_close_notify_is_the_applications_eof(loop_name: str, certs: Any) -> None:
    async def body(port: int, apps: list[Echo], client: ssl.SSLContext) -> None:
        reader, writer = await connect_tls(port, client)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()  # asyncio's TLS sends close_notify
        await asyncio.wait_for(apps[0].lost, 5)
        assert apps[0].events == ["open", "eof", "lost"]

    run(loop_name, body, certs)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_servers_close_sends_close_notify_and_ends_tcp(loop_name: str, certs: Any) -> None:
    async def body(port: int, apps: list[Echo], client: ssl.SSLContext) -> None:
        reader, writer = await connect_tls(port, client)
        writer.write(b"x")
        await reader.readexactly(1)
        layer = apps[0].layer
        assert layer is not None
        layer.write(b"last words")
        layer.close()
        assert layer.is_closing()
        layer.write(b"after close")  # dropped, not an error
        # A clean TLS end: the data, then EOF (no ragged-EOF error).
        assert await reader.read() == b"last words"
        await asyncio.wait_for(apps[0].lost, 5)
        writer.close()

    run(loop_name, body, certs)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_silent_connection_is_dropped_at_the_handshake_timeout(
    loop_name: str, certs: Any
) -> None:
    async def body(port: int, apps: list[Echo], client: ssl.SSLContext) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        assert await reader.read() == b""  # closed by the server
        assert asyncio.get_running_loop().time() - started < 3
        await asyncio.wait_for(apps[0].lost, 5)
        assert apps[0].events == ["failed"]  # the application never had it
        writer.close()

    run(loop_name, body, certs, timeout=0.5)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(
    "hostile",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plaintext to a TLS port
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a truncated, malformed ClientHello
        b"\x16\x03\x01\xff\xff" + b"\x00" * 70_000,  # a record longer than TLS allows
    ],
)
def test_hostile_handshakes_cost_only_their_connection(
    loop_name: str, hostile: bytes, certs: Any
) -> None:
    async def body(port: int, apps: list[Echo], client: ssl.SSLContext) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hostile)
        await asyncio.wait_for(reader.read(), 5)  # an alert at most, then the end
        await asyncio.wait_for(apps[0].lost, 5)
        assert apps[0].events == ["failed"]
        for _ in range(3):
            await asyncio.sleep(0)
        # Freed at once: not held until the handshake timeout by its timer.
        gc.collect()
        assert not any(isinstance(o, TlsLayer) for o in gc.get_objects())
        writer.close()
        # The listener still serves the next client.
        reader, writer = await connect_tls(port, client)
        writer.write(b"ok")
        assert await reader.readexactly(2) == b"ok"
        writer.close()
        await writer.wait_closed()

    run(loop_name, body, certs)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_closed_connection_is_freed_without_the_cycle_collector(
    loop_name: str, certs: Any
) -> None:
    found: dict[str, int] = {}

    async def body(port: int, apps: list[Echo], client: ssl.SSLContext) -> None:
        reader, writer = await connect_tls(port, client)
        writer.write(b"x")
        await reader.readexactly(1)
        writer.close()
        await asyncio.wait_for(apps[0].lost, 5)
        apps[0].layer = None  # the application lets go, as websockets' release does
        for _ in range(3):
            await asyncio.sleep(0)
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds lands in gc.garbage
        try:
            gc.collect()
            found["in cycles"] = sum(isinstance(o, TlsLayer) for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        found["alive"] = sum(isinstance(o, TlsLayer) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        run(loop_name, body, certs)
    finally:
        gc.enable()
    # Freed by reference counting as soon as it closed: not left for the
    # collector (which the gateway's frozen connections never see), not held.
    assert found == {"in cycles": 0, "alive": 0}

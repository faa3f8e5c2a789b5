"""A minimal WebSocket client (RFC 6455) for load generation.

The load generator must cost far less CPU per message than the servers it
measures, or it becomes the bottleneck on a small machine. A full client
library parses every frame into objects; this one is an ``asyncio.Protocol``
that finds frame boundaries in the receive buffer and hands each text
payload, as a slice of that buffer, to a callback, with the arrival time of
the read that carried it (one clock read per read, not per frame).

Shortcuts a real client must not take, fine against 127.0.0.1: the mask key
is all zeros (legal, and the payload is then sent as is), the server's
``Sec-WebSocket-Accept`` is not checked, and fragmented messages are not
reassembled (neither rabbitgate nor Web-STOMP fragments what it sends).
Pings are answered, so server heartbeats never close a benchmark connection.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_ZERO_MASK = b"\x00\x00\x00\x00"
_MAX_HANDSHAKE_BYTES = 16 * 1024

# (buffer, payload start, payload end, arrival time in ns)
TextHandler = Callable[[bytearray, int, int, int], None]


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked (with a zero key) client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _ZERO_MASK + payload


class WsClient(asyncio.Protocol):
    """One client connection. Until ``on_text`` is set, text payloads go to
    ``inbox`` (for the setup exchange: welcome, acks, CONNECTED...); after, to
    ``on_text`` only."""

    def __init__(
        self, host: str, path: str, subprotocol: str | None, headers: Mapping[str, str]
    ) -> None:
        loop = asyncio.get_running_loop()
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.on_text: TextHandler | None = None
        self.close_code: int | None = None
        # rabbitgate's welcome ``heartbeat`` (seconds): how often a client that only
        # listens must send a frame, or the idle timeout closes it (clients.Connector).
        self.heartbeat: float | None = None
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded = False

    # --- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        self._write(self._request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HANDSHAKE_BYTES:
                    self._fail(HandshakeRefused("oversized handshake response"))
                return
            status = bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")
            if status.split(" ", 2)[1:2] != ["101"]:
                self._fail(HandshakeRefused(status))
                return
            del buf[: end + 4]
            self._upgraded = True
            if self.opened.done():  # the caller gave up waiting
                self._fail(TimeoutError("handshake answered too late"))
                return
            self.opened.set_result(None)
        self._parse(time.time_ns())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    # --- frames --------------------------------------------------------------

    def _parse(self, now_ns: int) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode <= OP_BINARY:  # text, binary (or a continuation)
                handler = self.on_text
                if handler is not None:
                    handler(buf, start, end, now_ns)
                else:
                    self.inbox.put_nowait(bytes(buf[start:end]))
            elif opcode == OP_PING:
                self._write(client_frame(OP_PONG, bytes(buf[start:end])))
            elif opcode == OP_CLOSE:
                if length >= 2:
                    self.close_code = (buf[start] << 8) | buf[start + 1]
                self._write(client_frame(OP_CLOSE, bytes(buf[start : start + 2])))
                if self.transport is not None:
                    self.transport.close()
            pos = end
        if pos:
            del buf[:pos]

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # --- for callers ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send_text(self, payload: bytes) -> None:
        self._write(client_frame(OP_TEXT, payload))

    async def next_text(self, timeout: float = 10.0) -> bytes:
        """The next payload while ``on_text`` is unset; raises on close or timeout."""
        get: asyncio.Future[bytes] = asyncio.ensure_future(self.inbox.get())
        waited: set[asyncio.Future[Any]] = {get, self.closed}
        done, _ = await asyncio.wait(waited, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self.closed.done():
            raise ConnectionResetError(f"connection closed (code {self.close_code})")
        raise TimeoutError("no frame from the server in time")

    def close(self) -> None:
        if self.is_open:
            self._write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            assert self.transport is not None
            self.transport.close()


async def open_ws(
    host: str,
    port: int,
    path: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    subprotocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> WsClient:
    """Connect and upgrade; raises HandshakeRefused, OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    host_header = f"{server_hostname or host}:{port}"
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(
            lambda: WsClient(host_header, path, subprotocol, headers or {}),
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname if ssl_context is not None else None,
        )
        await client.opened
    return client

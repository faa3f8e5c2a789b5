"""A bare STOMP client over ``websockets`` for tests: frames written by hand.

Its reader is written apart from gateway/transports/stomp/frames.py on purpose (a test
that parsed the server's frames with the server's own parser would prove
little): split on NUL, honour content-length, undo 1.2 escaping.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect

_UNESCAPE = {"n": "\n", "r": "\r", "c": ":", "\\": "\\"}


@dataclass
class ServerFrame:
    command: str
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def _unescape(text: str) -> str:
    out, chars = [], iter(text)
    for char in chars:
        out.append(_UNESCAPE[next(chars)] if char == "\\" else char)
    return "".join(out)


def parse_server_frames(data: bytes, escaped: bool = True) -> list[ServerFrame]:
    frames = []
    while data:
        data = data.lstrip(b"\r\n")
        if not data:
            break
        head, _, rest = data.partition(b"\n\n")
        lines = head.decode().split("\n")
        command = lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if escaped and command != "CONNECTED":
                name, value = _unescape(name), _unescape(value)
            headers.setdefault(name, value)
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, data = rest[:size], rest[size:]
            assert data[:1] == b"\0", "frame does not end with NUL after content-length"
            data = data[1:]
        else:
            body, _, data = rest.partition(b"\0")
        frames.append(ServerFrame(command, headers, body))
    return frames


def frame(command: str, body: bytes | str = b"", **headers: str) -> bytes:
    """A client frame; header names with '_' are written with '-'."""
    lines = [command] + [f"{k.replace('_', '-')}:{v}" for k, v in headers.items()]
    raw = body.encode() if isinstance(body, str) else body
    return ("\n".join(lines) + "\n\n").encode() + raw + b"\0"


@dataclass
class StompWire:
    ws: ClientConnection
    heartbeats: int = 0
    frames: list[ServerFrame] = field(default_factory=list)

    async def send(self, data: bytes | str) -> None:
        await self.ws.send(data if isinstance(data, str) else data.decode(), text=True)

    async def recv(self, timeout: float = 5) -> ServerFrame:
        """The next frame (heart-beats counted, not returned)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.frames:
            left = max(0.0, deadline - loop.time())
            data = await asyncio.wait_for(self.ws.recv(decode=False), left)
            if not data.strip(b"\r\n"):
                self.heartbeats += 1
                continue
            self.frames.extend(parse_server_frames(data))
        return self.frames.pop(0)

    async def until(self, command: str, timeout: float = 5) -> ServerFrame:
        while True:
            got = await self.recv(timeout)
            if got.command == command:
                return got

    async def connect(self, passcode: str | None = None, **headers: str) -> ServerFrame:
        fields = {"accept_version": "1.2,1.1,1.0", "host": "/", **headers}
        if passcode is not None:
            fields["passcode"] = passcode
        await self.send(frame("CONNECT", **fields))
        return await self.recv()

    async def closed(self, timeout: float = 5) -> int | None:
        """Wait for the server to close; its close code."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code


async def open_wire(
    port: int,
    client_ssl: ssl.SSLContext,
    *,
    subprotocols: tuple[str, ...] = ("v12.stomp", "v11.stomp", "v10.stomp"),
    token: str | None = None,
) -> StompWire:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = await connect(
        f"wss://localhost:{port}/ws",
        ssl=client_ssl,
        subprotocols=list(subprotocols),  # type: ignore[list-item]
        additional_headers=headers,
        max_queue=None,
    )
    return StompWire(ws)

"""The WebSocket transport: a connection's send path as the core's ``Transport``.

``WebSocketTransport`` is the connection's ``Outbox`` (frames written straight
into the socket's transport, bounded; ``transports/outbox.py``) plus what
the core's ``Session`` asks of any transport: close with a code, stop
reading a flooding client, close it ahead of its unread flood. A subclass
with no slots of its own, so a connection costs no more memory than before,
and the fan-out still recognises it as an ``Outbox`` (framed once for all).
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from websockets.protocol import State

from gateway.core.transport import TransportKind
from gateway.transports.outbox import Outbox


class WebSocketTransport(Outbox):
    __slots__ = ()

    kind: ClassVar[TransportKind] = "websocket"

    @property
    def open(self) -> bool:
        return self.connection.protocol.state is State.OPEN

    def close(self, code: int, reason: str) -> asyncio.Task[None]:
        """Send a close frame behind what is queued (the handler then ends the session)."""
        return asyncio.get_running_loop().create_task(self.connection.close(code, reason))

    def stop_reading(self) -> None:
        transport = self.connection.transport
        if transport is not None:
            transport.pause_reading()

    async def close_flooded(self, code: int, reason: str) -> None:
        connection = self.connection
        closing = asyncio.ensure_future(connection.close(code, reason))
        await asyncio.sleep(0)  # close() has written the close frame
        # Reading stays paused, so the client's answering close frame would
        # sit behind its flood, unread: end our side of the TCP connection
        # once the close frame is out (the server closes the TCP connection
        # first anyway, RFC 6455 section 7.1.1), so the client sees the close
        # now; the socket goes when the close times out. Not close(): with
        # unread data that sends a reset, which can destroy the close frame.
        transport = connection.transport
        if connection.protocol.state is State.CLOSING and transport is not None:
            if transport.can_write_eof():
                transport.write_eof()
        await closing

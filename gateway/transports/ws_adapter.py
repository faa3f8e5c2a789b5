"""Every use rabbitgate makes of websockets' undocumented internals, in one place.

The gateway reaches past websockets' public API for memory and speed at
10,000s of connections. Each reach is a function or class here, named for
what it does, and has a canary test (tests/unit/test_ws_adapter.py) that
fails when a websockets release moves the internal it relies on.
pyproject.toml pins websockets to the minor release those tests ran on.

Internals used, by purpose:

- closing cycles (``release``): ``ServerConnection.__dict__`` and
  ``ServerProtocol.__dict__``; ``Server.handler`` and ``Server.handler_tasks``
  (``start_handler``, which does what ``ServerConnection.connection_made`` does).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


class _Released:
    """What a released connection's ``protocol`` is: a closed one, nothing else.

    Code that still holds the connection (a session being wound up, an
    outbox) reads ``connection.state``, ``close_code``, ``close_reason`` and
    ``protocol.extensions``; all answer as for any closed connection.
    """

    __slots__ = ("close_code", "close_reason")
    state = State.CLOSED
    extensions: tuple[()] = ()

    def __init__(self, close_code: int | None, close_reason: str | None) -> None:
        self.close_code = close_code
        self.close_reason = close_reason


def release(connection: ServerConnection) -> None:
    """Break the reference cycles of a connection that is over (handler done, TCP closed).

    A websockets connection is ~45 objects in reference cycles (connection,
    protocol, parser generator, assembler, futures, the TLS protocol and
    transport, bound methods held as callbacks): without this, only a full
    collection frees a closed connection, and a connection frozen out of the
    collector's sight (``gateway/operations/collector.py``) would never be freed.
    Emptying the connection's and its protocol's attributes leaves nothing
    cyclic: plain reference counting frees all of it at once.

    Call only once nothing will drive the connection any more:
    ``start_handler`` does, after the handler task and ``connection_lost``.
    """
    protocol = connection.protocol
    if isinstance(protocol, _Released):
        return
    closed = _Released(protocol.close_code, protocol.close_reason)
    vars(protocol).clear()
    vars(connection).clear()
    connection.protocol = closed  # type: ignore[assignment]
    connection.transport = None  # type: ignore[assignment]


def _release_when_lost(connection: ServerConnection, task: asyncio.Task[None]) -> None:
    waiter: asyncio.Future[None] = connection.connection_lost_waiter
    loop = task.get_loop()
    if waiter.done():
        loop.call_soon(release, connection)
    else:  # the handler gave up waiting (close timeout, abort): release once it is lost
        waiter.add_done_callback(lambda _: loop.call_soon(release, connection))


def start_handler(connection: ServerConnection, transport: asyncio.BaseTransport) -> None:
    """``ServerConnection.connection_made``, plus ``release`` once the connection is over.

    websockets starts the connection's handler task (its whole life: the
    opening handshake, our handler, the closing handshake) in
    ``connection_made`` and registers it with the server; done the same way
    here so that the task's end, which only websockets knows, can be seen.
    """
    Connection.connection_made(connection, transport)
    server: Any = connection.server
    task: asyncio.Task[None] = connection.loop.create_task(server.handler(connection))
    server.handler_tasks.add(task)
    task.add_done_callback(partial(_release_when_lost, connection))

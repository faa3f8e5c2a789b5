"""Every use rabbitgate makes of websockets' undocumented internals, in one place.

The gateway reaches past websockets' public API for memory and speed at
10,000s of connections. Each reach is a function or class here, named for
what it does, with a canary test in tests/unit/test_ws_adapter.py (and
test_handshake_memory.py) that fails when a websockets release moves the
internal it relies on; pyproject.toml pins websockets to the minor release
those tests ran on. Nothing else in gateway/ may touch these internals.

Internals used, by purpose:

- not keeping the handshake (``forget_request_in_parser``,
  ``forget_handshake``): ``ServerProtocol.parse`` is a generator that ends
  with ``yield from super().parse()`` and holds the request meanwhile;
  ``Protocol.parser``; ``ServerConnection.request`` / ``.response``.
- one task for every connection's heartbeat (``WebSocketLink``):
  ``Connection.pending_pings`` (payload -> (future, sent at)),
  ``.close_deadline``, ``.set_connection_exc``, ``.send_context``,
  ``.loop``, ``.transport`` and ``Protocol.fail``.
- writing pre-framed bytes (``transport_of``, ``extensions_of``): the
  connection's asyncio transport and the protocol's negotiated extensions.
- closing cycles (``release``, ``start_handler``): ``ServerConnection.__dict__``
  and ``ServerProtocol.__dict__``; ``Server.handler`` and
  ``Server.handler_tasks`` (what ``ServerConnection.connection_made`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator, Sequence
from functools import partial
from http import HTTPStatus
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.extensions import Extension
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

# --- the handshake is not kept -------------------------------------------------
#
# websockets keeps the handshake request and response for a connection's whole
# life, in three places: ``connection.request``, ``connection.response`` and a
# local variable of the protocol's parser (a generator that parses the request,
# then goes on parsing frames in the same frame of execution). That is ~4 KiB
# per connection (the headers, their dicts and lists) and the bearer token of
# the Authorization header, held in memory long after it was verified.
# ``forget_request_in_parser`` makes the parser let go of the request as soon
# as it is parsed; ``forget_handshake`` drops the other two references once
# ``process_request`` has read what it needed.

# What a connection's ``request`` and ``response`` are once its handler runs
# (shared, empty: websockets needs them not None, and nothing reads them).
_REQUEST_READ = Request("/", Headers())
_RESPONSE_SENT = Response(HTTPStatus.SWITCHING_PROTOCOLS, "Switching Protocols", Headers())


class _NewFrameParser(Protocol):
    """What ``ServerProtocol.parse`` delegates to once the request is parsed.

    Placed after ``ServerProtocol`` in the method resolution order, its
    ``parse`` is the ``super().parse()`` that websockets' request parser
    ends with (``yield from``), with the request still a local variable of
    the calling generator. Instead of parsing frames inside that generator,
    it starts websockets' own frame parser as a new generator and makes it
    *the* parser (websockets swaps parsers the same way, for ``discard``).
    The old generator is then unreferenced and closed once the call that
    drove it returns, and the request goes with it.

    Frames that arrived in the same read as the request are parsed at once,
    by the ``next`` below, exactly as the old parser would have done.
    """

    def parse(self) -> Generator[None]:
        self.parser = Protocol.parse(self)
        next(self.parser)  # start coroutine
        yield  # never resumed: the protocol drives the new parser now


class _RequestForgettingServerProtocol(ServerProtocol, _NewFrameParser):
    """``ServerProtocol`` whose ``super().parse()`` is ``_NewFrameParser.parse``."""


def forget_request_in_parser(protocol: ServerProtocol) -> None:
    """Make ``protocol`` (not started yet: no byte received) drop the request once parsed.

    A class swap rather than a constructor: websockets' asyncio server builds
    the ``ServerProtocol`` itself. The subclass adds no state, only the
    method resolution order above.
    """
    if type(protocol) is not ServerProtocol:
        raise TypeError(f"expected a websockets ServerProtocol, got {type(protocol).__name__}")
    protocol.__class__ = _RequestForgettingServerProtocol


def forget_handshake(connection: ServerConnection) -> None:
    """Drop the connection's handshake request and response (call after the handshake)."""
    connection.request, connection.response = _REQUEST_READ, _RESPONSE_SENT


# --- pre-framed writes ------------------------------------------------------------


def transport_of(connection: Connection) -> asyncio.Transport:
    """The connection's transport, for frames already serialized (``outbox.text_frame``).

    Bytes written here bypass websockets' protocol: only whole frames, and only
    while the connection is open.
    """
    transport: asyncio.Transport = connection.transport
    return transport


def is_open(connection: Connection) -> bool:
    """``connection.state is State.OPEN``, read without its two properties.

    ``Connection.state`` returns ``protocol.state``, itself a property over
    ``protocol._state``; the outbox asks once per subscriber per delivery.
    py-spy at 1,000 subscribers x 20 msg/s (2026-12-02): the two properties
    and their callers' lines were ~8 % of the gateway's samples, and this
    read is still ~10 % after: what costs is the first touch of each
    connection's objects in a delivery, whoever reads them, so the gain is
    the two calls only. A released connection's protocol has ``_state``
    too (``_Released``).
    """
    return connection.protocol._state is State.OPEN  # type: ignore[attr-defined, no-any-return]


def extensions_of(connection: Connection) -> Sequence[Extension]:
    """The extensions negotiated (permessage-deflate): frames must then go through websockets."""
    return connection.protocol.extensions


# --- heartbeats ---------------------------------------------------------------------


class WebSocketLink:
    """``Link`` over websockets' asyncio connections (pings as raw frames)."""

    def __init__(self) -> None:
        self._closing: set[asyncio.Task[None]] = set()

    def ping(self, connection: Connection, payload: bytes) -> bool:
        state = connection.protocol.state
        if state is State.CLOSED or connection.transport is None:
            return False
        if state is not State.OPEN:
            # Closing. A close can hang: close() waits for a send buffer that
            # a peer which stopped reading never drains (a 4409 slow
            # consumer, or the 1011 of an unanswered ping). websockets'
            # keepalive ended those when its next ping found the close
            # overdue; so does this, at the connection's next beat.
            deadline = connection.close_deadline
            if deadline is not None and connection.loop.time() >= deadline:
                connection.set_connection_exc(TimeoutError("timed out while closing connection"))
                connection.transport.abort()
            return True
        # Register it as websockets' ping() does, so that the pong is matched
        # (and connection.latency measured) by websockets itself.
        if payload in connection.pending_pings:
            return True  # still waiting for the same one (cannot happen: one per tick)
        pong = connection.loop.create_future()
        connection.pending_pings[payload] = (pong, connection.loop.time())
        # A control frame: never compressed, may go between any two frames;
        # one write, so it cannot land inside another frame's bytes.
        connection.transport.write(b"\x89" + bytes((len(payload),)) + payload)
        return True

    def answered(self, connection: Connection, payload: bytes) -> bool:
        return payload not in connection.pending_pings

    def expire(self, connection: Connection) -> None:
        task = connection.loop.create_task(_fail(connection))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _fail(connection: Connection) -> None:
    # What websockets' keepalive does on a ping timeout: close 1011 without
    # waiting for the peer's close frame, then wait (close_timeout at most)
    # for the TCP connection to end.
    with contextlib.suppress(ConnectionClosed):
        async with connection.send_context():
            connection.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")


# --- cycles broken at close ------------------------------------------------------


class _Released:
    """What a released connection's ``protocol`` is: a closed one, nothing else.

    Code that still holds the connection (a session being wound up, an
    outbox) reads ``connection.state``, ``close_code``, ``close_reason`` and
    ``protocol.extensions``; all answer as for any closed connection.
    """

    __slots__ = ("close_code", "close_reason")
    state = State.CLOSED
    _state = State.CLOSED  # what ``is_open`` reads
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
    slim(connection)
    server: Any = connection.server
    task: asyncio.Task[None] = connection.loop.create_task(server.handler(connection))
    server.handler_tasks.add(task)
    task.add_done_callback(partial(_release_when_lost, connection))


# --- fewer objects per connection -------------------------------------------------
#
# An idle connection of websockets holds two empty ``collections.deque``s (the
# drain waiters and the assembler's frame queue: 760 bytes each, a deque
# allocates its first block of 64 slots at creation). ``slim`` swaps in a
# queue made at first use: ~1.5 KiB less per connection (bench.connections,
# docs/performance.md). websockets' per-connection ``LoggerAdapter`` stays:
# the JSON log lines name the connection of websockets' own records
# ("connection open", "connection closed") through it
# (gateway/telemetry/logs.py, tests/integration/test_connection_logs.py).


class SmallQueue:
    """The ``deque`` methods websockets calls on those two queues, on a list
    made at first use. Both stay short (the frame queue is bounded by
    ``max_queue``, the drain waiters are one per blocked send), so ``popleft``
    on a list costs nothing that matters."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Any] | None = None

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)

    def popleft(self) -> Any:
        if not self._items:
            raise IndexError("pop from an empty queue")
        return self._items.pop(0)

    def extendleft(self, items: Any) -> None:  # deque's order: the last one ends up first
        self._items = [*reversed(list(items)), *(self._items or ())]

    def remove(self, item: Any) -> None:
        if self._items is None:
            raise ValueError("not in queue")
        self._items.remove(item)

    def clear(self) -> None:
        self._items = None

    def __len__(self) -> int:
        return len(self._items) if self._items else 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Any:
        return iter(self._items or ())


def slim(connection: Connection) -> None:
    """Replace the per-connection queues websockets makes with ones made at first use.

    Internals: ``Connection.drain_waiters`` and ``Assembler.frames.queue``;
    canaries in tests/unit/test_ws_adapter.py.
    """
    connection.drain_waiters = SmallQueue()  # type: ignore[assignment]
    connection.recv_messages.frames.queue = SmallQueue()  # type: ignore[assignment]

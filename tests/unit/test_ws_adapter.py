"""Canaries for the websockets internals gateway/transports/ws_adapter.py relies on.

One test per internal: each fails when a websockets release changes what the
adapter assumes (then fix the adapter, rerun these, and move the pin in
pyproject.toml). A plain websockets server and client on 127.0.0.1, in this
process: nothing else needs to run. The handshake-forgetting internals have
their canaries in test_handshake_memory.py.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import re
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import Protocol, State

from gateway.transports import ws_adapter
from gateway.transports.outbox import text_frame


class Started(ServerConnection):
    """What admission.AdmittedConnection does at hand-over, alone."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ws_adapter.start_handler(self, transport)


Handler = Callable[[ServerConnection], Any]


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, list[ServerConnection], asyncio.Event]]:
    """A server whose handler records its connection and waits until told to end."""
    seen: list[ServerConnection] = []
    end = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        seen.append(connection)
        try:
            await asyncio.wait_for(end.wait(), 10)
        except TimeoutError:
            pass

    async with serve(handler, "127.0.0.1", 0, create_connection=Started, ping_interval=None) as s:
        yield s, seen, end


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_websockets_is_the_minor_release_pinned() -> None:
    """The pin in pyproject.toml says which release these canaries ran on."""
    major, minor = (int(part) for part in websockets.__version__.split(".")[:2])
    assert (major, minor) == PINNED, (
        f"websockets {websockets.__version__}: rerun these canaries and move the pin"
    )


PINNED = (17, 4)


def test_server_connection_made_only_starts_and_registers_the_handler() -> None:
    """start_handler does what ServerConnection.connection_made does, and nothing less."""
    source = textwrap.dedent(inspect.getsource(ServerConnection.connection_made))
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    code = [ast.unparse(statement) for statement in body]
    assert code == [
        "super().connection_made(transport)",
        "handler_task = self.loop.create_task(self.server.handler(self))",
        "self.server.handler_tasks.add(handler_task)",
    ]
    # super() of ServerConnection is the Connection whose method start_handler calls.
    assert ServerConnection.__mro__[1] is Connection


async def test_the_handler_task_is_the_servers_and_release_follows_it(server: Any) -> None:
    s, seen, end = server
    async with connect(url(s)) as client:
        await until(lambda: bool(seen))
        connection = seen[0]
        assert len(s.handler_tasks) == 1
        assert connection.state is State.OPEN
        end.set()
        await client.wait_closed()
    await until(lambda: not s.handler_tasks)
    await until(lambda: isinstance(connection.protocol, ws_adapter._Released))
    assert connection.state is State.CLOSED
    assert connection.close_code == 1000
    assert connection.transport is None


async def test_release_leaves_no_cycle_behind(server: Any) -> None:
    """Emptying the connection's and the protocol's attributes frees everything by refcount."""
    s, seen, end = server
    gc.collect()
    gc.disable()
    try:
        async with connect(url(s)) as client:
            await until(lambda: bool(seen))
            end.set()
            await client.wait_closed()
        await until(lambda: not s.handler_tasks)
        await until(lambda: isinstance(seen[0].protocol, ws_adapter._Released))
        seen.clear()
        del client
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
        # The client side is not released: only the server's objects are looked for.
        assert not kinds & {"Started", "ServerProtocol"}, kinds
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_is_open_follows_the_state_through_closing_and_release(server: Any) -> None:
    """``is_open`` reads ``protocol._state``: it must say what ``connection.state`` says."""
    s, seen, end = server
    async with connect(url(s)) as client:
        await until(lambda: bool(seen))
        connection = seen[0]
        assert connection.state is State.OPEN and ws_adapter.is_open(connection)
        closing = asyncio.ensure_future(connection.close())
        await asyncio.sleep(0)
        assert connection.state is not State.OPEN
        assert not ws_adapter.is_open(connection)
        await closing
        end.set()
        await client.wait_closed()
    await until(lambda: isinstance(connection.protocol, ws_adapter._Released))
    assert not ws_adapter.is_open(connection)


def test_release_empties_attribute_dicts_of_both_objects() -> None:
    """What release clears must be plain instance dicts (no __slots__)."""
    assert "__dict__" in dir(ServerConnection)
    assert "__dict__" in dir(Protocol)


async def test_pre_framed_text_written_to_the_transport_arrives(server: Any) -> None:
    s, seen, end = server
    async with connect(url(s), compression=None) as client:
        await until(lambda: bool(seen))
        connection = seen[0]
        assert list(ws_adapter.extensions_of(connection)) == []
        ws_adapter.transport_of(connection).write(text_frame(b'{"x":1}'))
        assert ws_adapter.transport_of(connection).get_write_buffer_size() >= 0
        assert await asyncio.wait_for(client.recv(), 5) == '{"x":1}'
        end.set()


async def test_extensions_of_names_permessage_deflate(server: Any) -> None:
    s, seen, end = server
    async with serve(
        lambda c: c.wait_closed(), "127.0.0.1", 0, compression="deflate"
    ) as compressed:
        recorded: list[ServerConnection] = []
        async with connect(url(compressed), compression="deflate") as _client:
            await until(lambda: bool(compressed.connections))
            recorded.extend(compressed.connections)
            assert [e.name for e in ws_adapter.extensions_of(recorded[0])] == ["permessage-deflate"]
    end.set()


async def test_a_raw_ping_is_matched_by_websockets_pending_pings(server: Any) -> None:
    s, seen, end = server
    link = ws_adapter.WebSocketLink()
    async with connect(url(s)) as client:  # websockets' client answers pings itself
        await until(lambda: bool(seen))
        connection = seen[0]
        assert isinstance(connection.pending_pings, dict)
        assert link.ping(connection, b"beat")
        assert not link.answered(connection, b"beat")
        pong, sent_at = connection.pending_pings[b"beat"]
        assert isinstance(pong, asyncio.Future) and isinstance(sent_at, float)
        await until(lambda: link.answered(connection, b"beat"))
        assert connection.latency > 0  # measured by websockets from our entry
        end.set()
        assert client.state is State.OPEN


async def test_expire_fails_the_connection_with_1011(server: Any) -> None:
    s, seen, end = server
    link = ws_adapter.WebSocketLink()
    client: ClientConnection
    async with connect(url(s)) as client:
        await until(lambda: bool(seen))
        link.expire(seen[0])
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert closed.value.rcvd.reason == "keepalive ping timeout"
    end.set()


async def test_an_overdue_close_is_aborted_at_the_next_beat(server: Any) -> None:
    """close_deadline, set_connection_exc and transport.abort, as websockets' keepalive."""
    s, seen, end = server
    link = ws_adapter.WebSocketLink()
    async with connect(url(s)) as client:
        await until(lambda: bool(seen))
        connection = seen[0]
        client.transport.pause_reading()  # the client never answers the close
        closing = asyncio.ensure_future(connection.close())
        await until(lambda: connection.state is State.CLOSING)
        assert connection.close_deadline is not None
        connection.close_deadline = connection.loop.time() - 1  # overdue
        assert link.ping(connection, b"late")
        await asyncio.wait_for(closing, 5)
        assert connection.state is State.CLOSED
        client.transport.resume_reading()
    end.set()


def test_internals_the_heartbeat_calls_exist() -> None:
    for name in ("pending_pings", "close_deadline"):
        assert name in inspect.getsource(Connection.__init__), name
    assert callable(Connection.set_connection_exc)
    assert callable(Connection.send_context)
    assert callable(Protocol.fail)


def test_the_internals_slim_replaces_are_what_websockets_makes() -> None:
    """Canary for ``slim``: websockets makes these two queues as deques, in these places."""
    init = inspect.getsource(Connection.__init__)
    assert "self.drain_waiters: collections.deque[asyncio.Future[None]] = (" in init
    made = inspect.getsource(Connection.connection_made)
    assert "self.recv_messages = Assembler(" in made
    from websockets.asyncio.messages import SimpleQueue

    queue = inspect.getsource(SimpleQueue)
    # The deque methods SmallQueue stands in for, and no other.
    used = set(re.findall(r"self\.queue\.(\w+)", queue))
    assert used <= {"append", "popleft", "extendleft"}, used
    drain = inspect.getsource(Connection)
    assert set(re.findall(r"self\.drain_waiters\.(\w+)", drain)) <= {"append", "remove"}


async def test_a_slimmed_connection_still_queues_and_reads_in_order(server: Any) -> None:
    s, seen, end = server
    async with connect(url(s)) as client:
        await until(lambda: bool(seen))
        connection = seen[0]
        assert isinstance(connection.drain_waiters, ws_adapter.SmallQueue)
        assert isinstance(connection.recv_messages.frames.queue, ws_adapter.SmallQueue)
        # Frames queue up unread, then come out in order (put_back included:
        # a fragmented message read in pieces).
        for n in range(5):
            await client.send(f"m{n}")
        await client.send(["a", "b", "c"])
        # (a fragmented send ends with an empty final continuation frame)
        await until(lambda: len(connection.recv_messages.frames) == 9)
        assert [await connection.recv() for _ in range(5)] == [f"m{n}" for n in range(5)]
        assert await connection.recv() == "abc"
        end.set()
        await client.wait_closed()


def test_small_queue_behaves_as_a_deque_for_the_methods_used() -> None:
    import collections
    import random

    rng = random.Random(7)
    small, real = ws_adapter.SmallQueue(), collections.deque[int]()
    for step in range(2000):
        op = rng.choice(["append", "popleft", "extendleft", "remove", "clear"])
        if op == "append":
            small.append(step)
            real.append(step)
        elif op == "extendleft":
            items = [rng.randrange(100) for _ in range(rng.randrange(4))]
            small.extendleft(reversed(items))
            real.extendleft(reversed(items))
        elif op == "popleft":
            if real:
                assert small.popleft() == real.popleft()
            else:
                with pytest.raises(IndexError):
                    small.popleft()
        elif op == "remove" and real:
            item = rng.choice(list(real))
            small.remove(item)
            real.remove(item)
        elif op == "clear" and rng.random() < 0.05:
            small.clear()
            real.clear()
        assert list(small) == list(real) and len(small) == len(real)
        assert bool(small) == bool(real)

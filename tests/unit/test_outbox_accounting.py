"""The outbox's send-buffer bounds, on a transport that takes what it is told to.

The fake transport holds ``buffered`` bytes (as a socket that has stopped
reading leaves them in uvloop's buffer) or takes every write at once; the
bounds (bytes, frames) and the 4409 close are the contract's, whatever the
write path looks like inside.
"""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.protocol import State

from gateway.transports.outbox import Outbox, _wire_length, fan_out, text_frame


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.stalled = False  # True: writes stay in the buffer
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        if self.stalled:
            self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def drain_all(self) -> None:
        self.buffered = 0


class FakeProtocol:
    def __init__(self) -> None:
        self._state = State.OPEN
        self.extensions: list[Any] = []

    @property
    def state(self) -> State:
        return self._state


class FakeConnection:
    def __init__(self) -> None:
        self.protocol = FakeProtocol()
        self.transport = FakeTransport()
        self.closed_with: int | None = None

    @property
    def state(self) -> State:
        return self.protocol.state

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = code


def outbox(max_bytes: int = 1000, max_messages: int = 3) -> tuple[Outbox, FakeConnection]:
    connection = FakeConnection()
    overflows: list[int] = []
    box = Outbox(
        connection,  # type: ignore[arg-type]
        max_bytes=max_bytes,
        max_messages=max_messages,
        on_overflow=lambda: overflows.append(1),
    )
    return box, connection


async def test_frames_the_socket_took_do_not_count() -> None:
    box, connection = outbox(max_messages=3)
    for _ in range(10):
        assert fan_out([box], b'{"a":1}') == 1
    assert box.pending() == (0, 0)
    assert connection.transport.written == [text_frame(b'{"a":1}')] * 10
    assert not box.overflowed


async def test_the_frame_limit_closes_4409_and_stops_writing() -> None:
    box, connection = outbox(max_messages=3)
    connection.transport.stalled = True
    assert [fan_out([box], b"x") for _ in range(3)] == [1, 1, 1]
    assert box.pending() == (3 * _wire_length(1), 3)
    assert fan_out([box], b"x") == 0  # the fourth frame in flight is refused
    await asyncio.sleep(0)
    assert box.overflowed and connection.closed_with == 4409
    assert len(connection.transport.written) == 3
    connection.transport.drain_all()
    assert fan_out([box], b"x") == 0  # never written to again


async def test_the_byte_limit_counts_what_waits_in_the_transport() -> None:
    box, connection = outbox(max_bytes=100, max_messages=1000)
    connection.transport.stalled = True
    assert box.send(b"a" * 60)
    assert box.pending() == (62, 1)
    assert not box.send(b"a" * 60)  # 62 + 60 > 100
    await asyncio.sleep(0)
    assert connection.closed_with == 4409


async def test_frames_leave_the_count_as_the_socket_takes_them() -> None:
    box, connection = outbox(max_messages=3)
    transport = connection.transport
    transport.stalled = True
    for _ in range(3):
        assert box.send(b"x")
    # The socket takes the first two frames (3 bytes each): one left in flight.
    transport.buffered -= 2 * _wire_length(1)
    assert box.pending() == (_wire_length(1), 1)
    assert box.send(b"x") and box.send(b"x")
    assert box.pending()[1] == 3
    assert not box.send(b"x")


async def test_a_connection_not_open_is_skipped_without_a_close() -> None:
    box, connection = outbox()
    connection.protocol._state = State.CLOSING
    assert fan_out([box], b"x") == 0
    assert not box.send(b"x")
    await asyncio.sleep(0)
    assert connection.transport.written == [] and connection.closed_with is None


async def test_send_many_writes_once_and_its_frames_count_against_later_ones() -> None:
    box, connection = outbox(max_messages=3)
    connection.transport.stalled = True
    assert box.send_many([b"a", b"b"]) == 2
    assert connection.transport.written == [text_frame(b"a") + text_frame(b"b")]
    # Checked against what was in flight before the batch, so the batch's
    # own frames count as one here (as before this test was written).
    assert box.pending() == (2 * _wire_length(1), 1)
    assert box.send(b"c") and box.send(b"d")
    assert not box.send(b"e")
    connection.transport.drain_all()
    assert box.pending() == (0, 0)


# messages_out: the operator's per-connection count (gateway/operations/connections.py).


async def test_every_write_path_counts_the_frames_it_wrote() -> None:
    box, connection = outbox(max_messages=100)
    assert box.messages_out == 0
    assert box.send(b"a")
    assert box.send_many([b"b", b"c", b"d"]) == 3
    assert fan_out([box, box], b"e") == 2
    assert box.messages_out == 6


async def test_frames_refused_are_not_counted() -> None:
    box, connection = outbox(max_messages=2)
    connection.transport.stalled = True
    assert box.send(b"a") and fan_out([box], b"b") == 1
    assert fan_out([box], b"c") == 0  # over the frame limit: not written
    assert not box.send(b"d") and box.send_many([b"e"]) == 0
    await asyncio.sleep(0)
    assert box.messages_out == 2 and connection.closed_with == 4409
    assert len(connection.transport.written) == 2

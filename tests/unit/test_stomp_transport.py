"""StompTransport as the core's Transport, over a recording send path (no I/O):
the core's frames leave as STOMP, and the core's closes are said in an ERROR first."""

from __future__ import annotations

import asyncio

from gateway.protocol.codes import CLOSE_AUTH, CLOSE_BANNED, CLOSE_SLOW_CONSUMER
from gateway.protocol.frames import error_frame, message_frame
from gateway.transports.stomp.bridge import StompBridge
from gateway.transports.stomp.endpoint import StompTransport
from gateway.transports.stomp.frames import Frame


class Recording:
    """What a WebSocketTransport would have written and how it was closed."""

    kind = "websocket"

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed: list[int] = []
        self.open = True

    def send(self, frame: bytes) -> bool:
        self.written.append(frame)
        return True

    def send_many(self, frames: list[bytes]) -> int:
        self.written.extend(frames)
        return len(frames)

    def pending(self) -> tuple[int, int]:
        return 0, 0

    def close(self, code: int, reason: str) -> asyncio.Task[None] | None:
        self.closed.append(code)
        self.open = False
        return None

    async def close_flooded(self, code: int, reason: str) -> None:
        self.closed.append(code)

    def stop_reading(self) -> None:
        pass


def transport() -> tuple[StompTransport, Recording]:
    inner = Recording()
    bridge = StompBridge("1.2", lambda channel: "chat", 10)
    return StompTransport(bridge, inner), inner  # type: ignore[arg-type]


def test_a_message_leaves_as_stomp_for_each_subscription() -> None:
    stomp, inner = transport()
    stomp.bridge.request(Frame("SUBSCRIBE", (("id", "s"), ("destination", "/topic/chat.a"))))
    assert stomp.send(message_frame("chat.a", 3, {"x": 1}, "bob", 7))
    (written,) = inner.written
    assert written.startswith(b"MESSAGE\nsubscription:s\ndestination:/topic/chat.a\n")
    assert written.endswith(b'\n\n{"x":1}\0')


def test_a_core_error_is_an_error_frame_then_the_close() -> None:
    stomp, inner = transport()
    stomp.send(error_frame("forbidden", "not allowed to publish to x"))
    assert inner.written[0].startswith(b"ERROR\nmessage:forbidden\n")
    assert inner.closed == [1008]
    stomp.send(message_frame("chat.a", 4, 1, None, 7))
    assert len(inner.written) == 1  # nothing after the ERROR


def test_the_cores_closes_are_said_first() -> None:
    for code, said in [(CLOSE_AUTH, b"message:unauthorized"), (CLOSE_BANNED, b"message:forbidden")]:
        stomp, inner = transport()
        stomp.close(code, "why")
        assert said in inner.written[0] and inner.closed == [code]


def test_a_slow_consumer_is_closed_without_another_frame() -> None:
    stomp, inner = transport()
    stomp.close(CLOSE_SLOW_CONSUMER, "slow consumer")
    assert inner.written == [] and inner.closed == [CLOSE_SLOW_CONSUMER]
    assert stomp.kind == "stomp"

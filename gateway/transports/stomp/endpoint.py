"""STOMP 1.2 (1.1, 1.0) on the ``/ws`` endpoint: the wire and its I/O (contract section 10).

The listener (gateway/app.py) hands a connection here when the WebSocket
agreed on ``v12.stomp``, ``v11.stomp`` or ``v10.stomp``. A conversation goes:
``CONNECT``/``STOMP`` within the auth timeout -> the principal (handshake
header, or the JWT in ``passcode``, verified by the ``Gate``) -> the same
admission as a JSON client (``Gate.admit_user``) -> ``CONNECTED`` -> every
frame through ``StompBridge`` onto the one ``Session`` of the core, over a
``StompTransport``: the same policies, limits, history, audit events and
metrics, decided once.

Everything the client sends is bounded by ``FrameParser`` (largest frame,
header count, header length); anything it cannot parse gets an ``ERROR`` and
the connection closes, as STOMP requires after every ``ERROR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.auth.principal import Principal
from gateway.auth.tokens import AuthError
from gateway.config import Settings
from gateway.core.deadlines import Deadline
from gateway.core.gate import Gate, Refused
from gateway.core.node import Node
from gateway.core.session import Session
from gateway.core.transport import TransportKind
from gateway.limits.limiter import Limiter, Slot
from gateway.protocol.codes import (
    CLOSE_AUTH,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
)
from gateway.telemetry import logs
from gateway.transports.outbox import Outbox
from gateway.transports.stomp.bridge import StompBridge, close_code
from gateway.transports.stomp.frames import (
    HEARTBEAT,
    Event,
    Frame,
    FrameParser,
    FrameTooLarge,
    StompError,
    Version,
)
from gateway.transports.stomp.mapping import (
    SUBPROTOCOLS,
    Connect,
    connected_frame,
    error_frame,
    negotiate_heartbeat,
    parse_connect,
    receipt_frame,
)
from gateway.transports.stomp.mapping import Refused as StompRefused

log = logging.getLogger("rabbitgate.stomp")

HEARTBEAT_BYTES = b"\n"
# Why a close ends the conversation, said in an ERROR first (STOMP clients
# read the ERROR frame, not the WebSocket close code).
_CLOSE_ERRORS: dict[int, tuple[str, str]] = {
    CLOSE_AUTH: ("unauthorized", "token expired"),
    CLOSE_BANNED: ("forbidden", "banned"),
    CLOSE_GOING_AWAY: ("unavailable", "server shutting down, reconnect elsewhere"),
    CLOSE_POLICY: ("forbidden", "too many connections"),
    CLOSE_RATE_LIMITED: ("rate_limited", "rate limits broken too often"),
}


class StompTransport:
    """The core's ``Transport`` in STOMP: each gateway frame through the bridge.

    The session and the fan-out write JSON frames of the contract (acks,
    errors, messages); the bridge turns them into ``RECEIPT``/``ERROR``/
    ``MESSAGE`` frames, written into the connection's own bounded ``Outbox``
    (close 4409), so a STOMP client has the same send buffer as a JSON one.
    """

    __slots__ = ("bridge", "inner", "connection", "_closing")

    kind: ClassVar[TransportKind] = "stomp"

    def __init__(self, bridge: StompBridge, inner: Outbox) -> None:
        self.bridge = bridge
        self.inner = inner
        self.connection = inner.connection
        self._closing: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.connection.state is State.OPEN and not self.bridge.closed

    def send(self, frame: bytes) -> bool:
        frames, close = self.bridge.answer(frame)
        sent = self.inner.send_many(frames) == len(frames) if frames else True
        if close is not None:
            self.close(close, "STOMP ERROR")
        return sent

    def send_many(self, frames: list[bytes]) -> int:
        return sum(1 for frame in frames if self.send(frame))

    def send_stomp(self, frame: bytes) -> bool:
        """A STOMP frame of the transport's own (CONNECTED, RECEIPT, a heart-beat)."""
        return self.inner.send(frame)

    def pending(self) -> tuple[int, int]:
        return self.inner.pending()

    def close(self, code: int, reason: str) -> asyncio.Task[None] | None:
        """Say why in an ERROR (for the closes a client must understand), then close."""
        if self._closing is None:
            said = _CLOSE_ERRORS.get(code)
            if said is not None and not self.bridge.closed:
                self.send_stomp(self.bridge.error(*said))
            self._closing = asyncio.get_running_loop().create_task(
                self.connection.close(code, reason)
            )
            return self._closing
        return None

    def stop_reading(self) -> None:
        transport = self.connection.transport
        if transport is not None:
            transport.pause_reading()

    async def close_flooded(self, code: int, reason: str) -> None:
        task = self.close(code, reason)
        if task is not None:
            await task


class StompEndpoint:
    """Serves the STOMP conversations of one gateway's WebSocket listener."""

    def __init__(self, settings: Settings, gate: Gate) -> None:
        self.settings = settings
        self.gate = gate
        self.node: Node = gate.node

    async def converse(
        self, connection: ServerConnection, principal: Principal | None, address: str | None
    ) -> None:
        """The whole conversation; returns when the connection is closed.

        ``principal`` comes from the handshake's Authorization header, if it had one.
        """
        highest = SUBPROTOCOLS[str(connection.subprotocol)]
        limits = self.settings.limits
        parser = FrameParser(version=highest, max_frame_bytes=limits.max_frame_bytes)
        opened = await self._open(connection, parser, highest, principal, address)
        if opened is None:
            return
        session, connect, pending = opened
        outbox = session.outbox
        assert isinstance(outbox, StompTransport)
        bridge = outbox.bridge
        server_beat = round(limits.heartbeat_seconds * 1000)
        send_every, _ = negotiate_heartbeat(connect.heart_beat, (server_beat, server_beat))
        beats = _Beats(self.node, outbox, send_every / 1000) if send_every else None
        try:
            outbox.send_stomp(
                connected_frame(connect.version, (server_beat, server_beat), session.id)
            )
            events = pending
            while True:
                for event in events:
                    if bridge.closed:
                        break
                    if event is HEARTBEAT:
                        # Charged like a JSON ping (frame limits, idle timeout).
                        await session.handle('{"type":"ping","id":0}')
                        continue
                    assert isinstance(event, Frame)
                    if not await self._step(session, outbox, event):
                        return
                if bridge.closed:
                    await connection.wait_closed()
                    return
                try:
                    events = parser.feed(await connection.recv(decode=False))
                except StompError as exc:
                    code, close = _parse_refusal(exc)
                    session.emit("malformed", detail=code)
                    outbox.send_stomp(bridge.error(code, str(exc)))
                    outbox.close(close, "not a valid STOMP frame")
                    events = []
        except ConnectionClosed:
            pass
        finally:
            if beats is not None:
                beats.stop()
            self.node.sessions.discard(session)
            session.emit("closed", detail=str(connection.close_code))
            await session.ended()

    async def _step(self, session: Session, outbox: StompTransport, frame: Frame) -> bool:
        """Do what one client frame asks; False once the conversation is over."""
        step = outbox.bridge.request(frame)
        for request in step.requests:
            await session.handle(request.decode())
        if not step.requests and step.close is None and step.disconnect is None:
            # Answered here, not by the session: still charged as a frame.
            await session.handle('{"type":"ping","id":0}')
        for answer in step.frames:
            outbox.send_stomp(answer)
        if step.close is not None:
            if step.close == CLOSE_PROTOCOL_ERROR:
                session.emit("malformed", detail="bad_request")
            outbox.close(step.close, "STOMP ERROR")
        if step.disconnect is not None:
            await session.drain()  # RECEIPT only once every SEND so far is answered
            if step.disconnect.receipt is not None:
                outbox.send_stomp(receipt_frame(step.disconnect.receipt, outbox.bridge.version))
            outbox.close(CLOSE_NORMAL, "DISCONNECT")
            await outbox.connection.wait_closed()
            return False
        return True

    async def _open(
        self,
        connection: ServerConnection,
        parser: FrameParser,
        highest: Version,
        principal: Principal | None,
        address: str | None,
    ) -> tuple[Session, Connect, list[Event]] | None:
        """CONNECT, authentication and admission: the session, or None once closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.limits.auth_timeout_seconds
        guard = self.node.limiter.connection_guard()  # frames before CONNECT count too
        events: list[Event] = []
        try:
            while True:
                frames = [event for event in events if event is not HEARTBEAT]
                if frames:
                    break
                async with asyncio.timeout_at(deadline):
                    data = await connection.recv(decode=False)
                if guard.frame() is not None:
                    await _refuse(
                        connection, highest, "rate_limited", "too many frames", CLOSE_RATE_LIMITED
                    )
                    return None
                try:
                    events = parser.feed(data)
                except StompError as exc:
                    code, close = _parse_refusal(exc)
                    await _refuse(connection, highest, code, str(exc), close)
                    return None
            first, rest = frames[0], events[events.index(frames[0]) + 1 :]
            assert isinstance(first, Frame)
            try:
                connect = parse_connect(first, highest)
            except StompRefused as refused:
                await _refuse(
                    connection, highest, refused.code, refused.message, close_code(refused.code)
                )
                return None
            parser.version = connect.version
            if principal is None:
                principal = await self._verify(connection, connect, address)
                if principal is None:
                    return None
            # A banned user (4403), the user's concurrent connections (1008).
            user_slot = await self.gate.admit_user(principal, address)
            if isinstance(user_slot, Refused):
                await _refuse(
                    connection,
                    connect.version,
                    "forbidden",
                    user_slot.message,
                    user_slot.close_code,
                )
                return None
            connection.connection_lost_waiter.add_done_callback(
                partial(_release_slot, self.node.limiter, user_slot)
            )
        except TimeoutError:
            await _refuse(
                connection, highest, "unauthorized", "no CONNECT frame in time", CLOSE_AUTH_TIMEOUT
            )
            return None
        except ConnectionClosed:
            return None
        limits = self.settings.limits
        inner = Outbox(
            connection,
            max_bytes=limits.send_buffer_bytes,
            max_messages=limits.send_buffer_messages,
        )
        bridge = StompBridge(connect.version, self._exchange_of, limits.max_channels_per_connection)
        session = Session(self.gate, StompTransport(bridge, inner), principal, address)
        logs.bind_connection(connection, session=session.id, user=principal.sub, address=address)
        self.node.sessions.add(session)
        return session, connect, rest

    async def _verify(
        self, connection: ServerConnection, connect: Connect, address: str | None
    ) -> Principal | None:
        """The passcode's principal; None (ERROR sent, closed with 4401) if it is not valid."""
        token: str | AuthError = connect.passcode or AuthError(
            "missing", "no token: send it as the passcode header"
        )
        principal = await self.gate.authenticate(token, address, "passcode")
        if isinstance(principal, Refused):
            await _refuse(
                connection, connect.version, "unauthorized", principal.message[:120], CLOSE_AUTH
            )
            return None
        return principal

    def _exchange_of(self, channel: str) -> str | None:
        found = self.node.policies.rule_for(channel)
        return None if found is None else found[0].exchange


class _Beats:
    """The server's heart-beats of one connection, on the node's shared deadlines."""

    __slots__ = ("node", "outbox", "every", "_next")

    def __init__(self, node: Node, outbox: StompTransport, every: float) -> None:
        self.node = node
        self.outbox = outbox
        self.every = every
        self._next: Deadline | None = None
        self._schedule()

    def _schedule(self) -> None:
        when = asyncio.get_running_loop().time() + self.every
        self._next = self.node.deadlines.call_at(when, self._beat)

    def _beat(self) -> None:
        if self.outbox.bridge.closed:
            return
        self.outbox.send_stomp(HEARTBEAT_BYTES)
        self._schedule()

    def stop(self) -> None:
        if self._next is not None:
            self._next.cancel()


def _parse_refusal(exc: StompError) -> tuple[str, int]:
    """The error code and close code for a frame the parser refused."""
    if isinstance(exc, FrameTooLarge):
        return "too_large", CLOSE_TOO_BIG
    return "bad_request", CLOSE_PROTOCOL_ERROR


async def _refuse(
    connection: ServerConnection, version: Version, code: str, message: str, close: int
) -> None:
    """ERROR, then close: for a conversation that has no session (yet)."""
    with contextlib.suppress(ConnectionClosed):
        await connection.send(error_frame(code, message, version), text=True)
        await connection.close(close, message[:120])


def _release_slot(limiter: Limiter, slot: Slot, _: object) -> None:
    limiter.release(slot)

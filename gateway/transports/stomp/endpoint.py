"""STOMP 1.2 (1.1, 1.0) on the ``/ws`` endpoint: the wire and its I/O (contract section 10).

The WebSocket listener (transports/websocket.py) hands a connection here when
the handshake agreed on ``v12.stomp``, ``v11.stomp`` or ``v10.stomp``, after
the same address admission (and Authorization header) as a JSON client. A
conversation goes: ``CONNECT``/``STOMP`` within the auth timeout -> the
principal (the header's, or the JWT in ``passcode``, through the core's
``Gate``) -> the gate's user admission -> ``CONNECTED`` -> every frame
through ``StompBridge`` into commands of the core's ``Session``: the same
policies, limits, history, audit events and metrics, decided once
(docs/architecture.md, "Adding a transport").

Everything the client sends is bounded by ``FrameParser`` (largest frame,
header count, header length); anything it cannot parse gets an ``ERROR`` and
the connection closes, as STOMP requires after every ``ERROR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.auth.principal import AuthError, Principal
from gateway.config import Settings
from gateway.core.deadlines import Deadline
from gateway.core.gate import Gate, Refused
from gateway.core.node import Node
from gateway.core.session import Session
from gateway.core.transport import Transport, TransportKind
from gateway.limits.limiter import Limiter, Slot
from gateway.protocol.codes import (
    CLOSE_AUTH,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_BIG,
)
from gateway.telemetry import logs
from gateway.transports.stomp.bridge import CHARGE, StompBridge, close_code
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
# The connection's own bounded send path (the listener's WebSocketTransport).
WireFactory = Callable[[ServerConnection], Transport]
# Why the core closes a connection, said in an ERROR first (STOMP clients
# report an ERROR frame; few show a WebSocket close code).
_CLOSE_ERRORS: dict[int, tuple[str, str]] = {
    CLOSE_AUTH: ("unauthorized", "token expired"),
    CLOSE_BANNED: ("forbidden", "banned"),
    CLOSE_GOING_AWAY: ("unavailable", "server shutting down, reconnect elsewhere"),
    CLOSE_RATE_LIMITED: ("rate_limited", "rate limits broken too often"),
}


class StompTransport:
    """A STOMP connection as the core's ``Transport`` (``core/transport.py``).

    Every JSON-protocol frame the core writes (answers, and the fan-out's
    messages) goes through the conversation's ``StompBridge`` and leaves as
    STOMP frames, through the connection's own bounded send path (a
    ``WebSocketTransport``: the same 1 MiB / 1,000 frames, close 4409).
    """

    __slots__ = ("bridge", "inner", "beats")

    kind: ClassVar[TransportKind] = "stomp"

    def __init__(self, bridge: StompBridge, inner: Transport) -> None:
        self.bridge = bridge
        self.inner = inner
        self.beats = 0  # heart-beats written (not counted in messages_out)

    def send(self, frame: bytes) -> bool:
        frames, close = self.bridge.answer(frame)
        sent = self.inner.send_many(frames) == len(frames) if frames else True
        if close is not None:
            self.inner.close(close, "STOMP ERROR")
        return sent

    def send_many(self, frames: list[bytes]) -> int:
        return sum(1 for frame in frames if self.send(frame))

    def send_stomp(self, frame: bytes) -> bool:
        """A STOMP frame of the endpoint's own (CONNECTED, a RECEIPT, an ERROR);
        heart-beats go through ``send_beat``."""
        return self.inner.send(frame)

    def send_beat(self, beat: bytes) -> bool:
        """A heart-beat: written like any STOMP frame, not counted as a message."""
        sent = self.inner.send(beat)
        if sent:
            self.beats += 1
        return sent

    @property
    def messages_out(self) -> int | None:
        """STOMP frames written (MESSAGEs, RECEIPTs, ERRORs, CONNECTED), not the
        heart-beats: the operator's per-connection count."""
        written = getattr(self.inner, "messages_out", None)
        return None if written is None else written - self.beats

    def pending(self) -> tuple[int, int]:
        return self.inner.pending()

    def close(self, code: int, reason: str) -> asyncio.Task[None] | None:
        said = _CLOSE_ERRORS.get(code)
        if said is not None and not self.bridge.closed and self.inner.open:
            self.inner.send(self.bridge.error(*said))
        return self.inner.close(code, reason)

    async def close_flooded(self, code: int, reason: str) -> None:
        await self.inner.close_flooded(code, reason)

    def stop_reading(self) -> None:
        self.inner.stop_reading()

    @property
    def open(self) -> bool:
        return self.inner.open


class StompEndpoint:
    """Serves the STOMP conversations of the WebSocket listener's ``/ws``."""

    def __init__(self, settings: Settings, gate: Gate, wire: WireFactory) -> None:
        self.settings = settings
        self.gate = gate
        self.node: Node = gate.node
        self._wire = wire

    async def converse(
        self, connection: ServerConnection, principal: Principal | None, address: str | None
    ) -> None:
        """The whole conversation; returns when the connection is closed.

        ``principal`` comes from the handshake's Authorization header, if it
        had one (the listener verified it with the gate).
        """
        highest = SUBPROTOCOLS[str(connection.subprotocol)]
        limits = self.settings.limits
        parser = FrameParser(version=highest, max_frame_bytes=limits.max_frame_bytes)
        opened = await self._open(connection, parser, highest, principal, address)
        if opened is None:
            return
        session, connect, events = opened
        transport = session.outbox
        assert isinstance(transport, StompTransport)
        bridge = transport.bridge
        server_beat = round(limits.heartbeat_seconds * 1000)
        send_every, _ = negotiate_heartbeat(connect.heart_beat, (server_beat, server_beat))
        beats = _Beats(self.node, transport, send_every / 1000) if send_every else None
        try:
            hello = connected_frame(connect.version, (server_beat, server_beat), session.id)
            transport.send_stomp(hello)
            while True:
                for event in events:
                    if bridge.closed:
                        break
                    if event is HEARTBEAT:
                        await session.handle_command(CHARGE, 1)
                    elif isinstance(event, Frame) and not await self._step(session, event):
                        await connection.wait_closed()
                        return
                if bridge.closed:
                    await connection.wait_closed()
                    return
                try:
                    events = parser.feed(await connection.recv(decode=False))
                except StompError as exc:
                    code, close = _parse_refusal(exc)
                    session.emit("malformed", size=parser.buffered, detail=code)
                    transport.send_stomp(bridge.error(code, str(exc)))
                    transport.inner.close(close, "not a valid STOMP frame")
                    events = []
        except ConnectionClosed:
            pass
        finally:
            if beats is not None:
                beats.stop()
            self.node.sessions.discard(session)
            session.emit("closed", detail=str(connection.close_code))
            await session.ended()

    async def _step(self, session: Session, frame: Frame) -> bool:
        """Do what one client frame asks; False once the conversation is over."""
        transport = session.outbox
        assert isinstance(transport, StompTransport)
        step = transport.bridge.request(frame)
        size = len(frame.body)
        for command in step.requests:
            await session.handle_command(command, size)
        if not step.requests and step.close is None and step.disconnect is None:
            # Answered by the bridge alone, yet a frame like any other for the limits.
            await session.handle_command(CHARGE, size)
        for answer in step.frames:
            transport.send_stomp(answer)
        if step.close is not None:
            if step.close == CLOSE_PROTOCOL_ERROR:
                session.emit("malformed", size=size, detail="bad_request")
            transport.inner.close(step.close, "STOMP ERROR")
        if step.disconnect is not None:
            await session.drain()  # the RECEIPT only once every SEND so far is answered
            if step.disconnect.receipt is not None:
                receipt = receipt_frame(step.disconnect.receipt, transport.bridge.version)
                transport.send_stomp(receipt)
            transport.inner.close(CLOSE_NORMAL, "DISCONNECT")
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
            while not any(isinstance(event, Frame) for event in events):
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
            index = next(i for i, event in enumerate(events) if isinstance(event, Frame))
            first, rest = events[index], events[index + 1 :]
            assert isinstance(first, Frame)
            try:
                connect = parse_connect(first, highest)
            except StompRefused as refused:
                closing = close_code(refused.code)
                await _refuse(connection, highest, refused.code, refused.message, closing)
                return None
            parser.version = connect.version
            if principal is None:
                credentials: str | AuthError = connect.passcode or AuthError(
                    "missing", "no token: send it as the passcode header"
                )
                verified = await self.gate.authenticate(credentials, address, "stomp")
                if isinstance(verified, Refused):
                    message = verified.message[:120]
                    await _refuse(connection, connect.version, "unauthorized", message, CLOSE_AUTH)
                    return None
                principal = verified
            # A banned user (4403), the user's concurrent connections (1008).
            slot = await self.gate.admit_user(principal, address)
            if isinstance(slot, Refused):
                await _refuse(
                    connection, connect.version, "forbidden", slot.message, slot.close_code
                )
                return None
            connection.connection_lost_waiter.add_done_callback(
                partial(_release_slot, self.node.limiter, slot)
            )
        except TimeoutError:
            message = "no CONNECT frame in time"
            await _refuse(connection, highest, "unauthorized", message, CLOSE_AUTH_TIMEOUT)
            return None
        except ConnectionClosed:
            return None
        limits = self.settings.limits
        bridge = StompBridge(
            connect.version,
            self._exchange_of,
            limits.max_channels_per_connection,
            limits.max_data_depth,
        )
        transport = StompTransport(bridge, self._wire(connection))
        session = Session(self.gate, transport, principal, address)
        logs.bind_connection(connection, session=session.id, user=principal.sub, address=address)
        self.node.sessions.add(session)
        return session, connect, rest

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
        self.outbox.send_beat(HEARTBEAT_BYTES)
        self._schedule()

    def stop(self) -> None:
        if self._next is not None:
            self._next.cancel()


def _parse_refusal(exc: StompError) -> tuple[str, int]:
    """The error code and close code for a frame the parser refused."""
    if isinstance(exc, FrameTooLarge):
        return "too_large", CLOSE_TOO_BIG
    return "bad_request", CLOSE_PROTOCOL_ERROR


def _release_slot(limiter: Limiter, slot: Slot, _: object) -> None:
    limiter.release(slot)


async def _refuse(
    connection: ServerConnection, version: Version, code: str, message: str, close: int
) -> None:
    """ERROR, then close: for a conversation that has no session (yet)."""
    with contextlib.suppress(ConnectionClosed):
        await connection.send(error_frame(code, message, version), text=True)
        await connection.close(close, message[:120])

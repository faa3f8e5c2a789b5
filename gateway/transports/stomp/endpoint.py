"""STOMP 1.2 (1.1, 1.0) on the ``/ws`` endpoint: the wire and its I/O (contract section 10).

The listener (gateway/app.py) hands a connection here when the WebSocket
agreed on ``v12.stomp``, ``v11.stomp`` or ``v10.stomp``. A conversation goes:
``CONNECT``/``STOMP`` within the auth timeout -> the principal (handshake
header, or the JWT in ``passcode``) -> the same admission as a JSON client
-> ``CONNECTED`` -> every frame through ``StompBridge`` onto a
``StompSession``, which is the JSON protocol's ``Session``: the same
policies, limits, history, audit events and metrics, decided once.

Everything the client sends is bounded by ``FrameParser`` (largest frame,
header count, header length); anything it cannot parse gets an ``ERROR`` and
the connection closes, as STOMP requires after every ``ERROR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.auth.principal import Principal
from gateway.auth.tokens import AuthError, TokenVerifier
from gateway.config import Settings
from gateway.core.deadlines import Deadline
from gateway.core.node import Node
from gateway.core.session import CLOSE_AUTH, Session
from gateway.limits.restrictions import CLOSE_BANNED
from gateway.telemetry import logs
from gateway.telemetry.events import TrafficEvent
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
    Refused,
    connected_frame,
    error_frame,
    negotiate_heartbeat,
    parse_connect,
    receipt_frame,
)

log = logging.getLogger("rabbitgate.stomp")

CLOSE_AUTH_TIMEOUT = 4408
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
HEARTBEAT_BYTES = b"\n"
# Admission after authentication (bans, per-user caps): None to go on, or
# the (close code, reason) to refuse with. Gateway._admit is the one there is.
Admit = Callable[[ServerConnection, Principal, str | None], Awaitable[tuple[int, str] | None]]
# Why a session's close ends the conversation, said in an ERROR first.
_CLOSE_ERRORS: dict[int, tuple[str, str]] = {
    CLOSE_AUTH: ("unauthorized", "token expired"),
    CLOSE_BANNED: ("forbidden", "banned"),
    1001: ("unavailable", "server shutting down, reconnect elsewhere"),
    1008: ("forbidden", "too many connections"),
}


class StompOutbox:
    """A session's send path in STOMP: each gateway frame through the bridge.

    Implements what ``Session`` and the fan-out use of an ``Outbox``
    (``send``, ``send_many``, ``pending``, ``connection``) and writes the
    STOMP frames into the connection's own bounded ``Outbox`` (close 4409).
    """

    __slots__ = ("bridge", "inner", "connection", "_closing")

    def __init__(self, bridge: StompBridge, inner: Outbox) -> None:
        self.bridge = bridge
        self.inner = inner
        self.connection = inner.connection
        self._closing: asyncio.Task[None] | None = None

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

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self.connection.close(code, reason)
            )


class StompSession(Session):
    """A ``Session`` whose frames are STOMP; its closes are said in an ERROR first."""

    __slots__ = ()
    transport = "stomp"  # the label of rabbitgate_connections_open

    def close(self, code: int, reason: str) -> None:
        outbox = self.outbox
        assert isinstance(outbox, StompOutbox)
        said = _CLOSE_ERRORS.get(code)
        if said is not None and not outbox.bridge.closed:
            outbox.send_stomp(outbox.bridge.error(*said))
        super().close(code, reason)


class StompEndpoint:
    """Serves the STOMP conversations of one gateway's WebSocket listener."""

    def __init__(self, settings: Settings, node: Node, verifier: TokenVerifier, admit: Admit):
        self.settings = settings
        self.node = node
        self.verifier = verifier
        self.admit = admit

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
        assert isinstance(outbox, StompOutbox)
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

    async def _step(self, session: StompSession, outbox: StompOutbox, frame: Frame) -> bool:
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
            await session.outbox.connection.wait_closed()
            return False
        return True

    async def _open(
        self,
        connection: ServerConnection,
        parser: FrameParser,
        highest: Version,
        principal: Principal | None,
        address: str | None,
    ) -> tuple[StompSession, Connect, list[Event]] | None:
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
                    await _refuse(connection, highest, "rate_limited", "too many frames", 4429)
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
            except Refused as refused:
                await _refuse(
                    connection, highest, refused.code, refused.message, close_code(refused.code)
                )
                return None
            parser.version = connect.version
            if principal is None:
                principal = await self._verify(connection, connect, address)
                if principal is None:
                    return None
            refused_with = await self.admit(connection, principal, address)
            if refused_with is not None:
                close, reason = refused_with
                await _refuse(connection, connect.version, "forbidden", reason, close)
                return None
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
        # The seam until the core has a Transport protocol: a StompOutbox does
        # what Session and the fan-out ask of an Outbox (see its docstring).
        outbox = cast(Outbox, StompOutbox(bridge, inner))
        session = StompSession(self.node, self.verifier, outbox, principal, address)
        logs.bind(session=session.id, user=principal.sub, address=address)
        self.node.sessions.add(session)
        return session, connect, rest

    async def _verify(
        self, connection: ServerConnection, connect: Connect, address: str | None
    ) -> Principal | None:
        """The passcode's principal; None (ERROR sent, closed with 4401) if it is not valid."""
        try:
            if connect.passcode is None:
                raise AuthError("missing", "no token: send it as the passcode header")
            principal = await self.verifier.verify(connect.passcode)
        except AuthError as exc:
            log.info("STOMP CONNECT refused: %s", exc.reason)
            self.node.events.emit(TrafficEvent("auth_failed", address, detail=exc.reason))
            await self.node.limiter.record_auth_failure(address)
            await _refuse(connection, connect.version, "unauthorized", str(exc)[:120], CLOSE_AUTH)
            return None
        self.node.events.emit(TrafficEvent("auth_ok", address, principal.sub, detail="passcode"))
        return principal

    def _exchange_of(self, channel: str) -> str | None:
        found = self.node.policies.rule_for(channel)
        return None if found is None else found[0].exchange


class _Beats:
    """The server's heart-beats of one connection, on the node's shared deadlines."""

    __slots__ = ("node", "outbox", "every", "_next")

    def __init__(self, node: Node, outbox: StompOutbox, every: float) -> None:
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
        return "too_large", 1009
    return "bad_request", CLOSE_PROTOCOL_ERROR


async def _refuse(
    connection: ServerConnection, version: Version, code: str, message: str, close: int
) -> None:
    """ERROR, then close: for a conversation that has no session (yet)."""
    with contextlib.suppress(ConnectionClosed):
        await connection.send(error_frame(code, message, version), text=True)
        await connection.close(close, message[:120])

"""The WebSocket transport: the JSON protocol over TLS WebSockets (wire format and I/O).

``WebSocketListener`` serves ``/ws``: the handshake, authentication through
the core's ``Gate``, and the frame loop that hands every text frame to the
connection's ``Session`` (``core/session.py``). ``WebSocketTransport`` is a
connection's send path as the core's ``Transport``: the connection's
``Outbox`` (frames written straight into the socket's transport, bounded;
``transports/outbox.py``) plus closing with a code, stopping to read a
flooding client and closing it ahead of its unread flood. A subclass with no
slots of its own, so a connection costs no more memory than before, and the
fan-out still recognises it as an ``Outbox`` (framed once for all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from typing import ClassVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from gateway.auth.principal import AuthError, Principal
from gateway.config import Settings
from gateway.core.gate import Gate, Refused
from gateway.core.session import Session
from gateway.core.transport import TransportKind
from gateway.limits.limiter import Limiter, Refusal, Slot, rate_limited_frame, retry_after_header
from gateway.protocol.codes import CLOSE_AUTH, CLOSE_AUTH_TIMEOUT, CLOSE_POLICY, CLOSE_RATE_LIMITED
from gateway.protocol.frames import Auth, FrameError, error_frame, parse_frame, welcome_frame
from gateway.telemetry import logs
from gateway.telemetry.events import TrafficEvent
from gateway.transports.admission import AdmittedConnection, RefusalMemory, connection_class
from gateway.transports.headers import repeated
from gateway.transports.heartbeat import Heartbeat
from gateway.transports.heartbeat import run as run_heartbeat
from gateway.transports.outbox import Outbox
from gateway.transports.stomp.endpoint import StompEndpoint
from gateway.transports.stomp.mapping import SUBPROTOCOLS as STOMP_SUBPROTOCOLS
from gateway.transports.stomp.mapping import select_subprotocol as select_stomp
from gateway.transports.ws_adapter import WebSocketLink, forget_handshake

log = logging.getLogger("rabbitgate.server")
CLOSE_TIMEOUT_SECONDS = 5.0  # websockets' close_timeout, as passed to serve()

SUBPROTOCOL = Subprotocol("rabbitgate.v1")
WS_PATH = "/ws"
# What a rejected handshake has to say: nothing a client could learn from.
_UNAUTHORIZED_BODY = "invalid or missing token\n"


def select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """``rabbitgate.v1`` when offered, else the highest STOMP version offered
    (``v12.stomp``...: gateway/transports/stomp/); no subprotocol when none is
    offered; refuse a client that offers only subprotocols we do not speak."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    stomp = select_stomp(offered)
    if stomp is not None:
        return Subprotocol(stomp)
    if offered:
        raise NegotiationError(
            "unsupported subprotocol; this server speaks rabbitgate.v1 and v12.stomp"
        )
    return None


class WebSocketTransport(Outbox):
    __slots__ = ()

    kind: ClassVar[TransportKind] = "websocket"

    @property
    def open(self) -> bool:
        return self.connection.state is State.OPEN

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
        if connection.state is State.CLOSING and transport is not None:
            if transport.can_write_eof():
                transport.write_eof()
        await closing


class WebSocketListener:
    """The public WebSocket listener: handshake, authentication, one session per connection.

    A connection goes: ``_process_request`` (path, address admission, origin,
    Authorization header) -> ``_open_session`` (the header's principal, or the
    first ``auth`` frame within the auth timeout; the user's admission) ->
    ``welcome`` -> ``Session.handle`` for every frame -> ``ended``.
    """

    def __init__(self, settings: Settings, gate: Gate) -> None:
        self._settings = settings
        self._gate = gate
        self._node = gate.node
        self.server: Server | None = None
        self._connection_class: type[AdmittedConnection] | None = None
        # What the handshake learnt about a connection, for its handler.
        self._header_principals: weakref.WeakKeyDictionary[ServerConnection, Principal] = (
            weakref.WeakKeyDictionary()
        )
        self._refused: weakref.WeakSet[ServerConnection] = weakref.WeakSet()
        # STOMP conversations on the same /ws (contract section 10).
        self._stomp = StompEndpoint(settings, gate, self._transport)
        # Addresses refused at the handshake that come back too soon, dropped
        # before TLS (this process's own answers, so kept locally even with Redis).
        limits = settings.limits
        self.refusals = RefusalMemory(
            limits.handshake_refusals_before_drop, limits.bucket_table_size
        )
        # Every connection's WebSocket pings, from one task (gateway/transports/heartbeat.py).
        self.heartbeat: Heartbeat[ServerConnection] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, ssl_context: ssl.SSLContext | None) -> None:
        limits = self._settings.limits
        loop = asyncio.get_running_loop()
        self.heartbeat = Heartbeat(
            WebSocketLink(), limits.heartbeat_seconds, limits.heartbeat_timeout_seconds, loop.time()
        )
        self._heartbeat_task = loop.create_task(run_heartbeat(self.heartbeat))
        # TLS is started per connection by the connection class, after the
        # address was let in (gateway/transports/admission.py), not by the listener.
        self._connection_class = connection_class(
            self._drop_before_tls,
            self._dropped_before_tls,
            ssl_context,
            tls_timeout=limits.handshake_timeout_seconds,
            control_frames_per_second=limits.frames_per_second,
            control_frames_burst=limits.frames_burst,
            max_unread_bytes=limits.send_buffer_bytes + limits.max_frame_bytes,
        )
        # A port in use raises OSError: the command says so in one line (gateway/cli.py).
        self.server = await serve(
            self._handle,
            self._settings.host,
            self._settings.port,
            create_connection=self._connection_class,
            process_request=self._process_request,
            select_subprotocol=select_subprotocol,
            subprotocols=[SUBPROTOCOL, *map(Subprotocol, STOMP_SUBPROTOCOLS)],
            compression="deflate" if self._settings.compression else None,
            server_header=None,
            open_timeout=limits.handshake_timeout_seconds,
            # Pings come from self.heartbeat, not a keepalive task per connection.
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT_SECONDS,
            max_size=limits.max_frame_bytes,
            max_queue=16,
            # A reconnect storm brings hundreds of handshakes at once; the
            # default listen backlog (100) overflows and costs clients seconds.
            backlog=1024,
            # Workers of one supervisor share the port (gateway/operations/supervisor.py).
            reuse_port=self._settings.reuse_port or None,
        )
        log.info(
            "listening on %s://%s:%d%s",
            "wss" if ssl_context else "ws",
            self._settings.host,
            self.port,
            WS_PATH,
        )

    def stop_accepting(self) -> None:
        """No new connection; the open ones stay (``close`` ends them)."""
        if self.server is not None:
            self.server.server.close()
            if self._connection_class is not None:
                self._connection_class.abort_handshakes()

    async def close(self) -> None:
        """Close every connection with 1001, then stop the heartbeat."""
        if self.server is not None:
            self.server.close(close_connections=True, reason="server shutting down")
            await self.server.wait_closed()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task

    # --- handshake ----------------------------------------------------------

    def _drop_before_tls(self, peer: str | None) -> bool:
        # A proxy carries many clients: its address is never dropped (refusals
        # are recorded for the client behind it anyway).
        if self._node.trusted_proxies.trusts(peer):
            return False
        return self.refusals.drop(peer)

    def _client_address(self, connection: ServerConnection, request: Request) -> str | None:
        """The peer, or the client a trusted proxy forwarded (then kept on the connection)."""
        peer = _peer(connection)
        if not self._node.trusted_proxies:
            return peer
        forwarded = request.headers.get_all("X-Forwarded-For")
        address = self._node.trusted_proxies.client_address(peer, forwarded)
        if address != peer and isinstance(connection, AdmittedConnection):
            connection.forwarded_client = address
        return address

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if request.path.split("?", 1)[0] != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        address = self._client_address(connection, request)
        self._gate.connected(address, _kind(request))
        # A banned address (403); connect rate, failed authentications,
        # concurrent connections of the address (429): before any token work.
        admitted = await self._gate.admit(address)
        if isinstance(admitted, Refused):
            if admitted.limit is None:
                return connection.respond(HTTPStatus.FORBIDDEN, "banned\n")
            # Remembered, to drop before TLS one that ignores its Retry-After.
            self.refusals.refused(address, admitted.limit.retry_after)
            return _too_many_requests(connection, admitted.limit)
        if admitted is not None:
            # Given back when the socket goes, however it ends (a failed handshake too).
            # (A partial, not a closure: ~150 bytes less for the connection's life.)
            connection.connection_lost_waiter.add_done_callback(
                partial(_release_slot, self._node.limiter, admitted)
            )
        duplicate = repeated(request.headers.get_all)
        if duplicate is not None:  # ambiguous: refused (400), counted as a failed authentication
            refusal = AuthError("duplicate_header", f"more than one {duplicate} header")
            await self._gate.authenticate(refusal, address, "header")
            return connection.respond(HTTPStatus.BAD_REQUEST, f"more than one {duplicate} header\n")
        if not self._origin_allowed(request):
            # Refused after the upgrade with 1008, as the contract says, so that
            # a browser's script can see why; no token work is done for it.
            self._refused.add(connection)
            return None
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return None  # the client authenticates with its first frame
        scheme, _, token = authorization.partition(" ")
        credentials: str | AuthError = token.strip()
        if scheme.lower() != "bearer" or not token.strip():
            credentials = AuthError("malformed", "Authorization must be 'Bearer <token>'")
        principal = await self._gate.authenticate(credentials, address, "header")
        if isinstance(principal, Refused):
            response = connection.respond(HTTPStatus.UNAUTHORIZED, _UNAUTHORIZED_BODY)
            response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return response
        self._header_principals[connection] = principal
        return None

    def _dropped_before_tls(self, address: str | None) -> None:
        self._node.events.emit(TrafficEvent("rate_limited", address, detail="ignored_retry_after"))

    def _origin_allowed(self, request: Request) -> bool:
        allowed = self._settings.allowed_origins
        origin = request.headers.get("Origin")
        # Non-browser clients send no Origin; cross-site hijacking needs a browser.
        return not allowed or origin is None or origin in allowed

    # --- connection ---------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        # The handshake is over and process_request read what it needed
        # (anything else wanted from it must be read there too).
        forget_handshake(connection)
        assert self.heartbeat is not None
        self.heartbeat.add(connection, asyncio.get_running_loop().time())
        # One coroutine frame for the connection's whole life (no nested
        # coroutine, no async iterator): it is held by every idle connection.
        try:
            if connection.subprotocol in STOMP_SUBPROTOCOLS:
                await self._converse_stomp(connection)
                return
            session = await self._open_session(connection)
            if session is None:
                return
            try:
                heartbeat_seconds = self._settings.limits.heartbeat_seconds
                session.send(welcome_frame(session.id, session.principal.sub, heartbeat_seconds))
                while True:
                    message = await connection.recv()
                    if isinstance(message, bytes):
                        session.send(error_frame("bad_request", "binary frames are not accepted"))
                        continue
                    await session.handle(message)
            except ConnectionClosed:
                pass
            finally:
                self._node.sessions.discard(session)
                session.emit("closed", detail=str(connection.close_code))
                await session.ended()
        finally:
            self.heartbeat.discard(connection)

    async def _converse_stomp(self, connection: ServerConnection) -> None:
        """The same /ws endpoint in STOMP (contract section 10), on the same core."""
        if connection in self._refused:
            await connection.close(CLOSE_POLICY, "origin not allowed")
            return
        principal = self._header_principals.pop(connection, None)
        await self._stomp.converse(connection, principal, _address(connection))

    def _transport(self, connection: ServerConnection) -> WebSocketTransport:
        limits = self._settings.limits
        return WebSocketTransport(
            connection,
            max_bytes=limits.send_buffer_bytes,
            max_messages=limits.send_buffer_messages,
        )

    async def _open_session(self, connection: ServerConnection) -> Session | None:
        """Authenticate and admit the connection: its session, or None once it is closed."""
        if connection in self._refused:
            await connection.close(CLOSE_POLICY, "origin not allowed")
            return None
        principal = self._header_principals.pop(connection, None)
        if principal is None:
            principal = await self._authenticate(connection)
            if principal is None:
                return None
        address = _address(connection)
        # A banned user (4403), the user's concurrent connections (1008).
        user_slot = await self._gate.admit_user(principal, address)
        if isinstance(user_slot, Refused):
            await connection.close(user_slot.close_code, user_slot.message)
            return None
        connection.connection_lost_waiter.add_done_callback(
            partial(_release_slot, self._node.limiter, user_slot)
        )
        session = Session(self._gate, self._transport(connection), principal, address)
        logs.bind_connection(connection, session=session.id, user=principal.sub, address=address)
        self._node.sessions.add(session)
        return session

    async def _authenticate(self, connection: ServerConnection) -> Principal | None:
        """Wait for a valid ``auth`` frame; close with 4408/4401 and return None otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.limits.auth_timeout_seconds
        guard = self._node.limiter.connection_guard()  # frames before auth count too
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    message = await connection.recv()
                refusal = guard.frame()
                if refusal is not None:
                    if guard.strike():
                        await self._node.limiter.record_strikeout(_address(connection))
                        await _close_within(
                            connection, CLOSE_RATE_LIMITED, "rate limits broken too often"
                        )
                        return None
                    await connection.send(rate_limited_frame(refusal), text=True)
                    continue
                if isinstance(message, bytes):
                    await connection.send(
                        error_frame("unauthorized", "authenticate first"), text=True
                    )
                    continue
                try:
                    frame = parse_frame(message, self._settings.limits.max_data_depth)
                except FrameError as exc:
                    # Counted like a malformed frame after authentication.
                    malformed = TrafficEvent(
                        "malformed", _address(connection), size=len(message), detail=exc.code
                    )
                    self._node.events.emit(malformed)
                    await connection.send(
                        error_frame("unauthorized", "authenticate first", exc.request_id), text=True
                    )
                    continue
                if not isinstance(frame, Auth):
                    request_id = getattr(frame, "id", None)
                    await connection.send(
                        error_frame("unauthorized", "authenticate first", request_id), text=True
                    )
                    continue
                principal = await self._gate.authenticate(
                    frame.token, _address(connection), "frame"
                )
                if isinstance(principal, Refused):
                    await connection.close(CLOSE_AUTH, principal.message[:120])
                    return None
                return principal
        except TimeoutError:
            await _close_within(connection, CLOSE_AUTH_TIMEOUT, "no auth frame in time")
            return None
        except ConnectionClosed:
            return None


def _kind(request: Request) -> TransportKind:
    """What the handshake will agree on (``select_subprotocol``), for the connect event."""
    offered = [
        name.strip()
        for value in request.headers.get_all("Sec-WebSocket-Protocol")
        for name in value.split(",")
    ]
    if SUBPROTOCOL not in offered and select_stomp(offered) is not None:
        return "stomp"
    return "websocket"


async def _close_within(connection: ServerConnection, code: int, reason: str) -> None:
    """Close, and drop the TCP connection if that takes longer than the close timeout.

    websockets' close() first waits for the send buffer to drain, without a
    timeout: a peer that does not read (but pings, say) would keep the
    connection past its auth timeout until the next heartbeat.
    """
    try:
        async with asyncio.timeout(connection.close_timeout or CLOSE_TIMEOUT_SECONDS):
            await connection.close(code, reason)
    except TimeoutError:
        if connection.transport is not None:
            connection.transport.abort()
    except ConnectionClosed:
        pass


def _release_slot(limiter: Limiter, slot: Slot, _: object) -> None:
    limiter.release(slot)


def _too_many_requests(connection: ServerConnection, refusal: Refusal) -> Response:
    response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many requests\n")
    response.headers["Retry-After"] = retry_after_header(refusal)
    return response


def _address(connection: ServerConnection) -> str | None:
    """The client's address (see ``Gateway._client_address``)."""
    forwarded = getattr(connection, "forwarded_client", None)
    return forwarded if forwarded is not None else _peer(connection)


def _peer(connection: ServerConnection) -> str | None:
    remote = connection.remote_address
    return str(remote[0]) if remote else None

"""The public listener: TLS WebSockets, the handshake, authentication, the frame loop.

Only this module and ``broker.py`` touch the network. A connection goes:
handshake (``_process_request``: path, origin, Authorization header) ->
``_authenticate`` (header principal, or the first ``auth`` frame within the
auth timeout) -> ``welcome`` -> ``Session.handle`` for every frame -> ``ended``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from gateway.auth.tokens import AuthError, TokenVerifier
from gateway.config import Settings
from gateway.core.node import Node
from gateway.core.reloader import PolicyReloader
from gateway.core.session import CLOSE_AUTH, Session
from gateway.devtools.devcerts import server_ssl_context
from gateway.limits.limiter import Limiter, Refusal, Slot, rate_limited_frame, retry_after_header
from gateway.limits.restrictions import CLOSE_BANNED
from gateway.operations.malloc import fix_mmap_threshold
from gateway.operations.operations import Operations
from gateway.policy.rules import PolicySet, Principal
from gateway.protocol.frames import Auth, FrameError, error_frame, parse_frame, welcome_frame
from gateway.telemetry import logs
from gateway.telemetry.events import TrafficEvent
from gateway.transports.admission import AdmittedConnection, connection_class
from gateway.transports.handshake_memory import forget_handshake
from gateway.transports.headers import repeated
from gateway.transports.heartbeat import Heartbeat, WebSocketLink
from gateway.transports.heartbeat import run as run_heartbeat
from gateway.transports.outbox import Outbox

log = logging.getLogger("rabbitgate.server")

SUBPROTOCOL = Subprotocol("rabbitgate.v1")
WS_PATH = "/ws"
CLOSE_POLICY = 1008
CLOSE_AUTH_TIMEOUT = 4408
CLOSE_RATE_LIMITED = 4429
CLOSE_TIMEOUT_SECONDS = 5.0  # websockets' close_timeout, as passed to serve()
# What a rejected handshake has to say: nothing a client could learn from.
_UNAUTHORIZED_BODY = "invalid or missing token\n"


def select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """``rabbitgate.v1`` when offered; no subprotocol when none is offered;
    refuse a client that offers only subprotocols we do not speak."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    if offered:
        raise NegotiationError("unsupported subprotocol; this server speaks rabbitgate.v1")
    return None


class Gateway:
    """One gateway process: the public WebSocket listener and its Node."""

    def __init__(self, settings: Settings, policies: PolicySet) -> None:
        self.settings = settings
        self.node = Node(settings, policies)
        self.reloader = PolicyReloader(
            self.node, settings.policies_dir, watch=settings.policy_watch
        )
        self.verifier = TokenVerifier(settings.jwt)
        # Metrics, audit stream, admin and SSE listeners (gateway/operations/operations.py).
        self.metrics = self.node.metrics
        self.draining = False  # shutting down: /readyz answers 503
        self.ops = Operations(self)
        self.admin_app = self.ops.admin_app  # add admin routes to it before start()
        # Anomaly detection, alerts and their review page (anomaly/); None when off.
        self.anomaly: Any = None
        if settings.anomaly.enabled:
            from anomaly.service import AnomalyService

            self.anomaly = AnomalyService(self)
        self._server: Server | None = None
        self._connection_class: type[AdmittedConnection] | None = None
        # What the handshake learnt about a connection, for its handler.
        self._header_principals: weakref.WeakKeyDictionary[ServerConnection, Principal] = (
            weakref.WeakKeyDictionary()
        )
        self._refused: weakref.WeakSet[ServerConnection] = weakref.WeakSet()
        # Every connection's WebSocket pings, from one task (gateway/transports/heartbeat.py).
        self.heartbeat: Heartbeat[ServerConnection] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def admin_port(self) -> int:
        return self.ops.admin_port

    @property
    def sse_port(self) -> int | None:
        return self.ops.sse_port

    async def start(self) -> None:
        """Load keys, connect to RabbitMQ, listen. Raises ConfigError/BrokerUnavailable."""
        ssl_context = None
        if self.settings.tls.enabled:
            ssl_context = server_ssl_context(
                self.settings.tls.cert_file, self.settings.tls.key_file
            )
        await self.verifier.start()
        await self.node.start()
        if self.anomaly is not None:
            await self.anomaly.start()
        await self.reloader.start()  # watches policies_dir; SIGHUP calls reload_soon
        limits = self.settings.limits
        # Before the first connection: keeps uvloop's per-connection TLS read
        # buffers out of the heap (gateway/operations/malloc.py).
        fix_mmap_threshold()
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
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            create_connection=self._connection_class,
            process_request=self._process_request,
            select_subprotocol=select_subprotocol,
            subprotocols=[SUBPROTOCOL],
            compression="deflate" if self.settings.compression else None,
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
        )
        log.info(
            "listening on %s://%s:%d%s",
            "wss" if ssl_context else "ws",
            self.settings.host,
            self.port,
            WS_PATH,
        )
        await self.ops.start(ssl_context)

    async def shut_down(self) -> None:
        """What SIGTERM does: report not ready, go on serving for
        ``shutdown_delay_seconds`` (a load balancer sees /readyz 503 and stops
        sending new clients here), then ``stop``."""
        self.draining = True
        delay = self.settings.shutdown_delay_seconds
        if delay > 0:
            log.info("not ready any more; stopping in %g s", delay)
            await asyncio.sleep(delay)
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, then leave RabbitMQ."""
        await self.ops.stop()  # SSE streams end with 1001 too
        await self.reloader.stop()  # no policy swap while shutting down
        if self._server is not None:
            self._server.server.close()  # stop accepting; open connections stay
            if self._connection_class is not None:
                self._connection_class.abort_handshakes()
            # In-flight publishes get their confirm and their ack (or error)
            # before the connection goes; new ones are refused meanwhile.
            self.node.shutting_down = True
            sessions = list(self.node.sessions)
            if sessions:
                await asyncio.gather(*(session.drain() for session in sessions))
            self._server.close(close_connections=True, reason="server shutting down")
            await self._server.wait_closed()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self.anomaly is not None:
            await self.anomaly.stop()
        await self.node.stop()
        await self.verifier.close()

    # --- handshake ----------------------------------------------------------

    def _drop_before_tls(self, peer: str | None) -> bool:
        # A proxy carries many clients: its address is never dropped (refusals
        # are recorded for the client behind it anyway).
        if self.node.trusted_proxies.trusts(peer):
            return False
        return self.node.limiter.refusals.drop(peer)

    def _client_address(self, connection: ServerConnection, request: Request) -> str | None:
        """The peer, or the client a trusted proxy forwarded (then kept on the connection)."""
        peer = _peer(connection)
        if not self.node.trusted_proxies:
            return peer
        forwarded = request.headers.get_all("X-Forwarded-For")
        address = self.node.trusted_proxies.client_address(peer, forwarded)
        if address != peer and isinstance(connection, AdmittedConnection):
            connection.forwarded_client = address
        return address

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if request.path.split("?", 1)[0] != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        address = self._client_address(connection, request)
        self.node.events.emit(TrafficEvent("connect", address))
        if self.node.restrictions.banned("address", address):
            self.node.events.emit(TrafficEvent("banned", address, detail="403"))
            return connection.respond(HTTPStatus.FORBIDDEN, "banned\n")
        # Connect rate, failed authentications, concurrent connections of the
        # address: checked before any token work, refused with 429.
        admitted = await self.node.limiter.admit_connection(address)
        if isinstance(admitted, Refusal):
            self.node.events.emit(TrafficEvent("rate_limited", address, detail=admitted.limit))
            self.node.limiter.refusals.refused(address, admitted.retry_after)
            return _too_many_requests(connection, admitted)
        if admitted is not None:
            # Given back when the socket goes, however it ends (a failed handshake too).
            slot = admitted
            connection.connection_lost_waiter.add_done_callback(
                lambda _: self.node.limiter.release(slot)
            )
        duplicate = repeated(request.headers.get_all)
        if duplicate is not None:
            self.node.events.emit(TrafficEvent("auth_failed", address, detail="duplicate_header"))
            await self.node.limiter.record_auth_failure(address)
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
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("malformed", "Authorization must be 'Bearer <token>'")
            principal = await self.verifier.verify(token.strip())
        except AuthError as exc:
            log.info("handshake refused: %s", exc.reason)
            self.node.events.emit(TrafficEvent("auth_failed", address, detail=exc.reason))
            await self.node.limiter.record_auth_failure(address)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, _UNAUTHORIZED_BODY)
            response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return response
        self._header_principals[connection] = principal
        self.node.events.emit(TrafficEvent("auth_ok", address, principal.sub, detail="header"))
        return None

    def _dropped_before_tls(self, address: str | None) -> None:
        self.node.events.emit(TrafficEvent("rate_limited", address, detail="ignored_retry_after"))

    def _origin_allowed(self, request: Request) -> bool:
        allowed = self.settings.allowed_origins
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
            session = await self._open_session(connection)
            if session is None:
                return
            try:
                heartbeat_seconds = self.settings.limits.heartbeat_seconds
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
                self.node.sessions.discard(session)
                session.emit("closed", detail=str(connection.close_code))
                await session.ended()
        finally:
            self.heartbeat.discard(connection)

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
        if self.node.restrictions.banned("user", principal.sub):
            banned = TrafficEvent("banned", _address(connection), principal.sub, detail="4403")
            self.node.events.emit(banned)
            await connection.close(CLOSE_BANNED, "banned")
            return None
        user_slot = await self.node.limiter.admit_user(principal.sub)
        if isinstance(user_slot, Refusal):
            refused = TrafficEvent(
                "rate_limited", _address(connection), principal.sub, detail=user_slot.limit
            )
            self.node.events.emit(refused)
            await connection.close(CLOSE_POLICY, "too many connections")
            return None
        connection.connection_lost_waiter.add_done_callback(
            partial(_release_slot, self.node.limiter, user_slot)
        )
        limits = self.settings.limits
        outbox = Outbox(
            connection,
            max_bytes=limits.send_buffer_bytes,
            max_messages=limits.send_buffer_messages,
        )
        address = _address(connection)
        session = Session(self.node, self.verifier, outbox, principal, address)
        logs.bind(session=session.id, user=principal.sub, address=address)
        self.node.sessions.add(session)
        return session

    async def _authenticate(self, connection: ServerConnection) -> Principal | None:
        """Wait for a valid ``auth`` frame; close with 4408/4401 and return None otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.limits.auth_timeout_seconds
        guard = self.node.limiter.connection_guard()  # frames before auth count too
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    message = await connection.recv()
                refusal = guard.frame()
                if refusal is not None:
                    if guard.strike():
                        await self.node.limiter.record_strikeout(_address(connection))
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
                    frame = parse_frame(message, self.settings.limits.max_data_depth)
                except FrameError as exc:
                    # Counted like a malformed frame after authentication.
                    malformed = TrafficEvent(
                        "malformed", _address(connection), size=len(message), detail=exc.code
                    )
                    self.node.events.emit(malformed)
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
                address = _address(connection)
                try:
                    principal = await self.verifier.verify(frame.token)
                except AuthError as exc:
                    log.info("auth frame refused: %s", exc.reason)
                    self.node.events.emit(TrafficEvent("auth_failed", address, detail=exc.reason))
                    await self.node.limiter.record_auth_failure(address)
                    await connection.close(CLOSE_AUTH, str(exc)[:120])
                    return None
                accepted = TrafficEvent("auth_ok", address, principal.sub, detail="frame")
                self.node.events.emit(accepted)
                return principal
        except TimeoutError:
            await _close_within(connection, CLOSE_AUTH_TIMEOUT, "no auth frame in time")
            return None
        except ConnectionClosed:
            return None


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

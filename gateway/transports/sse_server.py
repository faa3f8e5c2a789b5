"""The SSE listener (spec section 8): ``GET /events?channel=C[&channel=C2...]``.

A stream is a subscriber like a WebSocket session: it joins ``node.sessions``
and the hub, and gets messages through the same fan-out, in its ``SseOutbox``;
its writer turns each ``message`` frame into ``event: message`` with the very
same JSON as ``data:`` and the stream's position as ``id:``. Refusals happen
before any byte of the stream: 401 (token), 400 (channels), 403 (policies,
origin or a ban), 429 (the limits of a WebSocket handshake: connect rate, failed
authentications and connections per address, connections per user; the
tenant's connections and subscriptions, one per channel), 503 (broker).
Then the stream runs until the client leaves, the token expires (``exp``),
the policies no longer allow any of its channels, the abuse protection bans
its user or address, its buffer overflows (slow consumer), or the gateway
stops.

Extensions of the contract, documented in docs/protocol.md:

* ``?access_token=<jwt>`` instead of the Authorization header, here only,
  because a browser's ``EventSource`` cannot set headers. A URL can end up in
  proxy logs and browser history, so such tokens should be short-lived; the
  gateway itself logs no query string (no access log).
* ``event: recovery`` with ``{"type": "recovery", "channel", "recovered",
  "seq"}`` per channel named by ``Last-Event-ID``, before its replayed
  messages (what a subscribe ack with ``since`` says).
* ``event: gateway-error`` with the JSON of an ``error`` frame: a channel no
  longer allowed, or why the stream ends. Not ``error``: ``EventSource``
  would take that for a connection failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import orjson
from aiohttp import web

from gateway.auth.tokens import AuthError
from gateway.broker.broker import BrokerUnavailable
from gateway.config import Settings
from gateway.core.deadlines import Deadline, loop_time_of
from gateway.core.gate import Denied, Gate, Refused
from gateway.core.transport import TransportKind
from gateway.limits.limiter import LimitRefused, Refusal
from gateway.policy.rules import Principal, Rule
from gateway.protocol.channels import is_valid_channel
from gateway.protocol.codes import (
    CLOSE_AUTH,
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
)
from gateway.protocol.frames import error_frame
from gateway.telemetry import logs
from gateway.telemetry.events import EventKind, TrafficEvent
from gateway.transports.headers import repeated
from gateway.transports.sse import HEARTBEAT, EventIds, SseOutbox, format_event

log = logging.getLogger("rabbitgate.sse")

SSE_PATH = "/events"
RETRY_MS = 3000  # how long EventSource waits before it reconnects
END_WRITE_TIMEOUT_SECONDS = 5.0
_END_FRAMES = {
    CLOSE_AUTH: error_frame("unauthorized", "token expired"),
    CLOSE_GOING_AWAY: error_frame("unavailable", "server shutting down"),
    CLOSE_POLICY: error_frame("forbidden", "no channel of this stream is allowed any more"),
    CLOSE_BANNED: error_frame("forbidden", "banned"),
}


PRESENCE_EVENTS = frozenset({"join", "leave", "presence_changed"})


class SseStream:
    """One SSE client: a ``Subscriber`` of the node (``node.sessions``, the hub)
    that takes no commands; its channels are subscribed when it opens."""

    kind: ClassVar[TransportKind] = "sse"

    def __init__(
        self,
        gate: Gate,
        principal: Principal,
        address: str | None,
        channels: Sequence[str],
        positions: dict[str, int],
    ) -> None:
        self.id = uuid.uuid4().hex
        node = gate.node
        self.gate = gate
        self.node = node
        self.event_ids = EventIds(channels)  # the URL's channels, in its order
        self.principal = principal
        self.address = address
        self.subscriptions: dict[str, str] = {}  # channel -> exchange
        limits = node.settings.limits
        self.outbox = SseOutbox(
            max_bytes=limits.send_buffer_bytes,
            max_messages=limits.send_buffer_messages,
            on_overflow=self._overflowed,
        )
        self.end_code: int | None = None
        self._positions = positions  # channel -> seq: what the event ids say
        self._socket: asyncio.Transport | None = None
        expires_at = loop_time_of(principal.exp)
        self._expiry: Deadline | None = None
        if expires_at != math.inf:
            expired = partial(self.close, CLOSE_AUTH, "token expired")
            self._expiry = node.deadlines.call_at(expires_at, expired)

    # --- the Subscriber interface (node, hub, policy reloads, bans) -------------

    def send(self, frame: bytes) -> None:
        self.outbox.send(frame)

    def emit(self, kind: EventKind, **fields: Any) -> None:
        event = TrafficEvent(kind, self.address, self.principal.sub, self.id, **fields)
        self.node.events.emit(event)

    def close(self, code: int, reason: str) -> None:
        """End the stream: what is queued is written, then why it ends."""
        if self.end_code is None:
            self.end_code = code
            log.info("ending SSE stream: %s", reason)
        self.outbox.close()

    def recheck_subscriptions(self) -> int:
        """End subscriptions the policies no longer allow (as ``Session`` does)."""
        ended = self.gate.revoke(self)
        for channel in ended:
            message = f"subscription to {channel} ended: no longer allowed"
            self.send(error_frame("forbidden", message, channel=channel))
        if ended and not self.subscriptions:
            self.close(CLOSE_POLICY, "no channel left")
        return len(ended)

    def _overflowed(self) -> None:
        # The client reads nothing: drop the connection, buffered bytes and all.
        self.end_code = CLOSE_SLOW_CONSUMER
        if self._socket is not None:
            self._socket.abort()

    # --- life cycle -----------------------------------------------------------

    async def subscribe(self, rules: dict[str, Rule], since: dict[str, int | None] | None) -> None:
        """Join the hub for each channel, replaying what a reconnecting client missed.

        Per channel named by ``Last-Event-ID`` (``since``), queues an ``event:
        recovery`` and the replayed messages first. Raises BrokerUnavailable
        (the caller then calls ``release``).
        """
        for channel, rule in rules.items():
            position = None if since is None else since.get(channel)
            joined = await self.node.add_subscriber(
                self,
                channel,
                rule.exchange,
                since=position,
                history=rule.history,
            )
            # Queued before anything is awaited, so no live message overtakes them.
            self.subscriptions[channel] = rule.exchange
            if position is not None:
                self._positions[channel] = position
            elif joined.seq is not None:
                self._positions[channel] = joined.seq
            if since is not None and channel in since:
                recovered = bool(joined.recovered)
                info = {"type": "recovery", "channel": channel, "recovered": recovered}
                self.send(orjson.dumps({**info, "seq": joined.seq}))
            for frame in joined.backlog:
                self.send(frame)

    async def drain(self) -> None:
        """Nothing to wait for: a stream publishes nothing (Gateway.stop calls this)."""

    def release(self) -> None:
        """Leave the hub; after this the stream receives nothing."""
        if self._expiry is not None:
            self._expiry.cancel()
        for channel in list(self.subscriptions):
            self.node.remove_subscriber(self, channel)
        self.subscriptions.clear()
        self.outbox.close()
        # Cycles broken at the end (the outbox calls back into this stream,
        # which holds the socket): the gateway freezes what lives longer than
        # a second, and frozen cycles are never collected.
        self.outbox.on_overflow = None
        self._socket = None
        self._expiry = None

    async def run(
        self,
        response: web.StreamResponse,
        socket: asyncio.Transport | None,
    ) -> None:
        """Write the stream until it ends; returns with the end event written."""
        self._socket = socket
        if self.outbox.overflowed and socket is not None:
            socket.abort()
            return
        await response.write(f"retry: {RETRY_MS}\n: rabbitgate\n\n".encode())
        heartbeat = self.node.settings.limits.heartbeat_seconds
        while True:
            frames = await self.outbox.take(heartbeat)
            if frames is None:
                break
            chunk = b"".join(self._event(frame) for frame in frames) if frames else HEARTBEAT
            if chunk:
                await response.write(chunk)
        end = _END_FRAMES.get(self.end_code or 0)
        if end is not None and not self.outbox.overflowed:
            async with asyncio.timeout(END_WRITE_TIMEOUT_SECONDS):
                await response.write(format_event("gateway-error", end))
                await response.write_eof()

    def _event(self, frame: bytes) -> bytes:
        """The SSE text of one frame the fan-out (or the stream itself) queued."""
        parsed = orjson.loads(frame)
        kind = parsed.get("type")
        if kind == "recovery":
            return format_event("recovery", frame)
        if kind in PRESENCE_EVENTS:
            # join / leave / presence_changed (docs/presence.md), no event id:
            # they are not replayed on reconnect.
            if parsed.get("channel") not in self.subscriptions:
                return b""
            return format_event(kind, frame)
        if kind != "message":
            return format_event("gateway-error", frame)
        channel = parsed["channel"]
        if channel not in self.subscriptions:
            return b""  # the policies ended it after the message was queued
        self._positions[channel] = parsed["seq"]
        return format_event("message", frame, self.event_ids.encode(self._positions))


class SseEndpoint:
    """The aiohttp app serving ``GET /events`` for one gateway."""

    def __init__(self, gate: Gate, settings: Settings) -> None:
        self._gate = gate
        self._node = gate.node
        self._settings = settings
        self.streams: set[SseStream] = set()
        self.app = web.Application()
        self.app.router.add_get(SSE_PATH, self._events)
        self.app.router.add_route("OPTIONS", SSE_PATH, self._preflight)

    def close_all(self) -> None:
        """End every stream with 1001 (the gateway is stopping)."""
        for stream in list(self.streams):
            stream.close(CLOSE_GOING_AWAY, "server shutting down")

    async def _preflight(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return web.Response(status=403, text="origin not allowed\n")
        cors["Access-Control-Allow-Methods"] = "GET"
        cors["Access-Control-Allow-Headers"] = "Authorization, Last-Event-ID"
        cors["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=cors)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        gate = self._gate
        forwarded = request.headers.getall("X-Forwarded-For", [])
        address = self._node.trusted_proxies.client_address(request.remote, forwarded)
        gate.connected(address, "sse")
        duplicate = repeated(lambda name: request.headers.getall(name, []))
        if duplicate is not None:  # ambiguous: refused (400), counted as a failed authentication
            refusal = AuthError("duplicate_header", f"more than one {duplicate} header")
            await gate.authenticate(refusal, address, "sse")
            return _refuse(400, f"more than one {duplicate} header", {})
        cors = self._cors(request)
        if cors is None:
            return _refuse(403, "origin not allowed", {})
        # The WebSocket handshake's checks: a banned address, failed
        # authentications, connect rate and concurrent connections of the
        # address, then (after the token) a banned user and its connections.
        admitted = await gate.admit(address)
        if isinstance(admitted, Refused):
            return _refused(admitted, cors)
        try:
            return await self._authorized(request, address, cors)
        finally:
            gate.release(admitted)

    async def _authorized(
        self, request: web.Request, address: str | None, cors: dict[str, str]
    ) -> web.StreamResponse:
        gate = self._gate
        principal = await gate.authenticate(_credentials(request), address, "sse")
        if isinstance(principal, Refused):
            cors["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return _refuse(401, "invalid or missing token", cors)
        user_slot = await gate.admit_user(principal, address)
        if isinstance(user_slot, Refused):
            return _refused(user_slot, cors)
        try:
            return await self._subscribed(request, principal, address, cors)
        finally:
            gate.release(user_slot)

    async def _subscribed(
        self,
        request: web.Request,
        principal: Principal,
        address: str | None,
        cors: dict[str, str],
    ) -> web.StreamResponse:
        channels = list(dict.fromkeys(request.query.getall("channel", [])))
        limit = self._settings.limits.max_channels_per_connection
        if not channels or len(channels) > limit:
            return _refuse(400, f"give 1 to {limit} channel parameters", cors)
        invalid = next((c for c in channels if not is_valid_channel(c)), None)
        if invalid is not None:
            return _refuse(400, "invalid channel name", cors)
        rules: dict[str, Rule] = {}
        for channel in channels:
            rule = self._gate.may_subscribe(principal, channel, address)
            if isinstance(rule, Denied):
                return _refuse(403, rule.message, cors)
            rules[channel] = rule
        since = _since(request.headers.get("Last-Event-ID"), channels)
        stream = SseStream(self._gate, principal, address, channels, {})
        policies = self._node.policies
        try:
            await stream.subscribe(rules, since)
        except BrokerUnavailable:
            stream.release()
            return _refuse(503, "broker unavailable, retry later", cors)
        except LimitRefused as refused:  # the tenant's subscriptions cap, or a replay too large
            stream.release()
            refusal = refused.refusal
            event = TrafficEvent("rate_limited", address, principal.sub, detail=refusal.limit)
            self._node.events.emit(event)
            return _too_many(refusal, cors)
        except BaseException:  # the client left (handler cancelled) while joining
            stream.release()
            raise
        if self._node.policies is not policies:
            # A reload swapped the set while the stream joined (a replay can
            # take seconds); its re-check could not see this stream yet (it is
            # not in node.sessions), so check it here, as Session does.
            stream.recheck_subscriptions()
            if not stream.subscriptions:
                stream.release()
                return _refuse(403, "no channel of this stream is allowed any more", cors)
        for channel, rule in rules.items():
            if channel in stream.subscriptions:
                stream.emit("subscribe", channel=channel, rule=rule.label)
        return await self._stream(request, stream, cors)

    async def _stream(
        self,
        request: web.Request,
        stream: SseStream,
        cors: dict[str, str],
    ) -> web.StreamResponse:
        node = self._node
        logs.bind(session=stream.id, user=stream.principal.sub, address=stream.address)
        node.sessions.add(stream)
        self.streams.add(stream)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # tell nginx-like proxies not to buffer
                **cors,
            }
        )
        response.force_close()
        try:
            await response.prepare(request)
            await stream.run(response, request.transport)
        except ConnectionError:
            pass  # the client went away
        except TimeoutError:  # it does not read the end event: drop it
            if request.transport is not None:
                request.transport.abort()
        finally:
            self.streams.discard(stream)
            node.sessions.discard(stream)
            stream.release()
            stream.emit("closed", detail=str(stream.end_code or CLOSE_NORMAL))
        return response

    def _cors(self, request: web.Request) -> dict[str, str] | None:
        """CORS headers for this request's Origin; None when the origin is refused."""
        origin = request.headers.get("Origin")
        allowed = self._settings.allowed_origins
        if origin is None:
            return {}
        if not allowed:
            # Tokens, not cookies, authenticate: any page may read with its own token.
            return {"Access-Control-Allow-Origin": "*"}
        if origin in allowed:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return None


def _credentials(request: web.Request) -> str | AuthError:
    """The bearer token: the Authorization header, else ``?access_token=``
    (or why there is none, which counts as a failed authentication)."""
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthError("malformed", "Authorization must be 'Bearer <token>'")
        return token.strip()
    # Stripped like the header's: a blank ?access_token= is no token (the fuzzer's find).
    query_token = (request.query.get("access_token") or "").strip()
    if not query_token:
        return AuthError("missing")
    return query_token


def _since(last_event_id: str | None, channels: list[str]) -> dict[str, int | None] | None:
    """Where a reconnecting client stopped, per channel; None on a first connection."""
    if last_event_id is None:
        return None
    positions = EventIds(channels).decode(last_event_id)
    if positions is None:  # not one of ours: no channel can be recovered
        return dict.fromkeys(channels)
    return {channel: positions[channel] for channel in channels if channel in positions}


def _refused(refused: Refused, headers: dict[str, str]) -> web.Response:
    """A refusal of the gate before the stream starts: 403 (banned) or 429."""
    if refused.limit is None:
        return _refuse(403, refused.message, headers)
    return _too_many(refused.limit, headers)


def _too_many(refusal: Refusal, headers: dict[str, str]) -> web.Response:
    retry_after = str(max(1, math.ceil(refusal.retry_after)))
    return _refuse(
        429, f"too many requests ({refusal.limit})", {**headers, "Retry-After": retry_after}
    )


def _refuse(status: int, message: str, headers: dict[str, str]) -> web.Response:
    body = orjson.dumps({"error": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)

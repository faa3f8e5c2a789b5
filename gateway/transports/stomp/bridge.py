"""One STOMP conversation over the core's commands and answers. No I/O.

The STOMP endpoint hands every client frame after CONNECTED to
``StompBridge.request``, which returns the core's commands that mean the same
(``protocol/frames.py``: ``Subscribe``, ``Unsubscribe``, ``Publish``, ``Ping``)
for the connection's ``Session``; every frame the core writes to the
connection (its answers and the fan-out's messages, JSON-protocol frames, the
contract's canonical form) goes through ``StompBridge.answer`` on its way out.
The bridge keeps what STOMP has and the core does not: subscription ids
(several may name one channel), receipts, the ``recovered`` flag to put
on a subscription's first MESSAGE, and the presence requests under way (a
``SUBSCRIBE`` to ``/presence/<channel>`` becomes the core's ``Presence``
command; its answer becomes one MESSAGE on that subscription id, which is
then free again). Every decision (policies, limits, history)
stays with the core: a refused command comes back as an ``error`` frame and
leaves as an ``ERROR``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.protocol.codes import (
    CLOSE_AUTH,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
)
from gateway.protocol.frames import DEFAULT_MAX_DATA_DEPTH, ClientFrame, Ping, Presence, Publish
from gateway.protocol.frames import Subscribe as SubscribeCommand
from gateway.protocol.frames import Unsubscribe as UnsubscribeCommand
from gateway.transports.stomp.frames import Frame, Version
from gateway.transports.stomp.mapping import (
    Destination,
    Disconnect,
    ExchangeOf,
    MessageTail,
    PresenceQuery,
    Refused,
    Send,
    Subscribe,
    Unsubscribe,
    error_frame,
    message_frame,
    message_tail,
    parse_request,
    presence_answer_body,
    presence_event_frame,
    receipt_frame,
)

# How the connection closes after an ERROR (STOMP requires the close), by the
# error's code: the contract's close codes (section 7) where one applies,
# RFC 6455's otherwise.
CLOSE_AFTER_ERROR: dict[str, int] = {
    "unauthorized": CLOSE_AUTH,
    "forbidden": CLOSE_POLICY,
    "rate_limited": CLOSE_POLICY,
    "too_large": CLOSE_TOO_BIG,
    "bad_request": CLOSE_PROTOCOL_ERROR,
    "unavailable": CLOSE_TRY_AGAIN,
    "internal": CLOSE_INTERNAL,
}


def close_code(error_code: str) -> int:
    return CLOSE_AFTER_ERROR.get(error_code, CLOSE_INTERNAL)


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: str  # "subscribe", "unsubscribe", "send" or "presence"
    receipt: str | None
    subscription: str | None = None


@dataclass(slots=True)
class Step:
    """What to do for one client frame, in this order."""

    requests: list[ClientFrame] = field(default_factory=list)  # commands for the session
    frames: list[bytes] = field(default_factory=list)  # STOMP frames to send now
    close: int | None = None  # close with this code after the frames
    disconnect: Disconnect | None = None  # drain, RECEIPT (if asked), close 1000


@dataclass(slots=True)
class StompBridge:
    version: Version
    exchange_of: ExchangeOf
    max_subscriptions: int
    max_depth: int = DEFAULT_MAX_DATA_DEPTH  # of a JSON body (limits.max_data_depth)
    subscriptions: dict[str, Destination] = field(default_factory=dict)  # id -> destination
    by_channel: dict[str, list[str]] = field(default_factory=dict)  # channel -> ids
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _recovered: dict[str, bool] = field(default_factory=dict)  # for the id's first MESSAGE
    # Presence requests under way: subscription id -> the core request id that
    # answers it (an UNSUBSCRIBE before the answer removes it: nothing is sent).
    _queries: dict[str, int] = field(default_factory=dict)
    _next_id: int = 0
    _events: int = 0  # presence events sent: their message-ids
    closed: bool = False  # an ERROR went out: nothing more is sent

    # --- client -> gateway ------------------------------------------------------

    def request(self, frame: Frame) -> Step:
        try:
            request = parse_request(frame, self.exchange_of, self.max_depth)
        except Refused as refused:
            return self._refuse(refused)
        match request:
            case Subscribe():
                return self._subscribe(request)
            case PresenceQuery():
                return self._presence_query(request)
            case Unsubscribe():
                return self._unsubscribe(request)
            case Send():
                return self._send(request)
            case Disconnect():
                return Step(disconnect=request)

    def _id_in_use(self, sub_id: str) -> bool:
        return sub_id in self.subscriptions or sub_id in self._queries

    def _presence_query(self, request: PresenceQuery) -> Step:
        if self._id_in_use(request.id):
            refused = Refused(
                "bad_request", f"subscription id {request.id} is in use", request.receipt
            )
            return self._refuse(refused)
        # No subscription is made: it does not count against max_subscriptions,
        # and the core decides everything else (policy, rate limit, Redis).
        request_id = self._expect(_Pending("presence", request.receipt, request.id))
        self._queries[request.id] = request_id
        return Step(requests=[Presence(request_id, request.channel)])

    def _subscribe(self, request: Subscribe) -> Step:
        if self._id_in_use(request.id):
            refused = Refused(
                "bad_request", f"subscription id {request.id} is in use", request.receipt
            )
            return self._refuse(refused)
        if len(self.subscriptions) >= self.max_subscriptions:
            message = f"at most {self.max_subscriptions} subscriptions per connection"
            return self._refuse(Refused("forbidden", message, request.receipt))
        channel = request.destination.channel
        others = self.by_channel.get(channel)
        if others:
            # The session already delivers this channel here: one more id for it.
            if request.since is not None:
                message = f"already subscribed to {channel}; x-since needs its own channel"
                return self._refuse(Refused("bad_request", message, request.receipt))
            self.subscriptions[request.id] = request.destination
            others.append(request.id)
            frames = (
                [] if request.receipt is None else [receipt_frame(request.receipt, self.version)]
            )
            return Step(frames=frames)
        self.subscriptions[request.id] = request.destination
        self.by_channel[channel] = [request.id]
        request_id = self._expect(_Pending("subscribe", request.receipt, request.id))
        return Step(requests=[SubscribeCommand(request_id, channel, request.since)])

    def _unsubscribe(self, request: Unsubscribe) -> Step:
        self._queries.pop(request.id, None)  # a presence request: its answer is not sent
        destination = self.subscriptions.pop(request.id, None)
        self._recovered.pop(request.id, None)
        if destination is not None:
            ids = self.by_channel[destination.channel]
            ids.remove(request.id)
            if not ids:
                del self.by_channel[destination.channel]
                request_id = self._expect(_Pending("unsubscribe", request.receipt))
                return Step(requests=[UnsubscribeCommand(request_id, destination.channel)])
        # An unknown id is answered like the JSON protocol's unsubscribe: done.
        frames = [] if request.receipt is None else [receipt_frame(request.receipt, self.version)]
        return Step(frames=frames)

    def _send(self, request: Send) -> Step:
        request_id = None
        if request.receipt is not None:
            request_id = self._expect(_Pending("send", request.receipt))
        # Without a receipt the core answers only a refusal (an ERROR here).
        return Step(requests=[Publish(request_id, request.destination.channel, request.data)])

    def _expect(self, pending: _Pending) -> int:
        self._next_id += 1
        self._pending[self._next_id] = pending
        return self._next_id

    def _refuse(self, refused: Refused) -> Step:
        frame = self.error(refused.code, refused.message, refused.receipt)
        return Step(frames=[frame], close=close_code(refused.code))

    def error(self, code: str, message: str, receipt: str | None = None, **extra: Any) -> bytes:
        """The ERROR frame (and from now on the bridge sends nothing more)."""
        self.closed = True
        return error_frame(code, message, self.version, receipt, **extra)

    # --- gateway -> client ------------------------------------------------------

    def answer(self, frame: bytes) -> tuple[list[bytes], int | None]:
        """The STOMP frames for one gateway frame, and a close code if they end the connection."""
        if self.closed:
            return [], None
        if frame.startswith(b'{"type":"message"'):  # the fan-out's frames: the hot path
            return self._messages(frame), None
        parsed = orjson.loads(frame)
        kind = parsed.get("type")
        if kind == "ack":
            return self._acked(parsed), None
        if kind == "error":
            return self._failed(parsed)
        if kind in ("join", "leave", "presence_changed"):
            return self._presence_event(str(kind), parsed.get("channel"), frame), None
        if kind == "presence":
            return self._presence_answer(parsed), None
        return [], None  # pong, welcome: nothing in STOMP

    def _presence_event(self, kind: str, channel: object, frame: bytes) -> list[bytes]:
        """One MESSAGE with ``x-event`` per subscription of the channel."""
        if not isinstance(channel, str):
            return []
        self._events += 1
        out = []
        for sub_id in self.by_channel.get(channel, ()):
            destination = self.subscriptions[sub_id].text
            message_id = f"{channel}@presence-{self._events}"
            out.append(
                presence_event_frame(sub_id, destination, kind, frame, message_id, self.version)
            )
        return out

    def _presence_answer(self, parsed: dict[str, Any]) -> list[bytes]:
        """The answer to a presence request: one MESSAGE on its subscription id, and
        its RECEIPT after it (the receipt then says the answer is there)."""
        request_id = parsed.get("id")
        pending = self._pending.pop(request_id, None)  # type: ignore[arg-type]
        if pending is None or pending.kind != "presence" or pending.subscription is None:
            return []
        out = []
        sub_id = pending.subscription
        channel = parsed.get("channel")
        if self._queries.get(sub_id) == request_id and isinstance(channel, str):
            del self._queries[sub_id]
            self._events += 1
            query = PresenceQuery(sub_id, channel, pending.receipt)
            out.append(
                presence_event_frame(
                    sub_id,
                    query.destination,
                    "presence",
                    presence_answer_body(parsed),
                    f"{channel}@presence-{self._events}",
                    self.version,
                )
            )
        if pending.receipt is not None:
            out.append(receipt_frame(pending.receipt, self.version))
        return out

    def _messages(self, frame: bytes) -> list[bytes]:
        message = _shared_message(frame, self.version)
        if message is None:
            return []
        channel, tail = message
        out = []
        for sub_id in self.by_channel.get(channel, ()):
            recovered = self._recovered.pop(sub_id, None) if self._recovered else None
            destination = self.subscriptions[sub_id].text
            if recovered is not None:
                out.append(message_frame(sub_id, destination, tail, self.version, recovered))
                continue
            # Clients mostly name their subscriptions alike (stompjs: "sub-0"),
            # so most subscribers of a message get the very same bytes.
            key = (self.version, sub_id, destination)
            built = _last_built.get(key)
            if built is None:
                built = message_frame(sub_id, destination, tail, self.version)
                if len(_last_built) < MAX_SHARED_FRAMES:
                    _last_built[key] = built
            out.append(built)
        return out

    def _acked(self, parsed: dict[str, Any]) -> list[bytes]:
        pending = self._pending.pop(parsed.get("id"), None)  # type: ignore[arg-type]
        if pending is None:
            return []
        if pending.kind != "subscribe":
            return [] if pending.receipt is None else [receipt_frame(pending.receipt, self.version)]
        recovered = parsed.get("recovered")
        seq = parsed.get("seq")
        if pending.receipt is not None:
            return [receipt_frame(pending.receipt, self.version, recovered, seq)]
        if recovered is not None:
            assert pending.subscription is not None
            if pending.subscription in self.subscriptions:
                self._recovered[pending.subscription] = bool(recovered)
        return []

    def _failed(self, parsed: dict[str, Any]) -> tuple[list[bytes], int | None]:
        code = str(parsed.get("code", "internal"))
        message = str(parsed.get("message", ""))
        receipt = None
        pending = self._pending.pop(parsed.get("id"), None)  # type: ignore[arg-type]
        if pending is not None:
            receipt = pending.receipt
            if pending.kind == "subscribe" and pending.subscription is not None:
                self._drop(pending.subscription)
            if pending.kind == "presence" and pending.subscription is not None:
                self._queries.pop(pending.subscription, None)
        destination = None
        channel = parsed.get("channel")
        if isinstance(channel, str) and channel in self.by_channel:
            # A subscription the policies no longer allow (after a reload).
            destination = self.subscriptions[self.by_channel[channel][0]].text
            for sub_id in list(self.by_channel[channel]):
                self._drop(sub_id)
        retry_after = parsed.get("retry_after")
        frame = self.error(code, message, receipt, retry_after=retry_after, destination=destination)
        return [frame], close_code(code)

    def _drop(self, sub_id: str) -> None:
        destination = self.subscriptions.pop(sub_id, None)
        self._recovered.pop(sub_id, None)
        if destination is None:
            return
        ids = self.by_channel.get(destination.channel)
        if ids is not None and sub_id in ids:
            ids.remove(sub_id)
            if not ids:
                del self.by_channel[destination.channel]


# A frame the bridge answers itself (a second id on a channel, an unknown
# UNSUBSCRIBE, a heart-beat) still goes to the session as this ping, so that
# the connection's frame limits and idle timeout count it; its pong says nothing.
CHARGE = Ping(0)


# The fan-out hands the same frame object to every subscriber of a channel:
# its STOMP part shared by all of them is built once (per version), here.
_last_frame: bytes | None = None
_last_parts: dict[Version, tuple[str, MessageTail] | None] = {}
# ... and whole MESSAGE frames by (version, subscription id, destination), a
# bounded number of them (distinct ids on a large message would be MBs).
MAX_SHARED_FRAMES = 64
_last_built: dict[tuple[Version, str, str], bytes] = {}


def _shared_message(frame: bytes, version: Version) -> tuple[str, MessageTail] | None:
    global _last_frame
    if frame is not _last_frame:
        _last_frame = frame
        _last_parts.clear()
        _last_built.clear()
    if version in _last_parts:
        return _last_parts[version]
    parsed = orjson.loads(frame)
    parts: tuple[str, MessageTail] | None = None
    channel = parsed.get("channel")
    if isinstance(channel, str):
        data = orjson.dumps(parsed.get("data"))
        tail = message_tail(
            channel, int(parsed["seq"]), parsed.get("from"), int(parsed["ts"]), data, version
        )
        parts = (channel, tail)
    _last_parts[version] = parts
    return parts

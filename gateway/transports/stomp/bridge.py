"""One STOMP conversation over the gateway's request/answer frames. No I/O.

The STOMP transport hands every client frame after CONNECTED to
``StompBridge.request`` and every frame the gateway sends the connection (its
answers and the fan-out's messages, as JSON frames of sections 3-4) to
``StompBridge.answer``. The bridge keeps what STOMP has and the gateway does
not: subscription ids (several may name one channel), receipts, and the
``recovered`` flag to put on a subscription's first MESSAGE. Every decision
(policies, limits, history) stays with the gateway's session: a STOMP request
becomes the JSON request that means the same, and its answer comes back as a
RECEIPT or an ERROR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.transports.stomp.frames import Frame, Version
from gateway.transports.stomp.mapping import (
    Destination,
    Disconnect,
    ExchangeOf,
    MessageTail,
    Refused,
    Send,
    Subscribe,
    Unsubscribe,
    error_frame,
    message_frame,
    message_tail,
    parse_request,
    receipt_frame,
)

# How the connection closes after an ERROR (STOMP requires the close), by the
# error's code: the contract's close codes (section 7) where one applies,
# RFC 6455's otherwise.
CLOSE_AFTER_ERROR: dict[str, int] = {
    "unauthorized": 4401,
    "forbidden": 1008,
    "rate_limited": 1008,
    "too_large": 1009,
    "bad_request": 1002,
    "unavailable": 1013,
    "internal": 1011,
}


def close_code(error_code: str) -> int:
    return CLOSE_AFTER_ERROR.get(error_code, 1011)


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: str  # "subscribe", "unsubscribe" or "send"
    receipt: str | None
    subscription: str | None = None


@dataclass(slots=True)
class Step:
    """What to do for one client frame, in this order."""

    requests: list[bytes] = field(default_factory=list)  # JSON frames for the session
    frames: list[bytes] = field(default_factory=list)  # STOMP frames to send now
    close: int | None = None  # close with this code after the frames
    disconnect: Disconnect | None = None  # drain, RECEIPT (if asked), close 1000


@dataclass(slots=True)
class StompBridge:
    version: Version
    exchange_of: ExchangeOf
    max_subscriptions: int
    subscriptions: dict[str, Destination] = field(default_factory=dict)  # id -> destination
    by_channel: dict[str, list[str]] = field(default_factory=dict)  # channel -> ids
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _recovered: dict[str, bool] = field(default_factory=dict)  # for the id's first MESSAGE
    _next_id: int = 0
    closed: bool = False  # an ERROR went out: nothing more is sent

    # --- client -> gateway ------------------------------------------------------

    def request(self, frame: Frame) -> Step:
        try:
            request = parse_request(frame, self.exchange_of)
        except Refused as refused:
            return self._refuse(refused)
        match request:
            case Subscribe():
                return self._subscribe(request)
            case Unsubscribe():
                return self._unsubscribe(request)
            case Send():
                return self._send(request)
            case Disconnect():
                return Step(disconnect=request)

    def _subscribe(self, request: Subscribe) -> Step:
        if request.id in self.subscriptions:
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
        json: dict[str, Any] = {"type": "subscribe", "id": request_id, "channel": channel}
        if request.since is not None:
            json["since"] = request.since
        return Step(requests=[orjson.dumps(json)])

    def _unsubscribe(self, request: Unsubscribe) -> Step:
        destination = self.subscriptions.pop(request.id, None)
        self._recovered.pop(request.id, None)
        if destination is not None:
            ids = self.by_channel[destination.channel]
            ids.remove(request.id)
            if not ids:
                del self.by_channel[destination.channel]
                request_id = self._expect(_Pending("unsubscribe", request.receipt))
                json = {"type": "unsubscribe", "id": request_id, "channel": destination.channel}
                return Step(requests=[orjson.dumps(json)])
        # An unknown id is answered like the JSON protocol's unsubscribe: done.
        frames = [] if request.receipt is None else [receipt_frame(request.receipt, self.version)]
        return Step(frames=frames)

    def _send(self, request: Send) -> Step:
        channel = orjson.dumps(request.destination.channel)
        if request.receipt is None:
            head = b'{"type":"publish","channel":' + channel
        else:
            request_id = self._expect(_Pending("send", request.receipt))
            head = b'{"type":"publish","id":%d,"channel":%s' % (request_id, channel)
        # The body was checked to be one JSON value: spliced in, not re-encoded.
        return Step(requests=[head + b',"data":' + request.data + b"}"])

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
        return [], None  # pong, welcome: nothing in STOMP

    def _messages(self, frame: bytes) -> list[bytes]:
        message = _shared_message(frame, self.version)
        if message is None:
            return []
        channel, tail = message
        out = []
        for sub_id in self.by_channel.get(channel, ()):
            recovered = self._recovered.pop(sub_id, None) if self._recovered else None
            destination = self.subscriptions[sub_id].text
            out.append(message_frame(sub_id, destination, tail, self.version, recovered))
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


# The fan-out hands the same frame object to every subscriber of a channel:
# its STOMP part shared by all of them is built once (per version), here.
_last_frame: bytes | None = None
_last_parts: dict[Version, tuple[str, MessageTail] | None] = {}


def _shared_message(frame: bytes, version: Version) -> tuple[str, MessageTail] | None:
    global _last_frame
    if frame is not _last_frame:
        _last_frame = frame
        _last_parts.clear()
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

"""Frames of the wire contract (sections 3 and 4) <-> plain values. No I/O.

``parse_frame`` turns one text frame from a client into a dataclass or raises
``FrameError`` with the spec's error code; the ``*_frame`` functions build the
server's frames as UTF-8 JSON bytes, ready to be sent as a text frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.protocol.channels import is_valid_channel

RequestId = str | int

MAX_ID_CHARS = 64
# Integer ids beyond 2**53 would lose precision in a JavaScript client.
MAX_ID_INT = 2**53
# How deeply a publish's `data` may nest (arrays and objects; a scalar is 0),
# ``limits.max_data_depth``. orjson serializes at most 254 levels: a deeper
# `data` could be acked and then never be delivered (nor replayed), so it is
# refused before it reaches RabbitMQ. (``gateway/config.py`` keeps the
# setting well below orjson's limit.)
DEFAULT_MAX_DATA_DEPTH = 32


class FrameError(Exception):
    """A frame the gateway refuses; answered with an ``error`` frame."""

    def __init__(self, code: str, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: RequestId
    channel: str
    since: int | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: RequestId
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    id: RequestId | None
    channel: str
    # The JSON of `data` as the gateway re-serialized it: this is what goes to
    # RabbitMQ, and its length is what `max_bytes` limits.
    body: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    id: RequestId | None


ClientFrame = Subscribe | Unsubscribe | Publish | Ping | Auth


def parse_frame(text: str | bytes, max_depth: int = DEFAULT_MAX_DATA_DEPTH) -> ClientFrame:
    """Parse one client frame. Raises FrameError("bad_request", ...) on anything
    malformed, and nothing else for any input (fuzzed: tests/security)."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:  # also: nested past orjson's 1024 levels
        raise FrameError("bad_request", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("bad_request", "frame must be a JSON object")
    kind = obj.get("type")
    # Parse the id first, so that later errors can echo it back.
    request_id = _optional_id(obj)
    if not isinstance(kind, str):
        raise FrameError("bad_request", "field 'type' must be a string", request_id)
    parser = _PARSERS.get(kind)
    if parser is None:
        shown = kind[:32].encode("ascii", "backslashreplace").decode()
        raise FrameError("bad_request", f"unknown frame type {shown!r}", request_id)
    return parser(obj, request_id, max_depth)


def _optional_id(obj: dict[str, Any]) -> RequestId | None:
    if "id" not in obj or obj["id"] is None:
        return None
    value = obj["id"]
    if isinstance(value, bool):
        raise FrameError("bad_request", "field 'id' must be a string or an integer")
    if isinstance(value, int):
        if -MAX_ID_INT <= value <= MAX_ID_INT:
            return value
        raise FrameError("bad_request", "field 'id' is out of range")
    if isinstance(value, str):
        if len(value) <= MAX_ID_CHARS:
            return value
        raise FrameError("bad_request", f"field 'id' is longer than {MAX_ID_CHARS} characters")
    raise FrameError("bad_request", "field 'id' must be a string or an integer")


def _required_id(request_id: RequestId | None, kind: str) -> RequestId:
    if request_id is None:
        raise FrameError("bad_request", f"a {kind} frame needs an 'id'")
    return request_id


def _channel(obj: dict[str, Any], request_id: RequestId | None) -> str:
    channel = obj.get("channel")
    if not is_valid_channel(channel):
        raise FrameError(
            "bad_request",
            "field 'channel' must be 1-200 bytes of dot-separated [A-Za-z0-9_-] segments",
            request_id,
        )
    assert isinstance(channel, str)
    return channel


def _parse_subscribe(obj: dict[str, Any], request_id: RequestId | None, _: int) -> Subscribe:
    request_id = _required_id(request_id, "subscribe")
    channel = _channel(obj, request_id)
    since = obj.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise FrameError("bad_request", "field 'since' must be a non-negative integer", request_id)
    return Subscribe(request_id, channel, since)


def _parse_unsubscribe(obj: dict[str, Any], request_id: RequestId | None, _: int) -> Unsubscribe:
    request_id = _required_id(request_id, "unsubscribe")
    return Unsubscribe(request_id, _channel(obj, request_id))


def _parse_publish(obj: dict[str, Any], request_id: RequestId | None, max_depth: int) -> Publish:
    channel = _channel(obj, request_id)
    if "data" not in obj:
        raise FrameError("bad_request", "a publish frame needs 'data'", request_id)
    data = obj["data"]
    if nested_deeper_than(data, max_depth):
        raise FrameError(
            "bad_request", f"field 'data' nests deeper than {max_depth} levels", request_id
        )
    try:
        body = orjson.dumps(data)
    except (orjson.JSONEncodeError, TypeError):  # cannot happen after the depth check
        raise FrameError("bad_request", "field 'data' cannot be serialized", request_id) from None
    return Publish(request_id, channel, body)


def nested_deeper_than(value: Any, limit: int) -> bool:
    """True when arrays/objects in ``value`` nest more than ``limit`` levels
    (a scalar: 0, ``[]``: 1, ``[{}]``: 2). Iterative: no recursion limit to hit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _parse_ping(obj: dict[str, Any], request_id: RequestId | None, _: int) -> Ping:
    return Ping(_required_id(request_id, "ping"))


def _parse_auth(obj: dict[str, Any], request_id: RequestId | None, _: int) -> Auth:
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise FrameError("bad_request", "field 'token' must be a non-empty string", request_id)
    return Auth(token, request_id)


_PARSERS: dict[str, Callable[[dict[str, Any], RequestId | None, int], ClientFrame]] = {
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "publish": _parse_publish,
    "ping": _parse_ping,
    "auth": _parse_auth,
}


# --- frames from the server -------------------------------------------------


def welcome_frame(session: str, user: str, heartbeat: float) -> bytes:
    return orjson.dumps(
        {"type": "welcome", "session": session, "user": user, "heartbeat": heartbeat}
    )


def ack_frame(request_id: RequestId | None, **extra: Any) -> bytes:
    return orjson.dumps({"type": "ack", "id": request_id, **extra})


def error_frame(
    code: str,
    message: str,
    request_id: RequestId | None = None,
    *,
    retry_after: float | None = None,
    channel: str | None = None,
) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    if retry_after is not None:
        frame["retry_after"] = retry_after
    if channel is not None:
        frame["channel"] = channel
    return orjson.dumps(frame)


def pong_frame(request_id: RequestId) -> bytes:
    return orjson.dumps({"type": "pong", "id": request_id})


def message_frame(channel: str, seq: int, data: Any, sender: str | None, ts: int) -> bytes:
    """One ``message`` frame, serialized once and shared by every subscriber.

    Raises ValueError when it cannot be serialized (a backend's body nested
    past orjson's limit): the caller skips and counts that message.
    """
    try:
        return orjson.dumps(
            {
                "type": "message",
                "channel": channel,
                "seq": seq,
                "data": data,
                "from": sender,
                "ts": ts,
            }
        )
    except (orjson.JSONEncodeError, TypeError):
        raise ValueError("message cannot be framed (nested too deeply)") from None


def data_from_body(body: bytes) -> Any:
    """The JSON value a broker message carries, for the ``data`` field.

    Client publishes are JSON by construction; a backend may publish anything.
    A body that is not JSON but is UTF-8 text becomes a JSON string; raises
    ValueError for a body that is neither (the caller drops and counts it).
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("message body is neither JSON nor UTF-8 text") from None

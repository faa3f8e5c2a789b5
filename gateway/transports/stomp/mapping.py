"""STOMP frames <-> the gateway's requests and answers (contract section 10). No I/O.

Client frames become plain requests (``Connect``, ``Subscribe``,
``PresenceQuery``, ``Send``, ``Unsubscribe``, ``Disconnect``) or raise
``Refused`` with the contract's error code; the server's frames
(``CONNECTED``, ``MESSAGE``, ``RECEIPT``, ``ERROR``) are built here.

``SUBSCRIBE`` to ``/presence/<channel>`` is the presence request of
docs/presence.md: answered by one ``MESSAGE`` on that subscription (the JSON
protocol's answer as body), after which the subscription is over. A
subscription, not a ``SEND``, because a ``SEND`` has nowhere to be answered
(``reply-to`` queues are refused) and stompjs already correlates the answer
with the request by subscription id. What is refused, and why:

* destinations other than ``/topic/<channel>`` and
  ``/exchange/<exchange>/<channel>`` (``/queue/``, ``/amq/queue/``,
  ``/temp-queue/``, ``/reply-queue/``): the gateway has channels, not queues;
* wildcards ``*`` ``#`` and anything else that is not a channel name (section 5);
* ``ack`` modes other than ``auto``, and ``ACK``, ``NACK``, ``BEGIN``,
  ``COMMIT``, ``ABORT``: delivery is fan-out from a replayable stream, there
  is nothing to acknowledge or to roll back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import orjson

from gateway.protocol.channels import is_valid_channel
from gateway.protocol.frames import DEFAULT_MAX_DATA_DEPTH, nested_deeper_than
from gateway.transports.stomp.frames import VERSIONS, Frame, Version, serialize

# Web-STOMP's subprotocol names, highest version first.
SUBPROTOCOLS: dict[str, Version] = {"v12.stomp": "1.2", "v11.stomp": "1.1", "v10.stomp": "1.0"}
# The installed distribution's version (the package root is no layer to import from).
try:
    SERVER = f"rabbitgate/{metadata.version('rabbitgate')}"
except metadata.PackageNotFoundError:  # run from a source tree that was not installed
    SERVER = "rabbitgate"
MAX_ID_CHARS = 128  # subscription ids and receipts (stompjs uses "sub-0", "receipt-1")
JSON = "application/json"
_UNSUPPORTED_COMMANDS = frozenset({"ACK", "NACK", "BEGIN", "COMMIT", "ABORT"})
_QUEUE_PREFIXES = ("/queue/", "/amq/queue/", "/temp-queue/", "/reply-queue/")
PRESENCE_PREFIX = "/presence/"  # SUBSCRIBE here: who is subscribed to the channel


class Refused(Exception):
    """A frame the gateway refuses: ERROR with ``message:<code>``, then close."""

    def __init__(self, code: str, message: str, receipt: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.receipt = receipt


# --- negotiation --------------------------------------------------------------


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """The highest STOMP version the client offers, or None if it offers none."""
    for name in SUBPROTOCOLS:
        if name in offered:
            return name
    return None


def negotiate_version(accept_version: str | None, highest: Version) -> Version:
    """The highest version both sides speak (STOMP 1.2 "Protocol Negotiation").

    No ``accept-version`` header means a STOMP 1.0 client. ``highest`` is the
    version of the subprotocol the WebSocket agreed on.
    """
    if accept_version is None:
        return "1.0"
    offered = {part.strip() for part in accept_version.split(",")}
    for version in reversed(VERSIONS):
        if version <= highest and version in offered:
            return version
    supported = ",".join(v for v in VERSIONS if v <= highest)
    raise Refused("bad_request", f"no common STOMP version; this server speaks {supported}")


def parse_heart_beat(text: str | None) -> tuple[int, int]:
    """``heart-beat:cx,cy`` as two non-negative integers of milliseconds (absent: 0,0)."""
    if text is None:
        return 0, 0
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 9 for p in parts):
        raise Refused("bad_request", "heart-beat must be two non-negative integers: cx,cy")
    return int(parts[0]), int(parts[1])


def negotiate_heartbeat(client: tuple[int, int], server: tuple[int, int]) -> tuple[int, int]:
    """(how often the server sends, how often it expects to hear), in ms; 0 = never.

    ``client`` is the CONNECT's ``cx,cy`` (cx: the client can send every cx
    ms, cy: it wants to hear every cy ms); ``server`` is ``sx,sy``, what
    CONNECTED says. Each direction is the larger of what one side can do and
    the other wants, or nothing if either says 0 (STOMP 1.2 "Heart-beating").
    """
    cx, cy = client
    sx, sy = server
    send = 0 if sx == 0 or cy == 0 else max(sx, cy)
    receive = 0 if cx == 0 or sy == 0 else max(cx, sy)
    return send, receive


@dataclass(frozen=True, slots=True)
class Connect:
    version: Version
    passcode: str | None  # the JWT, when the handshake had no Authorization header
    heart_beat: tuple[int, int]


def parse_connect(frame: Frame, highest: Version) -> Connect:
    """A ``CONNECT``/``STOMP`` frame; Refused for any other command (nothing before it)."""
    if frame.command not in ("CONNECT", "STOMP"):
        raise Refused("unauthorized", "send CONNECT first", frame.header("receipt"))
    version = negotiate_version(frame.header("accept-version"), highest)
    passcode = frame.header("passcode")
    return Connect(version, passcode or None, parse_heart_beat(frame.header("heart-beat")))


# --- requests after CONNECTED -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    text: str  # as the client wrote it; MESSAGE frames repeat it
    channel: str
    exchange: str | None  # given by /exchange/<exchange>/<channel>


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: str
    destination: Destination
    since: int | None
    receipt: str | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: str
    receipt: str | None


@dataclass(frozen=True, slots=True)
class Send:
    destination: Destination
    data: bytes  # the JSON of `data`
    receipt: str | None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """``SUBSCRIBE`` to ``/presence/<channel>``: one answer, then the subscription is over."""

    id: str  # the subscription id the answer's MESSAGE names
    channel: str
    receipt: str | None

    @property
    def destination(self) -> str:
        return PRESENCE_PREFIX + self.channel


@dataclass(frozen=True, slots=True)
class Disconnect:
    receipt: str | None


Request = Subscribe | PresenceQuery | Unsubscribe | Send | Disconnect
ExchangeOf = Callable[[str], str | None]  # channel -> the exchange its policy rule names


def parse_request(
    frame: Frame, exchange_of: ExchangeOf, max_depth: int = DEFAULT_MAX_DATA_DEPTH
) -> Request:
    """One frame after CONNECTED. Raises Refused with the receipt the client asked for.

    ``max_depth``: how deep a JSON body may nest (``limits.max_data_depth``).
    """
    receipt = _optional_id(frame, "receipt", None)
    command = frame.command
    if command == "SEND":
        destination = parse_destination(frame.header("destination"), exchange_of, receipt)
        return Send(destination, _data(frame, receipt, max_depth), receipt)
    if command == "SUBSCRIBE":
        sub_id = _required_id(frame, "id", receipt)
        ack = frame.header("ack")
        if ack not in (None, "auto"):
            raise Refused("bad_request", f"ack:{ack[:32]} is not supported; use ack:auto", receipt)
        text = frame.header("destination")
        if text is not None and text.startswith(PRESENCE_PREFIX):
            return _presence_query(sub_id, text, frame, receipt)
        destination = parse_destination(text, exchange_of, receipt)
        return Subscribe(sub_id, destination, _since(frame.header("x-since"), receipt), receipt)
    if command == "UNSUBSCRIBE":
        return Unsubscribe(_required_id(frame, "id", receipt), receipt)
    if command == "DISCONNECT":
        return Disconnect(receipt)
    if command in _UNSUPPORTED_COMMANDS:
        raise Refused(
            "bad_request",
            f"{command} is not supported: subscriptions are ack:auto, without transactions",
            receipt,
        )
    raise Refused("bad_request", "already connected", receipt)  # CONNECT, STOMP


def parse_destination(
    text: str | None, exchange_of: ExchangeOf, receipt: str | None
) -> Destination:
    """``/topic/<channel>`` or ``/exchange/<exchange>/<channel>``; Refused otherwise."""
    if text is None:
        raise Refused("bad_request", "a destination header is required", receipt)
    shown = text[:80]
    if text.startswith(PRESENCE_PREFIX):
        raise Refused(
            "bad_request",
            f"{shown}: presence is asked with SUBSCRIBE to {PRESENCE_PREFIX}<channel>",
            receipt,
        )
    if text.startswith(_QUEUE_PREFIXES):
        raise Refused(
            "bad_request",
            f"destination {shown} is not supported: rabbitgate has channels, use /topic/<channel>",
            receipt,
        )
    exchange: str | None = None
    if text.startswith("/topic/"):
        channel = text[len("/topic/") :]
    elif text.startswith("/exchange/"):
        exchange, slash, channel = text[len("/exchange/") :].partition("/")
        if not slash or not exchange:
            raise Refused("bad_request", "use /exchange/<exchange>/<channel>", receipt)
    else:
        raise Refused(
            "bad_request",
            f"destination {shown} is not supported: use /topic/<channel>",
            receipt,
        )
    if not is_valid_channel(channel):
        raise Refused(
            "bad_request",
            f"{shown}: a channel is 1-200 bytes of dot-separated [A-Za-z0-9_-] segments"
            " (no wildcards)",
            receipt,
        )
    if exchange is not None and exchange_of(channel) != exchange:
        raise Refused("forbidden", f"the policies do not map {channel} to {exchange[:80]}", receipt)
    return Destination(text, channel, exchange)


def _presence_query(sub_id: str, text: str, frame: Frame, receipt: str | None) -> PresenceQuery:
    channel = text[len(PRESENCE_PREFIX) :]
    if not is_valid_channel(channel):
        raise Refused(
            "bad_request",
            f"{text[:80]}: a channel is 1-200 bytes of dot-separated [A-Za-z0-9_-] segments"
            " (no wildcards)",
            receipt,
        )
    if frame.header("x-since") is not None:
        raise Refused("bad_request", "x-since has no meaning for a presence request", receipt)
    return PresenceQuery(sub_id, channel, receipt)


def _optional_id(frame: Frame, name: str, receipt: str | None) -> str | None:
    value = frame.header(name)
    if value is not None and (not value or len(value) > MAX_ID_CHARS):
        raise Refused("bad_request", f"{name} must be 1 to {MAX_ID_CHARS} characters", receipt)
    return value


def _required_id(frame: Frame, name: str, receipt: str | None) -> str:
    value = _optional_id(frame, name, receipt)
    if value is None:
        raise Refused("bad_request", f"{frame.command} needs an {name} header", receipt)
    return value


def _since(text: str | None, receipt: str | None) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise Refused("bad_request", "x-since must be a non-negative integer", receipt)
    return int(text)


def _data(frame: Frame, receipt: str | None, max_depth: int) -> bytes:
    """The JSON of `data`: a JSON body as it is, any other body as a JSON string."""
    content_type = frame.header("content-type") or ""
    if content_type.split(";", 1)[0].strip().lower() == JSON:
        try:
            data = orjson.loads(frame.body)
        except orjson.JSONDecodeError:
            raise Refused("bad_request", "the body is not valid JSON", receipt) from None
        if nested_deeper_than(data, max_depth):
            message = f"the body nests deeper than {max_depth} levels"
            raise Refused("bad_request", message, receipt)
        # Re-encoded as the JSON protocol does: what reaches RabbitMQ (and what
        # a rule's max_bytes counts) is the same whichever protocol sent it.
        return orjson.dumps(data)
    try:
        text = frame.body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("bad_request", "the body must be UTF-8 text or JSON", receipt) from None
    return orjson.dumps(text)


# --- frames from the server ---------------------------------------------------


def connected_frame(version: Version, heart_beat: tuple[int, int], session: str) -> bytes:
    headers = [
        ("version", version),
        ("heart-beat", f"{heart_beat[0]},{heart_beat[1]}"),
        ("session", session),
        ("server", SERVER),
    ]
    return serialize("CONNECTED", headers, version=version)


def receipt_frame(
    receipt: str, version: Version, recovered: bool | None = None, seq: int | None = None
) -> bytes:
    """``RECEIPT``; a SUBSCRIBE's says ``x-seq`` (the channel's latest seq, where
    an ``x-since`` may resume from later) and, with ``x-since``, ``x-recovered``."""
    headers = [("receipt-id", receipt)]
    if seq is not None:
        headers.append(("x-seq", str(seq)))
    if recovered is not None:
        headers.append(("x-recovered", _bool(recovered)))
    return serialize("RECEIPT", headers, version=version)


def error_frame(
    code: str,
    message: str,
    version: Version,
    receipt: str | None = None,
    *,
    retry_after: float | None = None,
    destination: str | None = None,
) -> bytes:
    """``ERROR`` with ``message:<code>`` and why in the body (text/plain)."""
    headers = [("message", code), ("content-type", "text/plain")]
    if receipt is not None:
        headers.append(("receipt-id", receipt))
    if retry_after is not None:
        headers.append(("retry-after", f"{retry_after:g}"))
    if destination is not None:
        headers.append(("destination", destination))
    if code == "bad_request" and message.startswith("no common STOMP version"):
        headers.append(("version", ",".join(VERSIONS)))
    return serialize("ERROR", headers, message.encode(), version=version)


@dataclass(frozen=True, slots=True)
class MessageTail:
    """What the MESSAGE frames of one message share, whoever subscribed: built once."""

    headers: bytes  # escaped header lines after subscription/destination, content-length last
    body: bytes


def message_tail(
    channel: str, seq: int, sender: str | None, ts: int, data: bytes, version: Version
) -> MessageTail:
    headers = [
        ("message-id", f"{channel}@{seq}"),
        ("content-type", JSON),
        ("x-seq", str(seq)),
    ]
    if sender is not None:
        headers.append(("x-from", sender))
    headers.append(("x-ts", str(ts)))
    headers.append(("content-length", str(len(data))))
    # serialize() gives "COMMAND\n<lines>\n\n<body>\0": keep only the lines.
    frame = serialize("X", headers, version=version, content_length=False)
    return MessageTail(frame[2:-3] + b"\n", data)


def message_frame(
    subscription: str,
    destination: str,
    tail: MessageTail,
    version: Version,
    recovered: bool | None = None,
) -> bytes:
    """One subscriber's MESSAGE: its subscription and destination, then the shared part."""
    head = [("subscription", subscription), ("destination", destination)]
    if recovered is not None:
        head.append(("x-recovered", _bool(recovered)))
    lines = serialize("MESSAGE", head, version=version, content_length=False)[:-2]
    return b"".join((lines, tail.headers, b"\n", tail.body, b"\0"))


def presence_event_frame(
    subscription: str, destination: str, kind: str, body: bytes, message_id: str, version: Version
) -> bytes:
    """A presence event (join, leave, presence_changed; docs/presence.md) on one
    subscription, or the answer to a presence request (``kind`` "presence"): a
    MESSAGE with ``x-event`` and the gateway's JSON frame as body."""
    headers = [
        ("subscription", subscription),
        ("destination", destination),
        ("message-id", message_id),
        ("content-type", JSON),
        ("x-event", kind),
    ]
    return serialize("MESSAGE", headers, body, version=version)


def presence_answer_body(answer: dict[str, object]) -> bytes:
    """The JSON protocol's presence answer without its ``id``: on STOMP the
    ``subscription`` header is what ties the answer to its request."""
    return orjson.dumps({key: value for key, value in answer.items() if key != "id"})


def _bool(value: bool) -> str:
    return "true" if value else "false"

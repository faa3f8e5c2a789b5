"""The wire form of the control messages between gateway processes, apart from I/O.

A message is ``v1.<signature>.<JSON object>``: the signature is the
HMAC-SHA256 (hex) of the JSON bytes under ``control.key``, or empty when no
key is configured. Every message carries ``ts`` (epoch seconds) and is refused
when it is more than ``MAX_SKEW_SECONDS`` away from now, so a captured kick
cannot be replayed later.

``open_message`` never raises: what it cannot trust is an ``Ignored`` with
one of ``gateway.telemetry.metrics.CONTROL_IGNORED`` as its reason, which the
caller counts. With a key, an unsigned message is ignored; without one, a
signature cannot be checked and whoever can publish on the Redis server is
trusted (docs/console.md says who that is).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import orjson

PREFIX = b"v1."
MAX_SKEW_SECONDS = 30.0
# A list answer holds every connection of a process (10,000 rows are ~3 MB).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str  # malformed, unsigned, bad_signature, stale


def _signature(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def seal(key: bytes | None, message: dict[str, Any], now: float | None = None) -> bytes:
    """``message`` (a JSON object) with its timestamp, signed when there is a key."""
    body = orjson.dumps({**message, "ts": time.time() if now is None else now})
    return PREFIX + (_signature(key, body) if key else b"") + b"." + body


def open_message(
    key: bytes | None,
    raw: object,
    now: float | None = None,
    max_skew: float | None = MAX_SKEW_SECONDS,
) -> dict[str, Any] | Ignored:
    """The JSON object of a message from another process, or why it is ignored.

    ``max_skew`` None: its age does not matter (a stored ban, read again and
    again while it lasts).
    """
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes) or len(raw) > MAX_MESSAGE_BYTES or not raw.startswith(PREFIX):
        return Ignored("malformed")
    signature, dot, body = raw[len(PREFIX) :].partition(b".")
    if not dot:
        return Ignored("malformed")
    if key is not None:
        if not signature:
            return Ignored("unsigned")
        if not hmac.compare_digest(signature, _signature(key, body)):
            return Ignored("bad_signature")
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Ignored("malformed")
    if not isinstance(message, dict):
        return Ignored("malformed")
    ts = message.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return Ignored("malformed")
    if max_skew is not None and abs((time.time() if now is None else now) - ts) > max_skew:
        return Ignored("stale")
    return message

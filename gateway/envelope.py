"""What a message looks like on RabbitMQ, both ways. No I/O.

A client's publish becomes an AMQP message whose properties name the verified
publisher (section 5 of the wire contract); nothing the client sends reaches
them. Coming back, ``sender_of`` decides the ``from`` of a message frame.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

SUB_HEADER = "x-rabbitgate-sub"
SESSION_HEADER = "x-rabbitgate-session"
TS_HEADER = "x-rabbitgate-ts"
CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """The AMQP properties of a client publish, built by the gateway only."""

    body: bytes
    message_id: str
    timestamp_ms: int
    headers: dict[str, Any]
    # The broker user of this gateway. RabbitMQ refuses a message whose
    # user_id differs from the connection's user, so a backend publishing
    # with other credentials cannot pass itself off as a verified client.
    user_id: str | None


def client_message(
    body: bytes, sub: str, session: str, broker_user: str | None, now_ms: int | None = None
) -> OutgoingMessage:
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    return OutgoingMessage(
        body=body,
        message_id=uuid.uuid4().hex,
        timestamp_ms=ts,
        headers={SUB_HEADER: sub, SESSION_HEADER: session, TS_HEADER: ts},
        user_id=broker_user,
    )


def sender_of(
    headers: dict[str, Any] | None,
    user_id: str | None,
    app_id: str | None,
    broker_user: str | None,
) -> str | None:
    """The ``from`` of a message: the verified client, else the backend's app id."""
    sub = (headers or {}).get(SUB_HEADER)
    if isinstance(sub, bytes):
        sub = sub.decode("utf-8", "replace")
    if isinstance(sub, str) and user_id is not None and user_id == broker_user:
        return sub
    return app_id or None


def timestamp_ms_of(headers: dict[str, Any] | None, timestamp: Any, received_ms: int) -> int:
    """Milliseconds since the epoch: ours when we published it, else the AMQP
    timestamp (seconds), else the time it reached this gateway."""
    ts = (headers or {}).get(TS_HEADER)
    if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0:
        return ts
    if timestamp is not None:
        try:
            return int(timestamp.timestamp() * 1000)
        except (AttributeError, OverflowError, ValueError, OSError):
            pass
    return received_ms

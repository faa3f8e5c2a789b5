"""What a message looks like on RabbitMQ, both ways. No I/O.

A client's publish becomes an AMQP message whose properties name the verified
publisher (section 5 of the wire contract); nothing the client sends reaches
them. Coming back, ``sender_of`` decides the ``from`` of a message frame.
"""

from __future__ import annotations

import time
from random import getrandbits
from typing import Any

from gateway.broker import amqpwire

SUB_HEADER = "x-rabbitgate-sub"
SESSION_HEADER = "x-rabbitgate-session"
TS_HEADER = "x-rabbitgate-ts"
CONTENT_TYPE = "application/json"
_CONTENT_TYPE = amqpwire.short_string(CONTENT_TYPE)


class ClientStamp:
    """The AMQP properties of one connection's publishes, built by the gateway only.

    Who published (the verified ``sub``, the session) is encoded once per
    connection; ``properties`` adds what changes per message (a message id
    and the time). ``broker_user`` is this gateway's broker user: RabbitMQ
    refuses a message whose user_id differs from the connection's user, so a
    backend publishing with other credentials cannot pass itself off as a
    verified client.
    """

    __slots__ = ("_table", "_user_id")

    def __init__(self, sub: str, session: str, broker_user: str | None) -> None:
        self._table = amqpwire.fixed_headers({SUB_HEADER: sub, SESSION_HEADER: session})
        self._user_id = amqpwire.short_string(broker_user) if broker_user else None

    def properties(self, now_ms: int | None = None) -> bytes:
        """Encoded properties of a persistent message published now."""
        ts = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return amqpwire.properties(
            content_type=_CONTENT_TYPE,
            table=self._table + amqpwire.int_header(TS_HEADER, ts),
            # Unique, not secret: no system call per message (uuid4 reads urandom).
            message_id=b"\x20" + b"%032x" % getrandbits(128),
            timestamp_s=ts // 1000,
            user_id=self._user_id,
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

"""Traffic events: what a connection did, as plain values, for whoever listens.

The gateway emits one event per client action or security decision (never per
fan-out delivery, which would cost more than the delivery itself). Metrics,
the audit log and the anomaly detector are sinks: callables that must return
quickly and never raise into the caller (``EventBus.emit`` guards them).
Events carry no token and no message body, only sizes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("rabbitgate.events")

# The transports a connection can come by (a connect event's detail, the
# metrics' transport label); a WebSocket connect carries no detail.
TransportKind = Literal["websocket", "sse", "stomp"]
TRANSPORT_KINDS: tuple[TransportKind, ...] = ("websocket", "sse", "stomp")

EventKind = Literal[
    "connect",  # a handshake reached the gateway (before any token work)
    "auth_ok",  # a token was accepted (header, auth frame or refresh)
    "auth_failed",  # a token was refused; detail = reason
    "subscribe",  # a subscribe was allowed
    "unsubscribe",
    "publish",  # a publish was allowed and sent to RabbitMQ; size = body bytes
    "denied",  # the policies refused; detail = "subscribe"/"publish", rule = rule label
    "rate_limited",  # a limit refused a request; detail = which limit
    "malformed",  # a frame was refused as bad_request / too_large
    "closed",  # the connection ended; detail = close code
    "banned",  # abuse protection closed or refused this subject
]


@dataclass(frozen=True, slots=True)
class TrafficEvent:
    kind: EventKind
    address: str | None
    user: str | None = None
    session: str | None = None
    channel: str | None = None
    size: int = 0
    detail: str | None = None
    rule: str | None = None
    at: float = field(default_factory=time.time)


Sink = Callable[[TrafficEvent], None]


class EventBus:
    def __init__(self) -> None:
        self._sinks: list[Sink] = []

    def subscribe(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def emit(self, event: TrafficEvent) -> None:
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not break a connection
                log.exception("event sink %r failed", sink)

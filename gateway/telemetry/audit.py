"""The audit stream: every security decision, one record each, on ``rabbitgate.audit``.

A sink on the traffic event bus. It writes refused tokens, policy denials,
rate-limit refusals and bans; the policy reloader writes its reloads to the
same logger. Records carry the event's fields (``event``, ``user``,
``address``, ``session``, ``channel``, ``rule``, ``detail``) as ``extra``, so
the JSON formatter (``gateway.telemetry.logs``) puts each in its own key. Events carry no
token and no message body, so neither can reach this stream.
"""

from __future__ import annotations

import logging

from gateway.telemetry.events import TrafficEvent
from gateway.telemetry.logs import AUDIT_LOGGER

AUDITED = frozenset({"auth_failed", "denied", "rate_limited", "banned"})

log = logging.getLogger(AUDIT_LOGGER)


def audit_sink(event: TrafficEvent) -> None:
    """Write ``event`` to the audit stream when it is a security decision."""
    if event.kind not in AUDITED:
        return
    fields = {
        "event": event.kind,
        "user": event.user,
        "address": event.address,
        "session": event.session,
        "channel": event.channel,
        "rule": event.rule,
        "detail": event.detail,
    }
    extra = {key: value for key, value in fields.items() if value is not None}
    log.info("%s", _summary(event), extra=extra)


def _summary(event: TrafficEvent) -> str:
    who = event.user or "anonymous"
    where = f" from {event.address}" if event.address else ""
    match event.kind:
        case "auth_failed":
            return f"token refused ({event.detail}){where}"
        case "denied":
            return f"{who} denied {event.detail} on {event.channel} (rule {event.rule}){where}"
        case "rate_limited":
            return f"{who} rate limited ({event.detail}) on {event.channel}{where}"
        case _:
            return f"{who} banned ({event.detail}){where}"

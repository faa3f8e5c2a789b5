"""What an operator may see and do to live connections, apart from any I/O.

One service, three front ends: the JSON endpoints (connections_admin.py), the
CLI that calls them (connections_cli.py) and the browser console
(console.py). Each validates nothing itself: a request the service refuses
raises ConnectionsRequestError with one line for the operator, and each
front end turns it into its own error (HTTP 400 JSON, a form message).

The methods are async because the fleet-wide implementation asks every
gateway process; LocalConnections covers the process it runs in, and says so
in the ``processes`` it returns.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.protocol.codes import CLOSE_BANNED, CLOSE_POLICY
from gateway.telemetry.events import TrafficEvent
from gateway.telemetry.logs import AUDIT_LOGGER

if TYPE_CHECKING:
    from gateway.core.gate import Gate
    from gateway.core.node import Node

audit = logging.getLogger(AUDIT_LOGGER)

MAX_BAN_SECONDS = 30 * 86400
MAX_REASON_BYTES = 100  # a WebSocket close reason is at most 123 bytes
MAX_TEXT = 1000
KINDS = ("user", "address")


class ConnectionsRequestError(ValueError):
    """A request the service refuses; ``str()`` is one line for the operator."""


@dataclass(frozen=True)
class ConnectionFilter:
    """Every field that is set must match (exact, case-sensitive)."""

    user: str | None = None
    address: str | None = None
    channel: str | None = None


class Connections(Protocol):
    """The seam the front ends use.

    ``list`` answers ``{"processes": [{"process": "host/pid", ...}],
    "connections": [row, ...], "bans": [{"kind", "key", "until"}]}``, a row
    being ``session, user, address, transport, since, channels,
    send_buffer_bytes, send_buffer_frames, send_buffer_fill, messages_in,
    messages_out`` (plus ``process``), and ``"channels": [{"channel",
    "subscribers", "messages_per_second"}]``. A process entry with
    ``"answered": false`` is one known to be alive that did not answer: its
    connections are not listed and the actions did not reach it. The
    actions answer what they did (``closed``, ``until``, ``lifted``) and
    record it on the audit stream under ``operator``, a name the caller
    authenticated (never one a request gave).
    """

    async def list(self, where: ConnectionFilter) -> dict[str, Any]: ...

    async def kick(
        self, operator: str, *, session: str | None, user: str | None, reason: str
    ) -> dict[str, Any]: ...

    async def ban(
        self, operator: str, kind: object, key: object, seconds: object, reason: object
    ) -> dict[str, Any]: ...

    async def unban(
        self, operator: str, kind: object, key: object, reason: object
    ) -> dict[str, Any]: ...


def close_reason(prefix: str, reason: str) -> str:
    """The reason the client sees, cut to fit a close frame (whole characters)."""
    text = f"{prefix}: {reason}" if reason else prefix
    raw = text.encode()[:MAX_REASON_BYTES]
    return raw.decode(errors="ignore")


def checked_subject(kind: object, key: object) -> tuple[str, str]:
    if kind not in KINDS:
        raise ConnectionsRequestError("kind: user or address")
    if not isinstance(key, str) or not key or len(key) > 256:
        raise ConnectionsRequestError("key: the user or address, 1-256 characters")
    return str(kind), key


def checked_text(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ConnectionsRequestError(f"{name}: text of at most {MAX_TEXT} characters")
    return value


def checked_seconds(seconds: object) -> float:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 1 <= seconds <= MAX_BAN_SECONDS
    ):
        raise ConnectionsRequestError(f"seconds: a number from 1 to {MAX_BAN_SECONDS}")
    return float(seconds)


def process_name() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class LocalConnections:
    """The connections of this process (node.sessions) and its operator bans."""

    def __init__(self, node: Node, gate: Gate) -> None:
        self.node = node
        self.gate = gate
        self.messages_in: dict[str, int] = {}
        node.events.subscribe(self._count)

    def _count(self, event: TrafficEvent) -> None:
        if event.kind == "publish" and event.session is not None:
            self.messages_in[event.session] = self.messages_in.get(event.session, 0) + 1

    async def list(self, where: ConnectionFilter) -> dict[str, Any]:
        limit = self.node.settings.limits.send_buffer_bytes
        live = {s.id for s in self.node.sessions}
        for gone in [k for k in self.messages_in if k not in live]:
            del self.messages_in[gone]
        process = process_name()
        rows = []
        for s in sorted(self.node.sessions, key=lambda s: self.node.sessions.since.get(s.id, 0)):
            if where.user is not None and s.principal.sub != where.user:
                continue
            if where.address is not None and s.address != where.address:
                continue
            if where.channel is not None and where.channel not in s.subscriptions:
                continue
            pending, frames = s.outbox.pending()
            rows.append(
                {
                    "process": process,
                    "session": s.id,
                    "user": s.principal.sub,
                    "address": s.address,
                    "transport": s.kind,
                    "since": self.node.sessions.since.get(s.id),
                    "channels": sorted(s.subscriptions),
                    "send_buffer_bytes": pending,
                    "send_buffer_frames": frames,
                    "send_buffer_fill": round(pending / limit, 4) if limit else None,
                    "messages_in": self.messages_in.get(s.id, 0),
                    # Frames written to the connection, counted by each transport's
                    # send path (transports/outbox.py, sse.py, stomp/endpoint.py);
                    # None (a dash) for a transport that does not count them.
                    "messages_out": getattr(s.outbox, "messages_out", None),
                }
            )
        bans = [
            {"kind": k, "key": v, "until": until}
            for k, v, until in self.node.restrictions.operator_bans()
        ]
        return {
            "process": process,  # kept for the clients of the first version
            "processes": [{"process": process, "connections": len(self.node.sessions)}],
            "connections": rows,
            "channels": channel_loads(rows, self.node.channel_rates.rates(), where),
            "bans": bans,
        }

    async def kick(
        self, operator: str, *, session: str | None, user: str | None, reason: str
    ) -> dict[str, Any]:
        reason = checked_kick(session, user, reason)
        shown = close_reason("disconnected by an operator", reason)
        closed = self.close_sessions(session, user, shown)
        target = f"session {session}" if session is not None else f"user {user}"
        record(operator, "kick", target, reason, closed=closed)
        return {"closed": closed, "code": CLOSE_POLICY, "reason": shown}

    async def ban(
        self, operator: str, kind: object, key: object, seconds: object, reason: object
    ) -> dict[str, Any]:
        kind, key = checked_subject(kind, key)
        length = checked_seconds(seconds)
        reason = checked_text(reason, "reason")
        until = time.time() + length
        closed = self.apply_ban(kind, key, until, close_reason("banned by an operator", reason))
        record(operator, "ban", f"{kind} {key}", reason, closed=closed, seconds=length)
        return {"until": until, "closed": closed, "code": CLOSE_BANNED}

    async def unban(
        self, operator: str, kind: object, key: object, reason: object
    ) -> dict[str, Any]:
        kind, key = checked_subject(kind, key)
        reason = checked_text(reason, "reason")
        lifted = self.apply_unban(kind, key)
        record(operator, "unban", f"{kind} {key}", reason)
        return {"lifted": lifted}

    # What an action does here, without the audit record: the fleet-wide
    # service (fleet_connections.py) runs these on each process for one record.

    def close_sessions(self, session: str | None, user: str | None, shown: str) -> int:
        chosen = [
            s
            for s in list(self.node.sessions)
            if (session is not None and s.id == session)
            or (user is not None and s.principal.sub == user)
        ]
        for s in chosen:
            s.close(CLOSE_POLICY, shown)
        return len(chosen)

    def apply_ban(self, kind: str, key: str, until: float, shown: str) -> int:
        self.node.restrictions.operator_ban(kind, key, until)
        closed = 0
        for s in list(self.gate.banned_subscribers(kind, key)):
            s.close(CLOSE_BANNED, shown)
            closed += 1
        return closed

    def apply_unban(self, kind: str, key: str) -> bool:
        return self.node.restrictions.operator_unban(kind, key)


def checked_kick(session: object, user: object, reason: object) -> str:
    """The reason of a valid kick (one of session or user, as text)."""
    reason = checked_text(reason, "reason")
    if (session is None) == (user is None):
        raise ConnectionsRequestError("name either a session or a user")
    checked_text(session if session is not None else user, "session" if user is None else "user")
    return reason


def channel_loads(
    rows: list[dict[str, Any]], rates: Mapping[str, float], where: ConnectionFilter
) -> list[dict[str, Any]]:
    """Subscribers (among the listed connections) and message rate per channel.

    A filter narrows the subscribers to the connections it lists, and a
    channel filter to that channel; the rate is the channel's own (messages
    per second fanned out here over the last seconds), whoever is listed.
    """
    subscribers: dict[str, int] = {}
    for row in rows:
        for channel in row["channels"]:
            if where.channel is None or channel == where.channel:
                subscribers[channel] = subscribers.get(channel, 0) + 1
    return [
        {
            "channel": channel,
            "subscribers": n,
            "messages_per_second": round(rates.get(channel, 0.0), 3),
        }
        for channel, n in sorted(subscribers.items(), key=lambda item: (-item[1], item[0]))
    ]


def record(operator: str, action: str, target: str, reason: str, **more: object) -> None:
    """One audit record of an operator's action, under the operator's name."""
    extra: Mapping[str, object] = {
        "event": f"operator_{action}",
        "operator": operator,
        "target": target,
        **more,
        **({"reason": reason} if reason else {}),
    }
    audit.info("operator %s: %s %s", operator, action, target, extra=dict(extra))

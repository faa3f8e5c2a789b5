"""The operator's JSON endpoints on the admin listener: list, kick, ban (``/connections``).

``rabbitgate connections list|kick|ban|unban`` talks to them. They cover the
gateway process whose admin listener answers: with ``--workers N`` each
worker has its own connections and the supervisor's admin port does not serve
these endpoints.

Authentication: ``Authorization: Bearer <token>`` where the token's SHA-256 is
a line ``NAME sha256:<hex>`` of ``operators_file`` (written by ``rabbitgate
connections add-operator``). The matching line's NAME is the operator each
action is recorded under in the audit stream: the name comes from the file,
never from the request. No file configured: the endpoints are not served at
all, so nothing on the admin listener acts unauthenticated. A token is a
random 256-bit value, so a plain hash (not a slow password hash) is enough to
keep the file from being a list of usable secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.protocol.codes import CLOSE_BANNED, CLOSE_POLICY
from gateway.telemetry.events import TrafficEvent
from gateway.telemetry.logs import AUDIT_LOGGER

if TYPE_CHECKING:
    from gateway.core.gate import Gate
    from gateway.core.node import Node

audit = logging.getLogger(AUDIT_LOGGER)

MAX_BAN_SECONDS = 30 * 86400
MAX_REASON_BYTES = 100  # a WebSocket close reason is at most 123 bytes
KINDS = ("user", "address")


class OperatorFileError(Exception):
    pass


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def read_operators(path: Path) -> dict[str, str]:
    """``NAME sha256:HEX`` lines -> {hash: NAME}; raises OperatorFileError naming the line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise OperatorFileError(f"operators_file {path}: {exc.strerror or exc}") from None
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 71:
            raise OperatorFileError(f"operators_file {path}:{number}: expected NAME sha256:HEX")
        found[parts[1]] = parts[0]
    return found


def add_operator(path: Path, name: str) -> str:
    """Append a new operator with a fresh token; returns the token (shown once)."""
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise OperatorFileError("operator name: 1-64 letters, digits, - and _")
    token = secrets.token_urlsafe(32)
    with path.open("a") as out:
        out.write(f"{name} {hash_token(token)}\n")
    path.chmod(0o600)
    return token


def operator_of(header: str | None, operators: Mapping[str, str]) -> str | None:
    """The operator a ``Bearer`` header names, or None."""
    if not header or not header.startswith("Bearer "):
        return None
    digest = hash_token(header[len("Bearer ") :].strip())
    for stored, name in operators.items():
        if hmac.compare_digest(stored, digest):
            return name
    return None


def close_reason(prefix: str, reason: str) -> str:
    """The reason the client sees, cut to fit a close frame (whole characters)."""
    text = f"{prefix}: {reason}" if reason else prefix
    raw = text.encode()[:MAX_REASON_BYTES]
    return raw.decode(errors="ignore")


class ConnectionsAdmin:
    def __init__(self, node: Node, gate: Gate, operators_file: Path) -> None:
        self.node = node
        self.gate = gate
        self.operators_file = operators_file
        self.operators = read_operators(operators_file)  # at start: a bad file stops it
        self.messages_in: dict[str, int] = {}
        node.events.subscribe(self._count)

    def install(self, app: web.Application) -> None:
        app.router.add_get("/connections", self.list)
        app.router.add_post("/connections/kick", self.kick)
        app.router.add_post("/connections/ban", self.ban)
        app.router.add_post("/connections/unban", self.unban)

    def _count(self, event: TrafficEvent) -> None:
        if event.kind == "publish" and event.session is not None:
            self.messages_in[event.session] = self.messages_in.get(event.session, 0) + 1

    def _operator(self, request: web.Request) -> str:
        try:
            # Read again at each request: adding an operator needs no restart.
            self.operators = read_operators(self.operators_file)
        except OperatorFileError:
            pass  # keep the last good file
        name = operator_of(request.headers.get("Authorization"), self.operators)
        if name is None:
            raise web.HTTPUnauthorized(
                text='{"error": "unauthorized"}\n',
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="rabbitgate-operators"'},
            )
        return name

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    async def list(self, request: web.Request) -> web.Response:
        self._operator(request)
        user = request.query.get("user")
        address = request.query.get("address")
        channel = request.query.get("channel")
        limit = self.node.settings.limits.send_buffer_bytes
        live = {s.id for s in self.node.sessions}
        for gone in [k for k in self.messages_in if k not in live]:
            del self.messages_in[gone]
        rows = []
        for s in sorted(self.node.sessions, key=lambda s: self.node.sessions.since.get(s.id, 0)):
            if user is not None and s.principal.sub != user:
                continue
            if address is not None and s.address != address:
                continue
            if channel is not None and channel not in s.subscriptions:
                continue
            pending, frames = s.outbox.pending()
            rows.append(
                {
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
                }
            )
        bans = [
            {"kind": k, "key": v, "until": until}
            for k, v, until in self.node.restrictions.operator_bans()
        ]
        return web.json_response({"process": _process(), "connections": rows, "bans": bans})

    async def kick(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        body = await self._body(request)
        reason = _text(body.get("reason", ""), "reason")
        session, user = body.get("session"), body.get("user")
        if (session is None) == (user is None):
            raise _bad("name either a session or a user")
        chosen = [
            s
            for s in list(self.node.sessions)
            if (session is not None and s.id == session)
            or (user is not None and s.principal.sub == user)
        ]
        shown = close_reason("disconnected by an operator", reason)
        for s in chosen:
            s.close(CLOSE_POLICY, shown)
        target = f"session {session}" if session is not None else f"user {user}"
        _audit(operator, "kick", target, reason, closed=len(chosen))
        return web.json_response({"closed": len(chosen), "code": CLOSE_POLICY, "reason": shown})

    async def ban(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        body = await self._body(request)
        kind, key = _subject(body)
        seconds = body.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 1 <= seconds <= MAX_BAN_SECONDS
        ):
            raise _bad(f"seconds: a number from 1 to {MAX_BAN_SECONDS}")
        reason = _text(body.get("reason", ""), "reason")
        until = time.time() + float(seconds)
        self.node.restrictions.operator_ban(kind, key, until)
        shown = close_reason("banned by an operator", reason)
        closed = 0
        for s in list(self.gate.banned_subscribers(kind, key)):
            s.close(CLOSE_BANNED, shown)
            closed += 1
        _audit(operator, "ban", f"{kind} {key}", reason, closed=closed, seconds=float(seconds))
        return web.json_response({"until": until, "closed": closed, "code": CLOSE_BANNED})

    async def unban(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        body = await self._body(request)
        kind, key = _subject(body)
        lifted = self.node.restrictions.operator_unban(kind, key)
        _audit(operator, "unban", f"{kind} {key}", _text(body.get("reason", ""), "reason"))
        return web.json_response({"lifted": lifted})


def _subject(body: Mapping[str, Any]) -> tuple[str, str]:
    kind, key = body.get("kind"), body.get("key")
    if kind not in KINDS:
        raise _bad("kind: user or address")
    if not isinstance(key, str) or not key or len(key) > 256:
        raise _bad("key: the user or address, 1-256 characters")
    return kind, key


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) > 1000:
        raise _bad(f"{name}: text of at most 1000 characters")
    return value


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=web.json_response({"error": message}).text, content_type="application/json"
    )


def _audit(operator: str, action: str, target: str, reason: str, **more: object) -> None:
    extra = {"event": f"operator_{action}", "operator": operator, "target": target, **more}
    if reason:
        extra["reason"] = reason
    audit.info("operator %s: %s %s", operator, action, target, extra=extra)


def _process() -> str:
    import os
    import socket

    return f"{socket.gethostname()}/{os.getpid()}"

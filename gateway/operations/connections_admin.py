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
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.operations.connections import (
    ConnectionFilter,
    Connections,
    ConnectionsRequestError,
    close_reason,
)

__all__ = ["ConnectionsAdmin", "OperatorFileError", "add_operator", "close_reason"]


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


class ConnectionsAdmin:
    """The JSON endpoints over a Connections service (connections.py)."""

    def __init__(self, service: Connections, operators_file: Path) -> None:
        self.service = service
        self.operators_file = operators_file
        self.operators = read_operators(operators_file)  # at start: a bad file stops it

    def install(self, app: web.Application) -> None:
        app.router.add_get("/connections", self.list)
        app.router.add_post("/connections/kick", self.kick)
        app.router.add_post("/connections/ban", self.ban)
        app.router.add_post("/connections/unban", self.unban)

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
        where = ConnectionFilter(
            user=request.query.get("user"),
            address=request.query.get("address"),
            channel=request.query.get("channel"),
        )
        return web.json_response(await self.service.list(where))

    async def kick(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        body = await self._body(request)
        session, user = body.get("session"), body.get("user")
        if (session is not None and not isinstance(session, str)) or (
            user is not None and not isinstance(user, str)
        ):
            raise _bad("session and user are strings")
        try:
            done = await self.service.kick(
                operator, session=session, user=user, reason=body.get("reason", "")
            )
        except ConnectionsRequestError as exc:
            raise _bad(str(exc)) from None
        return web.json_response(done)

    async def ban(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        body = await self._body(request)
        try:
            done = await self.service.ban(
                operator,
                body.get("kind"),
                body.get("key"),
                body.get("seconds"),
                body.get("reason", ""),
            )
        except ConnectionsRequestError as exc:
            raise _bad(str(exc)) from None
        return web.json_response(done)

    async def unban(self, request: web.Request) -> web.Response:
        operator = self._operator(request)
        body = await self._body(request)
        try:
            done = await self.service.unban(
                operator, body.get("kind"), body.get("key"), body.get("reason", "")
            )
        except ConnectionsRequestError as exc:
            raise _bad(str(exc)) from None
        return web.json_response(done)


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=web.json_response({"error": message}).text, content_type="application/json"
    )

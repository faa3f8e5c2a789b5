"""The live console for operators, on the admin listener under ``/console/``.

Behind the staff login (staff_login.py): the ``console-view`` role sees the
connections, channels and bans; ``console-act`` also disconnects sessions,
bans and unbans. Every action is a POST with the session's CSRF token,
answered by a redirect to the list with a fixed message
(POST-redirect-GET); a refused request is the page again with one line
saying why (HTTP 400). The audit record is the service's, under the name
the operator logged in with.

It calls the ``Connections`` service (connections.py) and nothing else: the
processes the service covers are the processes the console covers, and the
page says which at the top. Rendering is console_view.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.operations.connections import Connections, ConnectionsRequestError
from gateway.operations.console_view import PREFIX, Search, View, message_text, render
from gateway.operations.durations import parse_duration
from gateway.operations.staff import CONSOLE_ACT, CONSOLE_VIEW
from gateway.operations.staff_login import Area, StaffLogin, StaffSession
from gateway.operations.staff_page import page

AREA = Area(PREFIX, "Console", CONSOLE_VIEW)


class ConsolePages:
    """The console's routes over a Connections service and the staff login."""

    def __init__(self, service: Connections, login: StaffLogin) -> None:
        self.service = service
        self.login = login

    def install(self, app: web.Application) -> None:
        """Add the routes (before the app starts: its router is frozen then)."""
        self.login.install(app, AREA)
        r = app.router
        r.add_get(f"{PREFIX}/", self.index)
        r.add_get(PREFIX, self._to_index)
        r.add_post(f"{PREFIX}/kick", self.kick)
        r.add_post(f"{PREFIX}/ban", self.ban)
        r.add_post(f"{PREFIX}/unban", self.unban)

    async def _to_index(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(f"{PREFIX}/")

    async def index(self, request: web.Request) -> web.Response:
        session = self.login.require(request, AREA)
        return await self._render(
            session, Search.from_query(request.query), message=message_text(request.query)
        )

    async def _render(
        self,
        session: StaffSession,
        search: Search,
        *,
        message: str | None = None,
        error: str | None = None,
    ) -> web.Response:
        answer = await self.service.list(search.filter())
        view = View(
            answer=answer,
            search=search,
            header=self.login.header(AREA, session, "operator"),
            csrf=session.csrf,
            may_act=session.may(CONSOLE_ACT),
            message=message,
            error=error,
        )
        return page("Console — rabbitgate", render(view), status=400 if error else 200)

    async def _acting(self, request: web.Request) -> tuple[StaffSession, dict[str, str]]:
        """The session and form of an action: 403 without the act role, without
        the session's CSRF token, or from another origin."""
        session = self.login.require(request, AREA, CONSOLE_ACT)
        return session, await self.login.checked_form(request, session)

    async def _refused(self, session: StaffSession, problem: str) -> web.Response:
        return await self._render(session, Search(), error=problem)

    async def kick(self, request: web.Request) -> web.Response:
        session, form = await self._acting(request)
        try:
            done = await self.service.kick(
                session.name,
                session=form.get("session") or None,
                user=form.get("user") or None,
                reason=form.get("reason", "").strip(),
            )
        except ConnectionsRequestError as exc:
            return await self._refused(session, str(exc))
        raise _done("kicked", done.get("closed"), _partial(done))

    async def ban(self, request: web.Request) -> web.Response:
        session, form = await self._acting(request)
        try:
            seconds = parse_duration(form.get("duration", ""))
        except ValueError as exc:
            return await self._refused(session, str(exc))
        try:
            done = await self.service.ban(
                session.name,
                form.get("kind"),
                form.get("key", "").strip(),
                seconds,
                form.get("reason", "").strip(),
            )
        except ConnectionsRequestError as exc:
            return await self._refused(session, str(exc))
        raise _done("banned", done.get("closed"), _partial(done))

    async def unban(self, request: web.Request) -> web.Response:
        session, form = await self._acting(request)
        try:
            done = await self.service.unban(
                session.name,
                form.get("kind"),
                form.get("key", "").strip(),
                form.get("reason", "").strip(),
            )
        except ConnectionsRequestError as exc:
            return await self._refused(session, str(exc))
        code = "unbanned" if done.get("lifted") else "nothing-to-unban"
        raise _done(code, None, _partial(done))


def _partial(done: Mapping[str, Any]) -> bool:
    """Whether a fleet-wide action did not reach some process (it did not answer)."""
    processes = done.get("processes")
    return isinstance(processes, list) and any(
        isinstance(p, dict) and p.get("answered") is False for p in processes
    )


def _done(code: str, count: Any, partial: bool = False) -> web.HTTPSeeOther:
    query = {"msg": code}
    if isinstance(count, int) and not isinstance(count, bool):
        query["n"] = str(count)
    if partial:
        query["partial"] = "1"
    return web.HTTPSeeOther(f"{PREFIX}/?{urlencode(query)}")

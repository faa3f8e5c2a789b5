"""One login for the admin listener's pages: sessions, roles, CSRF, throttling.

The alert review page (``/alerts/``, anomaly/review.py) and the live console
(``/console/``, console.py) are *areas* of one ``StaffLogin``: a person logs in
once, at either page, and may then open every area their roles in the staff
file (staff.py) grant. Each area has its own login form at ``PREFIX/login``;
they all check the same file and start the same session.

Defenses, because the pages show data attackers chose and act on live users:

* the session is a random 256-bit token in an HttpOnly, SameSite=Strict cookie
  scoped to the areas' paths (Secure on HTTPS), held server-side, expiring
  after ``staff.session_seconds``; logout ends it;
* the roles are read from the staff file at each request: taking a role or a
  person out of the file takes effect at their next click;
* every POST carries the session's CSRF token (a login form its own,
  double-submitted with a cookie); a cross-origin ``Origin`` is refused;
* logins are throttled per client address (5 a minute, 10 at once), password
  checks run off the event loop and take as long for unknown names.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path

from aiohttp import web

from gateway.config import ConfigError, Settings, staff_login_settings
from gateway.limits.buckets import TokenBucket
from gateway.operations.staff import StaffFileError, check_login, grants, read_staff
from gateway.operations.staff_page import error_html, escape, page

log = logging.getLogger("rabbitgate.server")

SESSION_COOKIE = "rabbitgate_staff"
LOGIN_COOKIE = "rabbitgate_staff_login"
LOGIN_PER_MINUTE = 5.0
LOGIN_BURST = 10
MAX_SESSIONS = 1000
MAX_LOGIN_BUCKETS = 10_000


@dataclass(frozen=True)
class Area:
    """A set of pages behind the login: ``/alerts`` for the ``review`` role, say."""

    prefix: str
    title: str
    role: str


@dataclass
class StaffSession:
    name: str
    csrf: str
    expires: float
    # The roles the staff file grants now (refreshed at each request).
    roles: frozenset[str] = field(default_factory=frozenset)

    def may(self, role: str) -> bool:
        return grants(self.roles, role)


class StaffLogin:
    """Sessions of the staff file's people, shared by every installed area."""

    def __init__(
        self, staff_file: Path, session_seconds: float, *, may_be_missing: bool = False
    ) -> None:
        """Raises StaffFileError (one line) for a bad file, or a missing one unless
        ``may_be_missing`` (then nobody can log in until the file is written)."""
        self.staff_file = staff_file
        self.session_seconds = session_seconds
        if may_be_missing and not staff_file.exists():
            log.warning(
                "staff file %s does not exist yet: nobody can log in to the admin pages"
                " until `rabbitgate alerts add-reviewer NAME --file %s` writes it",
                staff_file,
                staff_file,
            )
        else:
            read_staff(staff_file)  # at start: a bad file stops the gateway
        self._sessions: dict[str, StaffSession] = {}
        self._login_buckets: dict[str, TokenBucket] = {}
        self._areas: list[Area] = []
        self._roles_cache: tuple[tuple[int, int, int], dict[str, frozenset[str]]] | None = None

    def install(self, app: web.Application, area: Area) -> None:
        """Add the area's login and logout routes (before the app starts)."""
        self._areas.append(area)

        async def login_form(request: web.Request) -> web.Response:
            return await self.login_form(request, area)

        async def login(request: web.Request) -> web.Response:
            return await self.login(request, area)

        async def logout(request: web.Request) -> web.Response:
            return await self.logout(request, area)

        app.router.add_get(f"{area.prefix}/login", login_form)
        app.router.add_post(f"{area.prefix}/login", login)
        app.router.add_post(f"{area.prefix}/logout", logout)

    # --- sessions -----------------------------------------------------------

    def session(self, request: web.Request) -> StaffSession | None:
        """The request's live session with its current roles, or None."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None or session.expires < time.time():
            self._sessions.pop(token, None)
            return None
        roles = self._current_roles().get(session.name)
        if roles is None:  # no longer on the staff (or the file is unreadable)
            self._sessions.pop(token, None)
            return None
        session.roles = roles
        return session

    def require(self, request: web.Request, area: Area, role: str | None = None) -> StaffSession:
        """The session, if it may do ``role`` (the area's by default): else to the
        login form (no session) or a 403 page (a session without the role)."""
        session = self.session(request)
        if session is None:
            raise web.HTTPSeeOther(f"{area.prefix}/login")
        needed = role or area.role
        if not session.may(needed):
            body = f"""{self.header(area, session)}
<p class="error" id="error">Your login may not do this: it needs the role
<code>{escape(needed)}</code> in the staff file.</p>"""
            raise _as_error(page(f"Not allowed — {area.title}", body, status=403))
        return session

    async def checked_fields(
        self, request: web.Request, session: StaffSession
    ) -> dict[str, list[str]]:
        """Every value of every POSTed field (repeated ones too), as text, after the
        same-origin and CSRF checks (403 otherwise)."""
        same_origin(request)
        form = await request.post()
        token = str(form.get("csrf", ""))
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise web.HTTPForbidden(text="bad or missing CSRF token\n")
        fields: dict[str, list[str]] = {}
        for key, value in form.items():
            fields.setdefault(key, []).append(str(value))
        return fields

    async def checked_form(self, request: web.Request, session: StaffSession) -> dict[str, str]:
        """The POSTed form, the first value of each field, after the same checks."""
        fields = await self.checked_fields(request, session)
        return {key: values[0] for key, values in fields.items()}

    def _current_roles(self) -> dict[str, frozenset[str]]:
        """name -> roles from the staff file, read again when it changed; a file
        that cannot be read or parsed grants nothing (fail closed)."""
        try:
            stat = os.stat(self.staff_file)
        except OSError:
            return {}
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if self._roles_cache is not None and self._roles_cache[0] == key:
            return self._roles_cache[1]
        try:
            roles = {name: m.roles for name, m in read_staff(self.staff_file).items()}
        except StaffFileError:
            roles = {}
        self._roles_cache = (key, roles)
        return roles

    # --- login --------------------------------------------------------------

    async def login_form(
        self, request: web.Request, area: Area, error: str | None = None, status: int = 200
    ) -> web.Response:
        token = secrets.token_urlsafe(32)
        body = f"""
<h1>{escape(area.title)}</h1>
{error_html(error)}
<form method="post" action="{escape(area.prefix)}/login" class="login">
  <input type="hidden" name="csrf" value="{token}">
  <label>Name <input name="name" id="name" autocomplete="username" required maxlength="64"></label>
  <label>Password <input name="password" id="password" type="password"
         autocomplete="current-password" required maxlength="1024"></label>
  <button type="submit" id="login">Log in</button>
</form>"""
        response = page(f"Log in — rabbitgate {area.title.lower()}", body, status=status)
        _set_cookie(request, response, LOGIN_COOKIE, token, 600, f"{area.prefix}/")
        return response

    async def login(self, request: web.Request, area: Area) -> web.Response:
        same_origin(request)
        form = await request.post()
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        sent = str(form.get("csrf", ""))
        if not cookie or not hmac.compare_digest(sent.encode(), cookie.encode()):
            raise web.HTTPForbidden(text="bad or missing CSRF token\n")
        if not self._login_allowed(login_address(request)):
            return await self.login_form(request, area, "Too many attempts; wait a minute.", 401)
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        member = await asyncio.to_thread(check_login, self.staff_file, name, password)
        if member is None:
            return await self.login_form(request, area, "Wrong name or password.", 401)
        if not grants(member.roles, area.role):
            return await self.login_form(
                request, area, f"This login has no access to the {area.title.lower()}.", 403
            )
        if len(self._sessions) >= MAX_SESSIONS:
            now = time.time()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            while len(self._sessions) >= MAX_SESSIONS:  # the oldest goes
                self._sessions.pop(next(iter(self._sessions)))
        token = secrets.token_urlsafe(32)
        self._sessions[token] = StaffSession(
            member.name, secrets.token_urlsafe(32), time.time() + self.session_seconds
        )
        response = web.HTTPSeeOther(f"{area.prefix}/")
        # One login opens every area the roles grant: the cookie for each area's
        # path, this area's first.
        for each in [area, *(a for a in self._areas if a != area)]:
            _set_cookie(
                request,
                response,
                SESSION_COOKIE,
                token,
                int(self.session_seconds),
                f"{each.prefix}/",
            )
        _set_cookie(request, response, LOGIN_COOKIE, "", 0, f"{area.prefix}/")
        raise response

    def _login_allowed(self, address: str) -> bool:
        bucket = self._login_buckets.get(address)
        if bucket is None:
            if len(self._login_buckets) >= MAX_LOGIN_BUCKETS:
                self._login_buckets.clear()
            bucket = self._login_buckets[address] = TokenBucket(
                LOGIN_PER_MINUTE / 60.0, LOGIN_BURST
            )
        allowed, _ = bucket.take(time.monotonic())
        return allowed

    async def logout(self, request: web.Request, area: Area) -> web.Response:
        session = self.session(request)
        if session is None:
            raise web.HTTPSeeOther(f"{area.prefix}/login")
        await self.checked_form(request, session)
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = web.HTTPSeeOther(f"{area.prefix}/login")
        for each in self._areas:
            _set_cookie(request, response, SESSION_COOKIE, "", 0, f"{each.prefix}/")
        raise response

    def header(self, area: Area, session: StaffSession, who: str = "staff") -> str:
        """The top line of an area's pages: who is logged in (``who``: "reviewer",
        "operator"), links to the other areas they may open, the logout button."""
        links = " ".join(
            f'<a href="{escape(a.prefix)}/">{escape(a.title)}</a>'
            for a in self._areas
            if a != area and session.may(a.role)
        )
        return f"""<header><b>rabbitgate {escape(area.title.lower())}</b>
<span>{escape(who)} <b id="{escape(who)}">{escape(session.name)}</b></span>
<nav>{links}</nav>
<form method="post" action="{escape(area.prefix)}/logout" class="inline">
<input type="hidden" name="csrf" value="{escape(session.csrf)}">
<button type="submit" id="logout">Log out</button></form></header>"""


def staff_login_for(settings: Settings) -> StaffLogin | None:
    """The gateway's staff login, or None when no staff file is configured (then
    no page behind a login is served). A missing or bad file is a ConfigError."""
    configured = staff_login_settings(settings)
    if configured is None:
        return None
    # The old anomaly.reviewers_file could name a file not written yet (the compose
    # stack starts first, then `add-reviewer` runs in its container); staff.file
    # must exist.
    legacy = settings.staff.file is None
    try:
        return StaffLogin(*configured, may_be_missing=legacy)
    except StaffFileError as exc:
        hint = ""
        if not configured[0].exists():
            hint = f" (write it with `rabbitgate alerts add-reviewer NAME --file {configured[0]}`)"
        raise ConfigError(f"{exc}{hint}") from None


# The header the supervisor of `serve --workers N` names the browser's address
# in when it forwards the admin pages to a worker (gateway/operations/supervisor.py).
FORWARDED_FOR = "X-Rabbitgate-Forwarded-For"


def login_address(request: web.Request) -> str:
    """The address logins are throttled by.

    Behind the supervisor a worker's admin app is on a Unix socket in a
    private directory that only the supervisor can reach, so there (and only
    there: over TCP anyone could set it) the supervisor's header names the
    browser; otherwise every login would share one throttle.
    """
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple):  # AF_UNIX: a path (str) or nothing
        forwarded = request.headers.get(FORWARDED_FOR)
        if forwarded:
            return forwarded[:64]
    return request.remote or "?"


def same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser, or one too old to say; the CSRF token still holds
        return
    expected = f"{request.scheme}://{request.host}"
    if origin != expected:
        raise web.HTTPForbidden(text="cross-origin request refused\n")


def _set_cookie(
    request: web.Request,
    response: web.StreamResponse,
    name: str,
    value: str,
    max_age: int,
    path: str,
) -> None:
    """Add one Set-Cookie header. Added by hand, not with ``response.set_cookie``:
    that keeps one cookie per name, and the session needs one per area's path
    (a cookie scoped to the staff pages only, not to the whole admin listener)."""
    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["max-age"] = str(max_age)
    morsel["path"] = path
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    if request.secure:
        morsel["secure"] = True
    if max_age == 0:
        morsel["expires"] = "Thu, 01 Jan 1970 00:00:00 GMT"
    response.headers.add("Set-Cookie", morsel.OutputString())


def _as_error(response: web.Response) -> web.HTTPForbidden:
    """A rendered 403 page as an exception a handler can raise, with its headers."""
    error = web.HTTPForbidden(text=response.text, content_type="text/html")
    for name, value in response.headers.items():
        if name.lower() not in ("content-type", "content-length"):
            error.headers[name] = value
    return error

"""The alert review page, on the admin listener under ``/alerts/``.

Security staff log in with their own name and password (``anomaly.reviewers_file``,
scrypt hashes; not the gateway's JWTs, not the admin port's lack of any
authentication), see the open alerts with their reasons, filter them, and
acknowledge or close them; the reviewer recorded on an alert is the name
they logged in with.

Defenses, because the page shows data attackers chose (a user name is a
token's ``sub``, an address may come from a proxy header):

* every value is HTML-escaped; no JavaScript at all, and a CSP that forbids it
  (``default-src 'none'``), forms may only post here, no framing;
* the session is a random 256-bit token in an HttpOnly, SameSite=Strict cookie
  scoped to ``/alerts/`` (Secure on HTTPS), held server-side, expiring after
  ``anomaly.review_session_seconds``; logout ends it;
* every POST carries the session's CSRF token (and a login form its own,
  double-submitted with a cookie); a cross-origin ``Origin`` is refused;
* logins are throttled per client address (5 a minute, 10 at once), password
  checks run off the event loop and take as long for unknown names.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from anomaly.alerts import RESOLUTIONS, STATUSES, AlertStore, ReviewError, UnknownAlert
from anomaly.passwords import check_login
from anomaly.settings import SEVERITIES, AnomalySettings
from gateway.limits.buckets import TokenBucket

PREFIX = "/alerts"
SESSION_COOKIE = "rabbitgate_review"
LOGIN_COOKIE = "rabbitgate_review_login"
LOGIN_PER_MINUTE = 5.0
LOGIN_BURST = 10
MAX_SESSIONS = 1000
MAX_LOGIN_BUCKETS = 10_000
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_MESSAGES = {
    "acknowledged": "Alert acknowledged.",
    "closed": "Alert closed.",
    "loggedout": "Logged out.",
}


@dataclass
class ReviewSession:
    reviewer: str
    csrf: str
    expires: float


class ReviewPages:
    """Routes under /alerts/ of an admin app; needs the detector's store once started."""

    def __init__(self, detector: Any, settings: AnomalySettings) -> None:
        self.detector = detector
        self.settings = settings
        self.store: AlertStore | None = None
        self._sessions: dict[str, ReviewSession] = {}
        self._login_buckets: dict[str, TokenBucket] = {}

    def install(self, app: web.Application) -> None:
        """Add the routes (before the app starts: its router is frozen then)."""
        r = app.router
        r.add_get(f"{PREFIX}/", self.index)
        r.add_get(PREFIX, self._to_index)
        r.add_get(f"{PREFIX}/login", self.login_form)
        r.add_post(f"{PREFIX}/login", self.login)
        r.add_post(f"{PREFIX}/logout", self.logout)
        r.add_get(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}", self.detail)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/ack", self.acknowledge)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/close", self.close)

    def attach_store(self, store: AlertStore | None) -> None:
        self.store = store

    # --- sessions -----------------------------------------------------------

    def _session(self, request: web.Request) -> ReviewSession | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None or session.expires < time.time():
            self._sessions.pop(token, None)
            return None
        return session

    def _require(self, request: web.Request) -> ReviewSession:
        session = self._session(request)
        if session is None:
            raise web.HTTPSeeOther(f"{PREFIX}/login")
        return session

    async def _form(self, request: web.Request, session: ReviewSession) -> dict[str, str]:
        """The POSTed form, after the same-origin and CSRF checks."""
        _same_origin(request)
        form = await request.post()
        token = str(form.get("csrf", ""))
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise web.HTTPForbidden(text="bad or missing CSRF token\n")
        return {key: str(value) for key, value in form.items()}

    def _store(self) -> AlertStore:
        if self.store is None:
            raise web.HTTPServiceUnavailable(text="the alert store is not open yet\n")
        return self.store

    # --- login --------------------------------------------------------------

    async def _to_index(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(f"{PREFIX}/")

    async def login_form(self, request: web.Request, error: str | None = None) -> web.Response:
        token = secrets.token_urlsafe(32)
        body = f"""
<h1>Alert review</h1>
{_error(error)}
<form method="post" action="{PREFIX}/login" class="login">
  <input type="hidden" name="csrf" value="{token}">
  <label>Name <input name="name" id="name" autocomplete="username" required maxlength="64"></label>
  <label>Password <input name="password" id="password" type="password"
         autocomplete="current-password" required maxlength="1024"></label>
  <button type="submit" id="login">Log in</button>
</form>"""
        response = _page("Log in — rabbitgate alerts", body, status=401 if error else 200)
        _set_cookie(request, response, LOGIN_COOKIE, token, 600)
        return response

    async def login(self, request: web.Request) -> web.Response:
        _same_origin(request)
        form = await request.post()
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        sent = str(form.get("csrf", ""))
        if not cookie or not hmac.compare_digest(sent.encode(), cookie.encode()):
            raise web.HTTPForbidden(text="bad or missing CSRF token\n")
        if not self._login_allowed(request.remote or "?"):
            return await self.login_form(request, "Too many attempts; wait a minute.")
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        path = self.settings.reviewers_file
        ok = path is not None and await asyncio.to_thread(check_login, Path(path), name, password)
        if not ok:
            return await self.login_form(request, "Wrong name or password.")
        if len(self._sessions) >= MAX_SESSIONS:
            now = time.time()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        token = secrets.token_urlsafe(32)
        lifetime = self.settings.review_session_seconds
        self._sessions[token] = ReviewSession(
            name, secrets.token_urlsafe(32), time.time() + lifetime
        )
        response = web.HTTPSeeOther(f"{PREFIX}/")
        _set_cookie(request, response, SESSION_COOKIE, token, int(lifetime))
        response.del_cookie(LOGIN_COOKIE, path=f"{PREFIX}/")
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

    async def logout(self, request: web.Request) -> web.Response:
        session = self._require(request)
        await self._form(request, session)
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = web.HTTPSeeOther(f"{PREFIX}/login")
        response.del_cookie(SESSION_COOKIE, path=f"{PREFIX}/")
        raise response

    # --- pages --------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        session = self._require(request)
        query = request.query
        status = query.get("status", "open")
        severity = query.get("severity", "")
        subject = query.get("subject", "").strip()[:200]
        statuses: Any = {"active": ("open", "acknowledged"), "all": None}.get(status, status)
        if status not in (*STATUSES, "active", "all"):
            statuses, status = "open", "open"
        if severity not in SEVERITIES:
            severity = ""
        alerts = await asyncio.to_thread(
            self._store().find,
            status=statuses,
            severity=severity or None,
            subject=subject or None,
            limit=500,
        )
        rows = "".join(self._row(alert, session) for alert in alerts) or (
            '<tr><td colspan="7" class="empty">No alerts match.</td></tr>'
        )
        body = f"""
{self._header(session)}
{_message(query.get("msg"))}
<form method="get" action="{PREFIX}/" class="filters" id="filters">
  <label>Status {_select("status", [*STATUSES, "active", "all"], status)}</label>
  <label>Severity {_select("severity", ["", *SEVERITIES], severity)}</label>
  <label>Subject <input name="subject" value="{_e(subject)}" placeholder="user or address"></label>
  <button type="submit" id="filter">Filter</button>
</form>
<table id="alerts">
<thead><tr><th>Created</th><th>Severity</th><th>Score</th><th>Subject</th><th>Why</th>
<th>Status</th><th></th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="count">{len(alerts)} alert{"s" if len(alerts) != 1 else ""}</p>"""
        return _page("Alerts — rabbitgate", body)

    def _row(self, alert: dict[str, Any], session: ReviewSession) -> str:
        alert_id = _e(alert["id"])
        reasons = "".join(f"<li>{_e(r['text'])}</li>" for r in alert["reasons"])
        ack = ""
        if alert["status"] == "open":
            ack = f"""<form method="post" action="{PREFIX}/{alert_id}/ack" class="inline">
<input type="hidden" name="csrf" value="{session.csrf}">
<button type="submit" class="ack" data-id="{alert_id}">Acknowledge</button></form>"""
        return f"""<tr class="alert {_e(alert["severity"])}" data-id="{alert_id}">
<td><a href="{PREFIX}/{alert_id}">{_e(alert["created_at"])}</a></td>
<td class="sev">{_e(alert["severity"])}</td><td>{float(alert["score"]):.2f}</td>
<td>{_subject_html(alert)}</td><td><ul class="reasons">{reasons}</ul></td>
<td class="status">{_e(alert["status"])}</td><td>{ack}</td></tr>"""

    async def detail(self, request: web.Request, error: str | None = None) -> web.Response:
        session = self._require(request)
        alert_id = request.match_info["alert_id"]
        try:
            alert = await asyncio.to_thread(self._store().get, alert_id)
        except UnknownAlert:
            raise web.HTTPNotFound(text="no such alert\n") from None
        a = alert
        features = "".join(
            f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>"
            for name, value in a["features"].items()
        )
        reasons = "".join(
            f"<li>{_e(r['text'])} <span class=dim>(value {_e(r['value'])}, "
            f"baseline p99 {_e(r['baseline_p99'])})</span></li>"
            for r in a["reasons"]
        )
        actions = "".join(f"<li>{_e(x)}</li>" for x in a["actions"])
        history = "".join(
            f"<li>{_e(h['at'])}: {_e(h['status'])} by {_e(h['by'])}"
            + (f" — {_e(h['note'])}" if h.get("note") else "")
            + "</li>"
            for h in a.get("history", [])
        )
        forms = ""
        csrf = f'<input type="hidden" name="csrf" value="{session.csrf}">'
        if a["status"] == "open":
            forms += f"""<form method="post" action="{PREFIX}/{_e(a["id"])}/ack" id="ack-form">
{csrf}<button type="submit" id="ack">Acknowledge</button></form>"""
        if a["status"] in ("open", "acknowledged"):
            options = "".join(
                f'<option value="{r}">{r.replace("_", " ")}</option>' for r in RESOLUTIONS
            )
            forms += f"""<form method="post" action="{PREFIX}/{_e(a["id"])}/close" id="close-form">
{csrf}<label>Resolution <select name="resolution" id="resolution">{options}</select></label>
<label>Note <textarea name="note" id="note" required maxlength="4000" rows="3"></textarea></label>
<button type="submit" id="close">Close alert</button></form>"""
        closed = ""
        if a["status"] == "closed":
            closed = (
                f"<p id=resolution-text>Closed as <b>{_e(a['resolution'])}</b> by "
                f"{_e(a['reviewer'])}: {_e(a['note'])}</p>"
            )
        body = f"""
{self._header(session)}
<p><a href="{PREFIX}/">&larr; all open alerts</a></p>
{_message(request.query.get("msg"))}{_error(error)}
<h2 id="alert-id">{_e(a["id"])}</h2>
<p><span class="sev {_e(a["severity"])}">{_e(a["severity"])}</span>
score {float(a["score"]):.2f} · status <b id="status">{_e(a["status"])}</b>
· created {_e(a["created_at"])}</p>
<p>Subject: {_subject_html(a)}{_session_html(a)}</p>
<p>Window: {_e(a["window"]["start"])} .. {_e(a["window"]["end"])}</p>
<h3>Why it was flagged</h3><ul id="reasons">{reasons}</ul>
{closed}{forms}
<h3>Actions</h3><ul id="actions">{actions}</ul>
<h3>History</h3><ul id="history">{history or "<li>none yet</li>"}</ul>
<h3>Features of the window</h3><table class="features">{features}</table>"""
        return _page(f"{a['id']} — rabbitgate alerts", body, status=400 if error else 200)

    async def acknowledge(self, request: web.Request) -> web.Response:
        return await self._review(request, "acknowledge")

    async def close(self, request: web.Request) -> web.Response:
        return await self._review(request, "close")

    async def _review(self, request: web.Request, action: str) -> web.Response:
        session = self._require(request)
        form = await self._form(request, session)
        alert_id = request.match_info["alert_id"]
        try:
            changed = await asyncio.to_thread(
                self._store().review,
                alert_id,
                action,
                session.reviewer,
                resolution=form.get("resolution"),
                note=form.get("note"),
            )
        except UnknownAlert:
            raise web.HTTPNotFound(text="no such alert\n") from None
        except ReviewError as exc:
            return await self.detail(request, str(exc))
        await self._after_review(changed)
        target = f"{PREFIX}/{changed['id']}?" + urlencode({"msg": changed["status"]})
        raise web.HTTPSeeOther(target)

    async def _after_review(self, changed: dict[str, Any]) -> None:
        """Publish the change now, and lift restrictions a dismissal removed."""
        if changed["status"] == "closed":
            await self.detector.sync_restrictions()
        outbox = getattr(self.detector, "outbox", None)
        if outbox is not None:
            task = asyncio.get_running_loop().create_task(outbox.flush())
            _background.add(task)
            task.add_done_callback(_background.discard)

    def _header(self, session: ReviewSession) -> str:
        return f"""<header><b>rabbitgate alerts</b>
<span>reviewer <b id="reviewer">{_e(session.reviewer)}</b></span>
<form method="post" action="{PREFIX}/logout" class="inline">
<input type="hidden" name="csrf" value="{session.csrf}">
<button type="submit" id="logout">Log out</button></form></header>"""


_background: set[asyncio.Task[Any]] = set()


def _same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser, or one too old to say; the CSRF token still holds
        return
    expected = f"{request.scheme}://{request.host}"
    if origin != expected:
        raise web.HTTPForbidden(text="cross-origin request refused\n")


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=f"{PREFIX}/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _subject_html(alert: dict[str, Any]) -> str:
    subject = alert["subject"]
    parts = [f"<b>{_e(subject['kind'])}</b>"]
    for key in ("user", "address"):
        if subject.get(key) is not None:
            parts.append(f'{key} <code class="{key}">{_e(subject[key])}</code>')
    return " ".join(parts)


def _session_html(alert: dict[str, Any]) -> str:
    session = alert["subject"].get("session")
    return f" · session <code>{_e(session)}</code>" if session else ""


def _select(name: str, options: list[str], chosen: str) -> str:
    items = "".join(
        f'<option value="{_e(o)}"{" selected" if o == chosen else ""}>{_e(o or "any")}</option>'
        for o in options
    )
    return f'<select name="{name}" id="{name}">{items}</select>'


def _message(code: str | None) -> str:
    text = _MESSAGES.get(code or "")
    return f'<p class="message" id="message">{text}</p>' if text else ""


def _error(text: str | None) -> str:
    return f'<p class="error" id="error">{_e(text)}</p>' if text else ""


def _page(title: str, body: str, status: int = 200) -> web.Response:
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
header {{ display: flex; gap: 1.5em; align-items: center; margin-bottom: 1em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
ul.reasons {{ margin: 0; padding-left: 1.1em; }}
.sev, tr.alert td.sev {{ font-weight: bold; }}
tr.critical td.sev, .sev.critical {{ color: #b00020; }}
tr.high td.sev, .sev.high {{ color: #d35400; }}
tr.medium td.sev, .sev.medium {{ color: #9a7d0a; }}
form.inline {{ display: inline; }} .filters label, .login label {{ margin-right: 1em; }}
.login label {{ display: block; margin: .5em 0; }}
.error {{ color: #b00020; }} .message {{ color: #1e7e34; }} .dim {{ color: #777; }}
textarea {{ width: 30em; display: block; }}
</style></head><body>{body}</body></html>"""
    response = web.Response(text=document, content_type="text/html", status=status)
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Not no-referrer: with it, browsers send "Origin: null" on same-origin posts.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response

"""The alert review page, on the admin listener under ``/alerts/``.

Security staff log in with their own name and password (the staff file,
scrypt hashes, with the ``review`` role; not the gateway's JWTs, not the admin
port's lack of any authentication), see the open alerts with their reasons,
filter them, and acknowledge or close them; the reviewer recorded on an alert
is the name they logged in with.

The login, its sessions, CSRF tokens, Origin check, throttle and the page
shell with its CSP are the gateway's (gateway/operations/staff_login.py,
staff_page.py), shared with the live console: one login opens both, per
role. Every value attackers chose (a user name is a token's ``sub``, an
address may come from a proxy header) is HTML-escaped here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from anomaly.alerts import (
    RESOLUTIONS,
    SORTS,
    STATUSES,
    AlertStore,
    Restriction,
    ReviewError,
    UnknownAlert,
)
from anomaly.settings import SEVERITIES, AnomalySettings
from gateway.operations.staff import REVIEW
from gateway.operations.staff_login import Area, StaffLogin, StaffSession
from gateway.operations.staff_page import error_html as _error
from gateway.operations.staff_page import escape as _e
from gateway.operations.staff_page import page as _page

PREFIX = "/alerts"
AREA = Area(PREFIX, "Alert review", REVIEW)
_MESSAGES = {
    "acknowledged": "Alert acknowledged.",
    "closed": "Alert closed.",
    "open": "Alert reopened.",
    "banned": "Subject banned.",
    "unbanned": "Subject unbanned.",
    "bulk": "Alerts changed.",
    "loggedout": "Logged out.",
}
PAGE_SIZE = 100
MAX_BULK = 500
CHART_HOURS = 24


class ReviewPages:
    """Routes under /alerts/ of an admin app; needs the detector's store once started."""

    def __init__(self, detector: Any, settings: AnomalySettings, login: StaffLogin) -> None:
        self.detector = detector
        self.settings = settings
        self.login = login
        self.store: AlertStore | None = None

    def install(self, app: web.Application) -> None:
        """Add the routes (before the app starts: its router is frozen then)."""
        self.login.install(app, AREA)
        r = app.router
        r.add_get(f"{PREFIX}/", self.index)
        r.add_get(PREFIX, self._to_index)
        r.add_get(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}", self.detail)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/ack", self.acknowledge)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/close", self.close)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/reopen", self.reopen)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/ban", self.ban)
        r.add_post(PREFIX + "/{alert_id:a-[0-9a-f-]{1,40}}/unban", self.unban)
        r.add_post(f"{PREFIX}/bulk", self.bulk)

    def attach_store(self, store: AlertStore | None) -> None:
        self.store = store

    # --- sessions -----------------------------------------------------------

    def _require(self, request: web.Request) -> StaffSession:
        return self.login.require(request, AREA)

    async def _form(self, request: web.Request, session: StaffSession) -> dict[str, str]:
        """The POSTed form, after the same-origin and CSRF checks."""
        return await self.login.checked_form(request, session)

    def _store(self) -> AlertStore:
        if self.store is None:
            raise web.HTTPServiceUnavailable(text="the alert store is not open yet\n")
        return self.store

    async def _to_index(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(f"{PREFIX}/")

    # --- pages --------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        session = self._require(request)
        query = request.query
        status = query.get("status", "active")
        severity = query.get("severity", "")
        search = query.get("q", "").strip()[:200]
        subject = query.get("subject", "").strip()[:200]
        sort = query.get("sort", "newest")
        if status not in (*STATUSES, "active", "all"):
            status = "active"
        statuses: Any = {"active": ("open", "acknowledged"), "all": None}.get(status, status)
        if severity not in SEVERITIES:
            severity = ""
        if sort not in SORTS:
            sort = "newest"
        try:
            page = max(1, min(int(query.get("page", "1")), 100_000))
        except ValueError:
            page = 1
        store = self._store()
        filters = {
            "status": statuses,
            "severity": severity or None,
            "subject": subject or None,
            "search": search or None,
        }
        total = await asyncio.to_thread(store.count, **filters)
        alerts = await asyncio.to_thread(
            store.find, **filters, sort=sort, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
        )
        chart = chart_svg(
            await asyncio.to_thread(store.created_since, time.time() - CHART_HOURS * 3600),
            time.time(),
        )
        rows = "".join(self._row(alert, session) for alert in alerts) or (
            '<tr><td colspan="8" class="empty">No alerts match.</td></tr>'
        )
        kept = {"status": status, "severity": severity, "q": search, "subject": subject}
        kept = {k: v for k, v in kept.items() if v}
        kept["sort"] = sort
        pages = max(1, -(-total // PAGE_SIZE))
        nav = []
        if page > 1:
            nav.append(
                f'<a id="prev" href="{PREFIX}/?{_e(urlencode({**kept, "page": page - 1}))}">'
                "&larr; newer</a>"
            )
        if page < pages:
            nav.append(
                f'<a id="next" href="{PREFIX}/?{_e(urlencode({**kept, "page": page + 1}))}">'
                "older &rarr;</a>"
            )
        options = "".join(
            f'<option value="{r}">close as {r.replace("_", " ")}</option>' for r in RESOLUTIONS
        )
        body = f"""
{self._header(session)}
{_message(query.get("msg"))}
<figure id="chart">{chart}
<figcaption>alerts created per hour, last {CHART_HOURS} h</figcaption></figure>
<form method="get" action="{PREFIX}/" class="filters" id="filters">
  <label>Status {_select("status", ["active", *STATUSES, "all"], status)}</label>
  <label>Severity {_select("severity", ["", *SEVERITIES], severity)}</label>
  <label>Search <input name="q" id="q" value="{_e(search)}"
    placeholder="user, address, channel or reason"></label>
  <label>Sort {_select("sort", list(SORTS), sort)}</label>
  {f'<input type="hidden" name="subject" value="{_e(subject)}">' if subject else ""}
  <button type="submit" id="filter">Filter</button>
</form>
<form method="post" action="{PREFIX}/bulk" id="bulk" class="bulk">
  <input type="hidden" name="csrf" value="{session.csrf}">
  <label>With the selected: <select name="action" id="bulk-action">
    <option value="acknowledge">acknowledge</option>{options}</select></label>
  <label>Note <input name="note" id="bulk-note" maxlength="4000"></label>
  <button type="submit" id="bulk-apply">Apply</button>
</form>
<table id="alerts">
<thead><tr><th></th><th>Created</th><th>Severity</th><th>Score</th><th>Subject</th><th>Why</th>
<th>Status</th><th></th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="count" id="count">{total} alert{"s" if total != 1 else ""} · page {page} of {pages}
{" · ".join(nav)}</p>"""
        return _page("Alerts — rabbitgate", body)

    def _row(self, alert: dict[str, Any], session: StaffSession) -> str:
        alert_id = _e(alert["id"])
        reasons = "".join(f"<li>{_e(r['text'])}</li>" for r in alert["reasons"][:3])
        ack = ""
        if alert["status"] == "open":
            ack = f"""<form method="post" action="{PREFIX}/{alert_id}/ack" class="inline">
<input type="hidden" name="csrf" value="{session.csrf}">
<button type="submit" class="ack" data-id="{alert_id}">Acknowledge</button></form>"""
        windows = alert.get("windows")
        episode = ""
        if windows is not None:
            episode = f'<br><span class="dim">{int(windows)} window{"s" if windows != 1 else ""}'
            if alert.get("suppressed"):
                episode += f", {int(alert['suppressed'])} re-raises suppressed"
            episode += ", ended" if alert.get("ended_at") else ", ongoing"
            episode += "</span>"
        return f"""<tr class="alert {_e(alert["severity"])}" data-id="{alert_id}">
<td><input type="checkbox" name="id" value="{alert_id}" form="bulk" class="pick"></td>
<td><a href="{PREFIX}/{alert_id}">{_e(alert["created_at"])}</a></td>
<td class="sev">{_e(alert["severity"])}</td><td>{float(alert["score"]):.2f}</td>
<td>{_subject_html(alert)}</td><td><ul class="reasons">{reasons}</ul>{episode}</td>
<td class="status">{_e(alert["status"])}</td><td>{ack}</td></tr>"""

    async def bulk(self, request: web.Request) -> web.Response:
        """Acknowledge or close many alerts at once; each one as if done alone."""
        session = self._require(request)
        fields = await self.login.checked_fields(request, session)  # every "id" of it
        ids = fields.get("id", [])[:MAX_BULK]
        action = fields.get("action", [""])[0]
        note = fields.get("note", [""])[0] or None
        resolution = None
        if action in RESOLUTIONS:
            action, resolution = "close", action
        elif action != "acknowledge":
            raise web.HTTPBadRequest(text="unknown bulk action\n")
        store = self._store()
        done, refused = 0, []
        for alert_id in ids:
            try:
                changed = await asyncio.to_thread(
                    store.review,
                    alert_id,
                    action,
                    session.name,
                    resolution=resolution,
                    note=note,
                )
            except ReviewError as exc:
                refused.append(f"{alert_id}: {exc}")
                continue
            done += 1
            await self._after_review(changed)
        if refused and not done:
            raise web.HTTPBadRequest(text="; ".join(refused)[:2000] + "\n")
        raise web.HTTPSeeOther(f"{PREFIX}/?" + urlencode({"msg": "bulk"}))

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
        evidence = "".join(
            "<tr>"
            + "".join(
                f"<td>{_e(item.get(k, ''))}</td>"
                for k in ("event", "channel", "detail", "user", "address")
            )
            + "</tr>"
            for item in a.get("evidence", [])
        )
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
        if a["status"] in ("closed", "acknowledged"):
            reopen = f"{PREFIX}/{_e(a['id'])}/reopen"
            forms += f"""<form method="post" action="{reopen}" id="reopen-form">
{csrf}<label>Note <input name="note" id="reopen-note" required maxlength="4000"></label>
<button type="submit" id="reopen">Reopen</button></form>"""
        kind = a["subject"]["kind"]
        who = a["subject"].get(kind)
        if who and who != "*overflow*":
            forms += f"""<form method="post" action="{PREFIX}/{_e(a["id"])}/ban" id="ban-form">
{csrf}<label>Note <input name="note" id="ban-note" required maxlength="4000"></label>
<button type="submit" id="ban">Ban {_e(kind)} {_e(who)}</button></form>
<form method="post" action="{PREFIX}/{_e(a["id"])}/unban" id="unban-form">
{csrf}<label>Note <input name="note" id="unban-note" required maxlength="4000"></label>
<button type="submit" id="unban">Unban</button></form>"""
        episode = ""
        if a.get("windows") is not None:
            episode = (
                f"<p id=episode>{int(a['windows'])} anomalous"
                f" window{'s' if a['windows'] != 1 else ''} from "
                f"{_e(a.get('first_seen'))} to {_e(a.get('last_seen'))}; "
                f"{int(a.get('suppressed', 0))} re-raises suppressed; "
                + (f"ended {_e(a['ended_at'])}" if a.get("ended_at") else "ongoing")
                + f" · version {int(a.get('version', 1))}</p>"
            )
        closed = ""
        if a["status"] == "closed":
            closed = (
                f"<p id=resolution-text>Closed as <b>{_e(a['resolution'])}</b> by "
                f"{_e(a['reviewer'])}: {_e(a['note'])}</p>"
            )
        body = f"""
{self._header(session)}
<p><a href="{PREFIX}/">&larr; active alerts</a></p>
{_message(request.query.get("msg"))}{_error(error)}
<h2 id="alert-id">{_e(a["id"])}</h2>
<p><span class="sev {_e(a["severity"])}">{_e(a["severity"])}</span>
score {float(a["score"]):.2f} · status <b id="status">{_e(a["status"])}</b>
· created {_e(a["created_at"])}</p>
<p>Subject: {_subject_html(a)}{_session_html(a)}</p>
<p>Latest window: {_e(a["window"]["start"])} .. {_e(a["window"]["end"])}</p>
{episode}
<h3>Why it was flagged</h3><ul id="reasons">{reasons}</ul>
{closed}{forms}
<h3>Recent security events of the subject</h3>
<table id="evidence">
<tr><th>event</th><th>channel</th><th>why</th><th>user</th><th>address</th></tr>
{evidence or '<tr><td colspan="5">none in its windows</td></tr>'}</table>
<h3>Actions</h3><ul id="actions">{actions}</ul>
<h3>History</h3><ul id="history">{history or "<li>none yet</li>"}</ul>
<h3>Features of the window</h3><table class="features">{features}</table>"""
        return _page(f"{a['id']} — rabbitgate alerts", body, status=400 if error else 200)

    async def acknowledge(self, request: web.Request) -> web.Response:
        return await self._review(request, "acknowledge")

    async def close(self, request: web.Request) -> web.Response:
        return await self._review(request, "close")

    async def reopen(self, request: web.Request) -> web.Response:
        return await self._review(request, "reopen")

    async def ban(self, request: web.Request) -> web.Response:
        return await self._restrict(request, True)

    async def unban(self, request: web.Request) -> web.Response:
        return await self._restrict(request, False)

    async def _restrict(self, request: web.Request, ban: bool) -> web.Response:
        """A reviewer's own ban (for ``ban_seconds``) or unban of the alert's subject."""
        session = self._require(request)
        form = await self._form(request, session)
        alert_id = request.match_info["alert_id"]
        store = self._store()
        try:
            alert = await asyncio.to_thread(store.get, alert_id)
        except UnknownAlert:
            raise web.HTTPNotFound(text="no such alert\n") from None
        note = form.get("note", "").strip()
        if not note or len(note) > 4000:
            return await self.detail(request, "a ban or unban needs a note saying why")
        kind = alert["subject"]["kind"]
        key = alert["subject"].get(kind)
        if not key or key == "*overflow*":
            return await self.detail(request, "this alert's subject cannot be banned")
        if ban:
            seconds = self.settings.ban_seconds
            until = time.time() + seconds
            await asyncio.to_thread(store.restrict, Restriction(alert_id, kind, key, "ban", until))
            action = f"banned {kind} {key} for {seconds:g} s by {session.name}"
        else:
            lifted = await asyncio.to_thread(store.lift, kind, key)
            action = f"unbanned {kind} {key} by {session.name} ({lifted} lifted)"
        changed = await asyncio.to_thread(store.note_step, alert_id, session.name, action, note)
        await self.detector.sync_restrictions()
        if ban:
            disconnect = getattr(self.detector, "disconnect", None)
            if disconnect is not None:
                disconnect(kind, key)
        await self._after_review(changed)
        target = f"{PREFIX}/{alert_id}?" + urlencode({"msg": "banned" if ban else "unbanned"})
        raise web.HTTPSeeOther(target)

    async def _review(self, request: web.Request, action: str) -> web.Response:
        session = self._require(request)
        form = await self._form(request, session)
        alert_id = request.match_info["alert_id"]
        try:
            changed = await asyncio.to_thread(
                self._store().review,
                alert_id,
                action,
                session.name,
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

    def _header(self, session: StaffSession) -> str:
        return self.login.header(AREA, session, "reviewer")


_background: set[asyncio.Task[Any]] = set()


def _subject_html(alert: dict[str, Any]) -> str:
    """The subject once ("address 127.0.3.3"), then the other side it was seen with."""
    subject = alert["subject"]
    kind = subject["kind"]
    other = "address" if kind == "user" else "user"
    text = f'<b>{_e(kind)}</b> <code class="{_e(kind)}">{_e(subject.get(kind))}</code>'
    if subject.get(other) is not None:
        text += (
            f' <span class="dim">· {other} <code class="{other}">{_e(subject[other])}</code></span>'
        )
    return text


_COLOURS = {"low": "#6c8ebf", "medium": "#9a7d0a", "high": "#d35400", "critical": "#b00020"}


def chart_svg(created: list[tuple[float, str]], now: float, hours: int = CHART_HOURS) -> str:
    """Alerts created per hour as stacked bars by severity, an inline SVG drawn here
    (the page's CSP forbids scripts; an SVG is markup)."""
    width, height, left, bottom = 720, 120, 30, 18
    slot = (width - left) / hours
    counts = [dict.fromkeys(SEVERITIES, 0) for _ in range(hours)]
    start = now - hours * 3600
    for at, severity in created:
        index = int((at - start) // 3600)
        if 0 <= index < hours and severity in counts[index]:
            counts[index][severity] += 1
    peak = max((sum(c.values()) for c in counts), default=0) or 1
    scale = (height - bottom - 6) / peak
    bars = []
    for index, bucket in enumerate(counts):
        y = float(height - bottom)
        x = left + index * slot
        for severity in SEVERITIES:
            value = bucket[severity]
            if not value:
                continue
            h = value * scale
            y -= h
            bars.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{slot - 2:.1f}" height="{h:.1f}"'
                f' fill="{_COLOURS[severity]}"><title>{value} {severity}</title></rect>'
            )
    axis = (
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}"'
        ' stroke="#999"/>'
        f'<text x="0" y="12" font-size="10">{peak}</text>'
        f'<text x="{left}" y="{height - 4}" font-size="10">-{hours} h</text>'
        f'<text x="{width - 2}" y="{height - 4}" font-size="10" text-anchor="end">now</text>'
    )
    total = sum(sum(c.values()) for c in counts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" id="chart-svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" role="img" aria-label="{total} alerts in {hours} h">'
        f"{axis}{''.join(bars)}</svg>"
    )


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

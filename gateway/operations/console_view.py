"""What the live console shows, apart from any I/O: the search, the paging,
the per-channel table, the covered processes and the HTML of the page.

Every value here may be an attacker's (a user name is a token's ``sub``, an
address may come from a proxy header, channel names and ban keys are
clients' choices, answers of other processes travel as JSON): each one goes
through ``escape`` and is read with ``.get`` and checked for its type, so a
row without a field (an older process's) shows a dash, never a traceback.
Sizes are capped, so 10,000 connections make a page of ``PAGE_SIZE`` rows
with "showing N of M", not a 10 MB document.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlencode

from gateway.operations.connections import ConnectionFilter
from gateway.operations.staff_page import error_html, escape, message_html

PREFIX = "/console"
PAGE_SIZE = 200
MAX_CHANNELS_SHOWN = 200
MAX_BANS_SHOWN = 200
MAX_CHANNELS_PER_ROW = 10
MAX_SEARCH = 256
MAX_PAGE = 100_000
DASH = "–"


@dataclass(frozen=True)
class Search:
    """The search form's fields (exact matches), and the page asked for."""

    user: str | None = None
    address: str | None = None
    channel: str | None = None
    page: int = 1

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Search:
        def field(name: str) -> str | None:
            value = str(query.get(name, "")).strip()[:MAX_SEARCH]
            return value or None

        try:
            page = max(1, min(int(query.get("page", "1")), MAX_PAGE))
        except ValueError:
            page = 1
        return cls(field("user"), field("address"), field("channel"), page)

    def filter(self) -> ConnectionFilter:
        return ConnectionFilter(user=self.user, address=self.address, channel=self.channel)

    def link(self, page: int) -> str:
        """The console's URL for ``page`` of this search."""
        kept = {"user": self.user, "address": self.address, "channel": self.channel}
        query = {k: v for k, v in kept.items() if v is not None}
        query["page"] = str(page)
        return f"{PREFIX}/?{urlencode(query)}"


@dataclass(frozen=True)
class Page:
    """One page of a longer list: ``rows`` are items ``first`` to ``first + len - 1``."""

    rows: Sequence[Any]
    total: int
    number: int
    pages: int
    first: int


def page_of(items: Sequence[Any], number: int, size: int = PAGE_SIZE) -> Page:
    """Page ``number`` (from 1) of ``items``; a page past the end is the last one."""
    pages = max(1, -(-len(items) // size))
    number = max(1, min(number, pages))
    start = (number - 1) * size
    return Page(items[start : start + size], len(items), number, pages, start + 1)


@dataclass(frozen=True)
class ChannelLoad:
    channel: str
    subscribers: int
    messages_per_second: float | None  # None: the service did not measure it


def channel_loads(answer: Mapping[str, Any]) -> list[ChannelLoad]:
    """Per channel, most subscribed first: the service's ``channels`` when it
    sends them, else the subscribers counted from the rows (no rate then)."""
    given = answer.get("channels")
    loads: list[ChannelLoad] = []
    if isinstance(given, list):
        for item in given:
            if not isinstance(item, Mapping) or not isinstance(item.get("channel"), str):
                continue
            rate = item.get("messages_per_second")
            loads.append(
                ChannelLoad(
                    item["channel"],
                    _count(item.get("subscribers")),
                    float(rate) if _is_number(rate) else None,
                )
            )
    else:
        counted: Counter[str] = Counter()
        for row in _rows(answer):
            channels = row.get("channels")
            if isinstance(channels, list):
                counted.update({c for c in channels if isinstance(c, str)})
        loads = [ChannelLoad(name, n, None) for name, n in counted.items()]
    return sorted(loads, key=lambda c: (-c.subscribers, c.channel))


def covers_html(processes: object) -> str:
    """Which processes the answer covers, said plainly at the top of the page."""
    items = [p for p in processes if isinstance(p, Mapping)] if isinstance(processes, list) else []
    if not items:
        return '<p class="covers" id="covers">covers: this process only</p>'
    shown, silent = [], 0
    for item in items:
        name = escape(item.get("process", "?"))
        if item.get("answered", True) is False:
            silent += 1
            shown.append(f'<span class="error">{name} (did not answer)</span>')
        elif "connections" in item:
            n = _count(item.get("connections"))
            shown.append(f"{name} ({n} connection{'' if n == 1 else 's'})")
        else:
            shown.append(name)
    warning = ""
    if silent:
        warning = (
            f' <b class="error" id="incomplete">Incomplete: {silent} process'
            f"{'es' if silent != 1 else ''} did not answer; their connections are"
            " not listed and actions did not reach them.</b>"
        )
    return f'<p class="covers" id="covers">covers: {", ".join(shown)}.{warning}</p>'


MESSAGES = {
    "kicked": "Disconnected {n} session{s} (close code 1008).",
    "banned": "Banned; {n} session{s} closed (close code 4403).",
    "unbanned": "Ban lifted.",
    "nothing-to-unban": "There was no operator ban to lift.",
}


def message_text(query: Mapping[str, str]) -> str | None:
    """The result of the last action, from the redirect's fixed code and count
    (never text from the request: a crafted link cannot put words on the page)."""
    template = MESSAGES.get(str(query.get("msg", "")))
    if template is None:
        return None
    try:
        n = max(0, min(int(query.get("n", "0")), 10**9))
    except ValueError:
        n = 0
    text = template.format(n=n, s="" if n == 1 else "s")
    if query.get("partial") == "1":
        text += " Some processes did not answer: it did not reach them."
    return text


@dataclass(frozen=True)
class View:
    """Everything one rendering of the console needs."""

    answer: Mapping[str, Any]
    search: Search
    header: str  # the login's header line (who, logout)
    csrf: str
    may_act: bool
    message: str | None = None
    error: str | None = None


def render(view: View) -> str:
    """The console's body: covered processes, search, connections, channels, bans, actions."""
    rows = _rows(view.answer)
    shown = page_of(rows, view.search.page)
    s = view.search
    connections = "".join(_connection_row(r, view) for r in shown.rows) or (
        '<tr><td colspan="11" class="empty">No connections match.</td></tr>'
    )
    last = shown.first + len(shown.rows) - 1
    count = (
        f"showing {shown.first}–{last} of {shown.total}"
        if shown.rows
        else f"showing 0 of {shown.total}"
    )
    nav = []
    if shown.number > 1:
        nav.append(f'<a id="prev" href="{escape(s.link(shown.number - 1))}">&larr; previous</a>')
    if shown.number < shown.pages:
        nav.append(f'<a id="next" href="{escape(s.link(shown.number + 1))}">next &rarr;</a>')
    loads = channel_loads(view.answer)
    channel_rows = (
        "".join(
            f"<tr><td><code>{escape(c.channel)}</code></td><td class=num>{c.subscribers}</td>"
            f"<td class=num>{_rate(c.messages_per_second)}</td></tr>"
            for c in loads[:MAX_CHANNELS_SHOWN]
        )
        or '<tr><td colspan="3" class="empty">No subscriptions.</td></tr>'
    )
    bans = [b for b in view.answer.get("bans", []) or [] if isinstance(b, Mapping)]
    ban_rows = "".join(_ban_row(b, view) for b in bans[:MAX_BANS_SHOWN]) or (
        '<tr><td colspan="5" class="empty">No operator bans.</td></tr>'
    )
    return f"""
{view.header}
{covers_html(view.answer.get("processes"))}
{message_html(view.message)}{error_html(view.error)}
<form method="get" action="{PREFIX}/" class="filters" id="search">
  <label>User <input name="user" id="search-user" value="{escape(s.user or "")}"
    maxlength="{MAX_SEARCH}"></label>
  <label>Address <input name="address" id="search-address" value="{escape(s.address or "")}"
    maxlength="{MAX_SEARCH}"></label>
  <label>Channel <input name="channel" id="search-channel" value="{escape(s.channel or "")}"
    maxlength="{MAX_SEARCH}"></label>
  <button type="submit" id="search-go">Search</button> <a href="{PREFIX}/">all</a>
</form>
{_action_forms(view) if view.may_act else ""}
<h2>Connections</h2>
<table id="connections">
<thead><tr><th>Session</th><th>User</th><th>Address</th><th>Transport</th><th>Since (UTC)</th>
<th>Channels</th><th class=num>Send buffer</th><th class=num>In</th><th class=num>Out</th>
<th>Process</th><th></th></tr></thead>
<tbody>{connections}</tbody></table>
<p class="count" id="count">{count} · page {shown.number} of {shown.pages} {" · ".join(nav)}</p>
<h2>Channels</h2>
<table id="channels">
<thead><tr><th>Channel</th><th class=num>Subscribers</th><th class=num>Messages/s</th></tr></thead>
<tbody>{channel_rows}</tbody></table>
<p class="count" id="channel-count">showing {min(len(loads), MAX_CHANNELS_SHOWN)} of
{len(loads)} channels</p>
<h2>Operator bans</h2>
<table id="bans">
<thead><tr><th>Kind</th><th>Subject</th><th>Until (UTC)</th><th>Process</th><th></th></tr></thead>
<tbody>{ban_rows}</tbody></table>
<p class="count" id="ban-count">showing {min(len(bans), MAX_BANS_SHOWN)} of {len(bans)} bans</p>"""


def _connection_row(row: Mapping[str, Any], view: View) -> str:
    session = row.get("session")
    channels = [c for c in row.get("channels") or [] if isinstance(c, str)]
    listed = ", ".join(f"<code>{escape(c)}</code>" for c in channels[:MAX_CHANNELS_PER_ROW])
    if len(channels) > MAX_CHANNELS_PER_ROW:
        listed += f' <span class="dim">+{len(channels) - MAX_CHANNELS_PER_ROW} more</span>'
    action = ""
    if view.may_act and isinstance(session, str):
        action = f"""<form method="post" action="{PREFIX}/kick" class="inline kick">
<input type="hidden" name="csrf" value="{escape(view.csrf)}">
<input type="hidden" name="session" value="{escape(session)}">
<input name="reason" class="kick-reason" placeholder="reason the client sees" maxlength="200"
 size="16"><button type="submit" class="kick">Disconnect</button></form>"""
    return f"""<tr class="connection" data-session="{escape(session or "")}">
<td class="session"><code title="{escape(session or "")}">{escape(_short(session))}</code></td>
<td class="user"><code>{_text(row.get("user"))}</code></td>
<td class="address"><code>{_text(row.get("address"))}</code></td>
<td>{_text(row.get("transport"))}</td><td class="when">{_when(row.get("since"))}</td>
<td class="channels">{listed or DASH}</td><td class="num when">{_buffer(row)}</td>
<td class="num in">{_counted(row.get("messages_in"))}</td>
<td class="num out">{_counted(row.get("messages_out"))}</td>
<td class="process">{_text(row.get("process"))}</td><td>{action}</td></tr>"""


def _ban_row(ban: Mapping[str, Any], view: View) -> str:
    action = ""
    kind, key = ban.get("kind"), ban.get("key")
    if view.may_act and isinstance(kind, str) and isinstance(key, str):
        action = f"""<form method="post" action="{PREFIX}/unban" class="inline unban">
<input type="hidden" name="csrf" value="{escape(view.csrf)}">
<input type="hidden" name="kind" value="{escape(kind)}">
<input type="hidden" name="key" value="{escape(key)}">
<input name="reason" placeholder="why" maxlength="200" size="12">
<button type="submit" class="unban">Unban</button></form>"""
    return f"""<tr class="ban" data-kind="{escape(kind or "")}">
<td>{_text(kind)}</td><td class="key"><code>{_text(key)}</code></td>
<td class="when">{_when(ban.get("until"))}</td><td>{_text(ban.get("process"))}</td>
<td>{action}</td></tr>"""


def _action_forms(view: View) -> str:
    csrf = f'<input type="hidden" name="csrf" value="{escape(view.csrf)}">'
    kinds = '<option value="user">user</option><option value="address">address</option>'
    return f"""<section id="actions">
<fieldset><legend>Disconnect every session of a user</legend>
<form method="post" action="{PREFIX}/kick" id="kick-user-form">{csrf}
<label>User <input name="user" id="kick-user" required maxlength="256"></label>
<label>Reason the client sees <input name="reason" id="kick-user-reason" maxlength="200"></label>
<button type="submit" id="kick-user-go">Disconnect (1008)</button></form></fieldset>
<fieldset><legend>Ban a user or an address</legend>
<form method="post" action="{PREFIX}/ban" id="ban-form">{csrf}
<select name="kind" id="ban-kind">{kinds}</select>
<input name="key" id="ban-key" required maxlength="256" placeholder="user or address">
<label>for <input name="duration" id="ban-duration" required maxlength="12" size="5"
 value="10m"></label>
<label>Reason the client sees <input name="reason" id="ban-reason" maxlength="200"></label>
<button type="submit" id="ban-go">Ban (4403)</button></form>
<p class="dim">Durations: 600, 10m, 2h, 1d (at most 30 days). Operator bans end with the
process that holds them.</p></fieldset>
<fieldset><legend>Lift a ban</legend>
<form method="post" action="{PREFIX}/unban" id="unban-form">{csrf}
<select name="kind" id="unban-kind">{kinds}</select>
<input name="key" id="unban-key" required maxlength="256" placeholder="user or address">
<label>Why <input name="reason" id="unban-reason" maxlength="200"></label>
<button type="submit" id="unban-go">Unban</button></form></fieldset>
</section>"""


def _rows(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = answer.get("connections")
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _count(value: object) -> int:
    return int(value) if _is_number(value) and 0 <= value < 1e15 else 0


def _text(value: object) -> str:
    return DASH if value is None or value == "" else escape(value)


def _counted(value: object) -> str:
    return str(_count(value)) if _is_number(value) else DASH


def _when(value: object) -> str:
    if not _is_number(value) or not 0 < value < 1e11:
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(value)))


def _short(session: object) -> str:
    """The first 12 characters of a session id (the whole one is the cell's title)."""
    if not isinstance(session, str) or not session:
        return DASH
    return session if len(session) <= 12 else session[:12] + "…"


def _rate(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}"


def _buffer(row: Mapping[str, Any]) -> str:
    fill, pending = row.get("send_buffer_fill"), row.get("send_buffer_bytes")
    shown = f"{float(fill) * 100:.0f}%" if _is_number(fill) else DASH
    if _is_number(pending):
        shown += f' <span class="dim">({_count(pending)} B)</span>'
    return shown

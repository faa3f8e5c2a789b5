"""The HTML shell of the admin pages behind a login (alert review, console).

The pages show values attackers chose (a user name is a token's ``sub``, an
address may come from a proxy header, a channel name is a client's), so:
every value goes through ``escape``; the document has no JavaScript at all,
and a CSP forbids it (``default-src 'none'``), forms may post only to this
origin, no page may be framed, nothing is cached.
"""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
header { display: flex; gap: 1.5em; align-items: center; margin-bottom: 1em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td, code { unicode-bidi: isolate; overflow-wrap: break-word; }
td.user, td.key { max-width: 16em; overflow-wrap: anywhere; }
td.when, td.session { white-space: nowrap; }
ul.reasons { margin: 0; padding-left: 1.1em; }
.sev, tr.alert td.sev { font-weight: bold; }
tr.critical td.sev, .sev.critical { color: #b00020; }
tr.high td.sev, .sev.high { color: #d35400; }
tr.medium td.sev, .sev.medium { color: #9a7d0a; }
form.inline { display: inline; } .filters label, .login label { margin-right: 1em; }
.login label { display: block; margin: .5em 0; }
.error { color: #b00020; } .message { color: #1e7e34; } .dim { color: #777; }
textarea { width: 30em; display: block; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
fieldset { display: inline-block; vertical-align: top; margin: 0 1em 1em 0; }
.covers { background: #f3f3f3; padding: .4em .8em; }
"""


def escape(value: Any) -> str:
    """``value`` as HTML text, safe inside an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, status: int = 200) -> web.Response:
    """A whole document with the headers every staff page carries."""
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head><body>{body}</body></html>"""
    response = web.Response(text=document, content_type="text/html", status=status)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Not no-referrer: with it, browsers send "Origin: null" on same-origin posts.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def error_html(text: str | None) -> str:
    return f'<p class="error" id="error">{escape(text)}</p>' if text else ""


def message_html(text: str | None) -> str:
    """A fixed message of the page (never text from the request)."""
    return f'<p class="message" id="message">{escape(text)}</p>' if text else ""

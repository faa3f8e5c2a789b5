"""What the console shows (gateway/operations/console_view.py): search, paging,
channels, covered processes, messages, and HTML that hostile values cannot
break out of."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.operations.console_view import (
    MAX_CHANNELS_SHOWN,
    PAGE_SIZE,
    ChannelLoad,
    Search,
    View,
    channel_loads,
    covers_html,
    message_text,
    page_of,
    render,
)

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='alert(1)",
    "</td></tr></table><form action=//evil>",
    "Zoë 🐇 日本語 &amp; &lt;",
]


class Tags(HTMLParser):
    """Every start tag and attribute of a document, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parsed(body: str) -> Tags:
    tags = Tags()
    tags.feed(body)
    tags.close()
    return tags


def row(n: int, **fields: Any) -> dict[str, Any]:
    base = {
        "process": "host/1",
        "session": f"s{n:05d}",
        "user": f"user{n}",
        "address": "10.0.0.1",
        "transport": "websocket",
        "since": 1.76e9,
        "channels": ["chat.lobby"],
        "send_buffer_bytes": 512,
        "send_buffer_fill": 0.25,
        "messages_in": 3,
        "messages_out": 7,
    }
    return {**base, **fields}


def view(answer: dict[str, Any], *, may_act: bool = True, page: int = 1) -> View:
    return View(answer, Search(page=page), "<header></header>", "CSRF", may_act)


def test_hostile_values_stay_text_everywhere() -> None:
    rows = [
        row(
            i,
            user=h,
            address=h,
            transport=h,
            session=h,
            process=h,
            channels=[h, "ok"],
        )
        for i, h in enumerate(HOSTILE)
    ]
    answer = {
        "processes": [{"process": h, "connections": 1} for h in HOSTILE],
        "connections": rows,
        "channels": [{"channel": h, "subscribers": 1, "messages_per_second": 2} for h in HOSTILE],
        "bans": [{"kind": h, "key": h, "until": 1.77e9, "process": h} for h in HOSTILE],
    }
    body = render(View(answer, Search(user=HOSTILE[1], address=HOSTILE[2]), "", "CSRF", True))
    tags = parsed(body)
    names = {tag for tag, _ in tags.tags}
    assert names.isdisjoint({"script", "img", "iframe", "object", "embed", "svg"})
    assert all(not a.startswith("on") for _, attrs in tags.tags for a in attrs)
    # One form per action: the three panels, a kick per row, an unban per ban, the search.
    forms = [attrs.get("action") for tag, attrs in tags.tags if tag == "form"]
    assert forms.count("/console/kick") == 1 + len(HOSTILE)
    assert forms.count("/console/unban") == 1 + len(HOSTILE)
    assert set(forms) == {"/console/", "/console/kick", "/console/ban", "/console/unban"}
    # The hostile values arrive whole, as attribute values and as text.
    sessions = [a["value"] for t, a in tags.tags if t == "input" and a.get("name") == "session"]
    assert sessions == HOSTILE
    searched = [a["value"] for t, a in tags.tags if a.get("id") == "search-user"]
    assert searched == [HOSTILE[1]]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&amp;amp; &amp;lt;" in body  # an entity a user typed is shown as typed


def test_a_viewer_gets_no_action_forms() -> None:
    answer = {"connections": [row(1)], "bans": [{"kind": "user", "key": "x", "until": 1.77e9}]}
    tags = parsed(render(view(answer, may_act=False)))
    forms = [attrs.get("action") for tag, attrs in tags.tags if tag == "form"]
    assert forms == ["/console/"]  # the search only
    assert not any(a.get("name") == "csrf" for _, a in tags.tags)


def test_ten_thousand_connections_make_one_capped_page() -> None:
    answer = {"connections": [row(i, channels=[f"c{i}"]) for i in range(10_000)]}
    body = render(view(answer, page=3))
    assert len(body) < 400_000  # about 200 kB; all 10,000 rows would be 10 MB
    assert body.count('class="connection"') == PAGE_SIZE
    assert "showing 401–600 of 10000 · page 3 of 50" in body
    assert f"showing {MAX_CHANNELS_SHOWN} of\n10000 channels" in body
    assert 'href="/console/?page=2"' in body and 'href="/console/?page=4"' in body


@pytest.mark.parametrize(
    ("count", "asked", "shown", "first", "pages"),
    [
        (0, 1, 0, 1, 1),
        (5, 1, 5, 1, 1),
        (450, 3, 50, 401, 3),
        (450, 99, 50, 401, 3),
        (450, 0, 200, 1, 3),
    ],
)
def test_paging(count: int, asked: int, shown: int, first: int, pages: int) -> None:
    page = page_of(list(range(count)), asked)
    assert (len(page.rows), page.first, page.pages, page.total) == (shown, first, pages, count)


def test_search_from_a_query() -> None:
    search = Search.from_query({"user": "  ann ", "address": "", "page": "x"})
    assert search == Search(user="ann", page=1)
    assert search.filter().user == "ann" and search.filter().address is None
    assert Search.from_query({"page": "-4"}).page == 1
    assert Search.from_query({"page": "10000000"}).page == 100_000
    assert Search.from_query({"channel": "c" * 1000}).channel == "c" * 256
    assert Search(user="a&b=c").link(2) == "/console/?user=a%26b%3Dc&page=2"


def test_channels_from_the_service_or_counted_from_rows() -> None:
    given = {
        "channels": [
            {"channel": "b", "subscribers": 2, "messages_per_second": 1.5},
            {"channel": "a", "subscribers": 9},
            {"channel": 5, "subscribers": 1},  # not a name: left out
            "junk",
        ]
    }
    assert channel_loads(given) == [ChannelLoad("a", 9, None), ChannelLoad("b", 2, 1.5)]
    counted = {"connections": [row(1, channels=["x", "y"]), row(2, channels=["x"]), {"u": 1}]}
    assert channel_loads(counted) == [ChannelLoad("x", 2, None), ChannelLoad("y", 1, None)]


def test_rows_with_missing_or_odd_fields_show_dashes() -> None:
    odd = {
        "session": "s1",
        "since": "yesterday",
        "messages_in": True,
        "send_buffer_fill": None,
        "channels": "not a list",
    }
    body = render(view({"connections": [odd, "junk"], "bans": ["junk", {"kind": None}]}))
    cells = body.split('data-session="s1"')[1].split("</tr>")[0]
    assert cells.count("–") >= 8  # user, address, transport, since, channels, buffer, in, out
    assert "True" not in cells


def test_covers_says_which_processes_answered() -> None:
    assert "this process only" in covers_html(None)
    text = covers_html(
        [
            {"process": "a/1", "connections": 3},
            {"process": "b/2", "answered": False},
            {"process": "c/3"},
        ]
    )
    assert "a/1 (3 connections)" in text and "b/2 (did not answer)" in text and "c/3" in text
    assert "Incomplete: 1 process did not answer" in text


def test_messages_are_fixed_texts_with_a_count() -> None:
    assert message_text({"msg": "kicked", "n": "1"}) == "Disconnected 1 session (close code 1008)."
    assert (
        message_text({"msg": "banned", "n": "3"}) == "Banned; 3 sessions closed (close code 4403)."
    )
    assert message_text({"msg": "kicked", "n": "<b>"}) == (
        "Disconnected 0 sessions (close code 1008)."
    )
    assert message_text({"msg": "<script>"}) is None
    assert message_text({}) is None
    # A fleet-wide action some process did not answer says so (a fixed text too).
    assert message_text({"msg": "kicked", "n": "2", "partial": "1"}) == (
        "Disconnected 2 sessions (close code 1008)."
        " Some processes did not answer: it did not reach them."
    )
    assert message_text({"msg": "unbanned", "partial": "<b>"}) == "Ban lifted."


ALLOWED_TAGS = {
    "header", "p", "span", "b", "form", "label", "input", "button", "a", "section",
    "fieldset", "legend", "select", "option", "h2", "table", "thead", "tbody", "tr",
    "th", "td", "code",
}  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=5))
def test_any_text_in_any_field_stays_text(values: list[str]) -> None:
    """Whatever a hostile value is, the page's elements are the page's own, and each
    value comes back whole from the attribute that carries it."""
    rows = [
        row(i, user=v, address=v, session=v, process=v, transport=v, channels=[v])
        for i, v in enumerate(values)
    ]
    bans = [{"kind": v, "key": v, "until": 1.77e9} for v in values]
    body = render(View({"connections": rows, "bans": bans}, Search(user=values[0]), "", "C", True))
    tags = parsed(body)
    assert {tag for tag, _ in tags.tags} <= ALLOWED_TAGS
    assert all(not a.startswith("on") for _, attrs in tags.tags for a in attrs)
    carried = [a["value"] for t, a in tags.tags if t == "input" and a.get("name") == "session"]
    assert carried == values

"""The live console on the admin port (gateway/operations/console.py): operators
click through it in real Chromium against a real gateway, with real clients
over real TLS WebSockets whose real signed tokens carry hostile ``sub`` claims;
then the defenses, request by request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import Gateway
from gateway.config import ConfigError, Settings, StaffSettings
from gateway.operations.staff import CONSOLE_ACT, CONSOLE_VIEW, REVIEW, set_member
from gateway.policy.rules import load_policy_set
from gateway.telemetry.logs import AUDIT_LOGGER

from .cdp import CHROMIUM, Browser

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
# User names chosen by attackers who hold tokens: shown on the page, never run.
SCRIPT = "<script>document.title='pwned'</script>"
IMG = '"><img src=x onerror=alert(1) id=pwn>'
QUOTES = 'o\'brien "the" <b id=bold>admin</b> & co'
UNICODE = "Zoë 🐇 日本語 ×"
SHOTS = Path(os.environ.get("RABBITGATE_SCREENSHOTS", tempfile.gettempdir())) / "console-shots"


@pytest.fixture
def staff_file(tmp_path: Path) -> Path:
    path = tmp_path / "staff"
    set_member(path, "olga", PASSWORD, frozenset({CONSOLE_ACT}))  # acts (and so sees)
    set_member(path, "vera", PASSWORD, frozenset({CONSOLE_VIEW}))  # only sees
    set_member(path, "sam", PASSWORD)  # a reviewer's line of the first version: review only
    return path


@pytest.fixture
async def console(
    settings: Settings, cleanup_broker: None, staff_file: Path
) -> AsyncIterator[Gateway]:
    # Anomaly detection stays off: the console is an operator's tool of its own.
    custom = dataclasses.replace(settings, staff=StaffSettings(file=staff_file))
    assert not custom.anomaly.enabled
    gw = Gateway(custom, load_policy_set(custom.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


async def closed(client: Any) -> tuple[int | None, str | None]:
    """The close code and reason the client saw (waits up to 5 s for them)."""
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            await asyncio.wait_for(client.ws.recv(), 5)
    return client.ws.close_code, client.ws.close_reason


async def screenshot(browser: Browser, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await browser.send(
        "Emulation.setDeviceMetricsOverride",
        width=1280,
        height=900,
        deviceScaleFactor=1,
        mobile=False,
    )
    shot = await browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


async def log_in(browser: Browser, base: str, name: str) -> None:
    await browser.goto(base)
    assert (await browser.url()).endswith("/console/login")  # the page needs a login
    await browser.fill("#name", name)
    await browser.fill("#password", PASSWORD)
    await browser.click_and_wait("#login")


def user_cells(rows: str = "#connections tr.connection") -> str:
    return f"[...document.querySelectorAll('{rows} td.user')].map(c => c.textContent)"


async def until_listed(browser: Browser, base: str, users: list[str]) -> None:
    """Reload the console until it lists exactly ``users`` (5 s at most)."""
    for _ in range(50):
        await browser.goto(base)
        if sorted(await browser.evaluate(user_cells())) == users:
            return
        await asyncio.sleep(0.1)
    assert sorted(await browser.evaluate(user_cells())) == users


async def no_injected_markup(browser: Browser) -> None:
    """Nothing a hostile name carried became an element or ran."""
    assert await browser.evaluate("document.scripts.length") == 0
    assert await browser.evaluate("document.querySelector('#pwn, #bold, img')") is None
    assert await browser.evaluate("document.title") == "Console — rabbitgate"


async def test_an_operator_sees_searches_kicks_bans_and_unbans_in_a_real_browser(
    console: Gateway,
    connect_client: Any,
    make_token: Callable[..., str],
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup` (CI does)"
    )
    caplog.set_level(logging.INFO, AUDIT_LOGGER)
    ann = await connect_client("ann", gw=console)
    assert (await ann.request("subscribe", channel="chat.lobby"))["type"] == "ack"
    assert (await ann.request("publish", channel="chat.lobby", data={"n": 1}))["type"] == "ack"
    scripted = await connect_client(SCRIPT, gw=console)
    assert (await scripted.request("subscribe", channel="chat.lobby"))["type"] == "ack"
    await connect_client(IMG, gw=console)
    first_quoted = await connect_client(QUOTES, gw=console)
    await connect_client(UNICODE, gw=console)
    ann_session = (await console.connections.list(_everyone()))["connections"]
    ann_id = next(r["session"] for r in ann_session if r["user"] == "ann")
    base = f"http://127.0.0.1:{console.admin_port}/console/"

    async with Browser() as browser:
        await log_in(browser, base, "olga")
        assert await browser.text("#operator") == "olga"
        # Every connection of the process, the hostile names as text.
        users = await browser.evaluate(user_cells())
        assert sorted(users) == sorted(["ann", SCRIPT, IMG, QUOTES, UNICODE])
        await no_injected_markup(browser)
        covers = await browser.text("#covers")
        assert covers is not None and f"/{os.getpid()} (5 connections)" in covers
        assert await browser.text("#count") == "showing 1–5 of 5 · page 1 of 1"
        ann_row = f"#connections tr[data-session='{ann_id}']"
        assert await browser.text(f"{ann_row} td.channels") == "chat.lobby"
        assert await browser.text(f"{ann_row} td.in") == "1"
        lobby = await browser.evaluate(
            "[...document.querySelectorAll('#channels tbody tr')]"
            ".map(r => [...r.cells].map(c => c.textContent))"
        )
        assert lobby[0][:2] == ["chat.lobby", "2"]
        shot = await screenshot(browser, "1-connections")
        assert shot.stat().st_size > 10_000

        # Search by user (the hostile one, typed as is), by channel, by address.
        await browser.fill("#search-user", IMG)
        await browser.click_and_wait("#search-go")
        assert await browser.evaluate(user_cells()) == [IMG]
        assert await browser.evaluate("document.querySelector('#search-user').value") == IMG
        await no_injected_markup(browser)
        await browser.fill("#search-user", "")
        await browser.fill("#search-channel", "chat.lobby")
        await browser.click_and_wait("#search-go")
        assert sorted(await browser.evaluate(user_cells())) == sorted(["ann", SCRIPT])
        await browser.fill("#search-channel", "")
        await browser.fill("#search-address", "192.0.2.1")
        await browser.click_and_wait("#search-go")
        assert await browser.evaluate(user_cells()) == []
        await browser.goto(base)

        # Disconnect one session: the client sees the close code and the reason.
        await browser.fill(f"{ann_row} input.kick-reason", "maintenance")
        await browser.click_and_wait(f"{ann_row} button.kick")
        assert await browser.text("#message") == "Disconnected 1 session (close code 1008)."
        assert await closed(ann) == (1008, "disconnected by an operator: maintenance")

        # Disconnect every session of a user (a second one of the quoted name first).
        quoted = [first_quoted, await connect_client(QUOTES, gw=console)]
        await browser.goto(base)
        await browser.fill("#kick-user", QUOTES)
        await browser.fill("#kick-user-reason", "token leaked, reconnect")
        await browser.click_and_wait("#kick-user-go")
        assert await browser.text("#message") == "Disconnected 2 sessions (close code 1008)."
        for client in quoted:
            assert await closed(client) == (
                1008,
                "disconnected by an operator: token leaked, reconnect",
            )
        await until_listed(browser, base, sorted([SCRIPT, IMG, UNICODE]))

        # Ban the scripted user: its session closes with 4403, a new one is refused.
        await browser.fill("#ban-key", SCRIPT)
        await browser.fill("#ban-duration", "2h")
        await browser.fill("#ban-reason", "spam")
        await browser.click_and_wait("#ban-go")
        assert await browser.text("#message") == "Banned; 1 session closed (close code 4403)."
        assert await closed(scripted) == (4403, "banned by an operator: spam")
        # A new connection of the user is refused (after auth: the name is the token's).
        fresh = await connect(
            f"wss://localhost:{console.port}/ws",
            ssl=client_ssl,
            additional_headers={"Authorization": f"Bearer {make_token(SCRIPT)}"},
            subprotocols=["rabbitgate.v1"],
        )
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(fresh.recv(), 5)
        assert fresh.close_code == 4403
        assert await browser.text("#bans tr.ban td.key") == SCRIPT
        # The closed session leaves the list once its closing handshake is over.
        await until_listed(browser, base, sorted([IMG, UNICODE]))
        await no_injected_markup(browser)
        await screenshot(browser, "2-banned")

        # Unban from the bans table: the user may connect again.
        await browser.fill("#bans tr.ban input[name=reason]", "appeal granted")
        await browser.click_and_wait("#bans tr.ban button.unban")
        assert await browser.text("#message") == "Ban lifted."
        assert await browser.text("#bans") is not None
        assert await browser.evaluate("document.querySelectorAll('#bans tr.ban').length") == 0
        again = await connect_client(SCRIPT, gw=console)
        assert again.welcome["type"] == "welcome"  # type: ignore[attr-defined]

        # A refused request is the page again with one line, nothing applied.
        await browser.fill("#ban-key", "mallory")
        await browser.fill("#ban-duration", "forever")
        await browser.click_and_wait("#ban-go")
        error = await browser.text("#error")
        assert error is not None and error.startswith("duration:")
        assert not console.node.restrictions.banned("user", "mallory")

    # Each action on the audit stream under the name the operator logged in with.
    done = [
        (r.event, r.operator, r.target)  # type: ignore[attr-defined]
        for r in caplog.records
        if str(getattr(r, "event", "")).startswith("operator_")
    ]
    assert done == [
        ("operator_kick", "olga", f"session {ann_id}"),
        ("operator_kick", "olga", f"user {QUOTES}"),
        ("operator_ban", "olga", f"user {SCRIPT}"),
        ("operator_unban", "olga", f"user {SCRIPT}"),
    ]


def _everyone() -> Any:
    from gateway.operations.connections import ConnectionFilter

    return ConnectionFilter()


async def test_a_viewer_sees_no_actions_and_a_forged_post_is_refused(
    console: Gateway, connect_client: Any
) -> None:
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup`"
    )
    target = await connect_client(IMG, gw=console)
    (row,) = (await console.connections.list(_everyone()))["connections"]
    base = f"http://127.0.0.1:{console.admin_port}/console/"
    async with Browser() as browser:
        await log_in(browser, base, "vera")
        assert await browser.text("#operator") == "vera"
        assert await browser.evaluate(user_cells()) == [IMG]
        assert await browser.evaluate("document.querySelector('#actions')") is None
        assert await browser.evaluate("document.querySelectorAll('form[action$=kick]').length") == 0
        await no_injected_markup(browser)
        await screenshot(browser, "3-viewer")
        # The viewer forges the operator's form in her own page (DevTools may run
        # what the page's CSP forbids) with her own valid CSRF token: refused.
        await browser.evaluate(
            "(() => { const f = document.createElement('form'); f.method = 'post';"
            " f.action = '/console/kick';"
            " for (const [k, v] of [['csrf', document.querySelector('input[name=csrf]').value],"
            f" ['session', {row['session']!r}], ['reason', 'x']]) {{"
            " const i = document.createElement('input'); i.name = k; i.value = v;"
            " f.appendChild(i); } document.body.appendChild(f); f.submit(); })()"
        )
        await asyncio.sleep(1)
        status = await browser.text("#error")
        assert status is not None and "console-act" in status
    assert target.ws.close_code is None  # still connected
    assert (await target.request("ping"))["type"] == "pong"


async def staff_login(
    http: aiohttp.ClientSession, base: str, name: str, password: str = PASSWORD
) -> aiohttp.ClientResponse:
    async with http.get(base + "login") as page:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None
    form = {"csrf": csrf.group(1), "name": name, "password": password}
    async with http.post(base + "login", data=form, allow_redirects=False) as answer:
        await answer.read()
        return answer


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found is not None
    return found.group(1)


async def test_console_defenses(console: Gateway, connect_client: Any, staff_file: Path) -> None:
    target = await connect_client("ann", gw=console)
    (row,) = (await console.connections.list(_everyone()))["connections"]
    base = f"http://127.0.0.1:{console.admin_port}/console/"
    kick = base + "kick"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        # Nothing without a session: to the login form, no action taken.
        async with http.get(base, allow_redirects=False) as page:
            assert page.status == 303 and page.headers["Location"] == "/console/login"
        async with http.post(kick, data={"session": row["session"]}, allow_redirects=False) as r:
            assert r.status == 303
        # A reviewer without a console role is refused at the console's login.
        refused = await staff_login(http, base, "sam")
        assert refused.status == 403
        assert (await staff_login(http, base, "olga", "wrong password!")).status == 401
        logged_in = await staff_login(http, base, "olga")
        assert logged_in.status == 303
        cookie = next(
            c for c in logged_in.headers.getall("Set-Cookie") if c.startswith("rabbitgate_staff=")
        )
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/console/"):
            assert attribute in cookie
        async with http.get(base) as page:
            text = await page.text()
            csp = page.headers["Content-Security-Policy"]
            assert csp.startswith("default-src 'none';") and "script-src" not in csp
            assert page.headers["X-Frame-Options"] == "DENY"
            assert page.headers["Cache-Control"] == "no-store"
            assert "<script" not in text
        csrf = csrf_of(text)
        form = {"csrf": csrf, "session": row["session"], "reason": "x"}
        # Without the session's CSRF token, or from another origin: 403, nothing done.
        async with http.post(kick, data={**form, "csrf": "forged"}) as answer:
            assert answer.status == 403
        async with http.post(kick, data={k: v for k, v in form.items() if k != "csrf"}) as answer:
            assert answer.status == 403
        async with http.post(kick, data=form, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        assert (await target.request("ping"))["type"] == "pong"
        # Bad input is one line on the page, HTTP 400, never a traceback.
        ban = {"csrf": csrf, "kind": "user", "key": "mallory", "reason": "x"}
        for bad, expected in [
            ({"duration": "-5"}, "duration:"),
            ({"duration": "99d"}, "seconds: a number from 1 to"),
            ({"duration": "1h", "kind": "dog"}, "kind: user or address"),
            ({"duration": "1h", "key": ""}, "key:"),
        ]:
            async with http.post(base + "ban", data={**ban, **bad}) as answer:
                assert answer.status == 400, bad
                shown = re.search(r'<p class="error" id="error">([^<]*)</p>', await answer.text())
                assert shown is not None and shown.group(1).startswith(expected), bad
        async with http.post(kick, data={"csrf": csrf, "reason": "x"}) as answer:
            assert answer.status == 400
        assert not console.node.restrictions.banned("user", "mallory")
        # An address ban closes the address's sessions and refuses its handshakes.
        ban_address = {**ban, "kind": "address", "key": "127.0.0.1", "duration": "10m"}
        async with http.post(base + "ban", data=ban_address, allow_redirects=False) as answer:
            assert answer.status == 303
            assert answer.headers["Location"] == "/console/?msg=banned&n=1"
        assert (await closed(target))[0] == 4403
        with pytest.raises(InvalidStatus) as refused:
            await connect_client("ann", gw=console)
        assert refused.value.response.status_code == 403
        unban = {"csrf": csrf, "kind": "address", "key": "127.0.0.1", "reason": ""}
        async with http.post(base + "unban", data=unban, allow_redirects=False) as answer:
            assert answer.headers["Location"] == "/console/?msg=unbanned"
        async with http.post(base + "unban", data=unban, allow_redirects=False) as answer:
            assert answer.headers["Location"] == "/console/?msg=nothing-to-unban"
        target = await connect_client("ann", gw=console)
        (row,) = (await console.connections.list(_everyone()))["connections"]
        form = {"csrf": csrf, "session": row["session"], "reason": "x"}
        # A role taken out of the staff file holds at the next click.
        set_member(staff_file, "olga", PASSWORD, frozenset({CONSOLE_VIEW}))
        async with http.post(kick, data=form) as answer:
            assert answer.status == 403
        async with http.get(base) as page:
            assert page.status == 200 and "/console/kick" not in await page.text()
        assert (await target.request("ping"))["type"] == "pong"
        # Logout ends the session.
        async with http.post(base + "logout", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(base, allow_redirects=False) as page:
            assert page.status == 303


async def test_no_staff_file_no_console(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/console/", "/console/login", "/alerts/"):
            async with http.get(f"http://127.0.0.1:{gateway.admin_port}{path}") as page:
                assert page.status == 404, path
        form = {"session": "x", "reason": "x"}
        url = f"http://127.0.0.1:{gateway.admin_port}/console/kick"
        async with http.post(url, data=form) as answer:
            assert answer.status == 404


async def test_the_console_is_not_on_the_public_port(
    console: Gateway, client_ssl: ssl.SSLContext
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"wss://localhost:{console.port}/console/", ssl=client_ssl)
    assert refused.value.response.status_code == 404


async def test_one_login_opens_the_review_page_and_the_console(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    tmp_path: Path,
) -> None:
    staff = tmp_path / "both"
    set_member(staff, "rita", PASSWORD, frozenset({REVIEW, CONSOLE_ACT}))
    set_member(staff, "rex", PASSWORD)  # review only
    gateway = await start_gateway(
        dataclasses.replace(anomaly_settings(), staff=StaffSettings(file=staff))
    )
    admin = f"http://127.0.0.1:{gateway.admin_port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        assert (await staff_login(http, admin + "/alerts/", "rita")).status == 303
        async with http.get(admin + "/console/", allow_redirects=False) as page:
            assert page.status == 200
            text = await page.text()
            assert 'id="operator">rita<' in text and 'href="/alerts/"' in text
        async with http.get(admin + "/alerts/", allow_redirects=False) as page:
            assert page.status == 200 and 'href="/console/"' in await page.text()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        assert (await staff_login(http, admin + "/alerts/", "rex")).status == 303
        async with http.get(admin + "/console/", allow_redirects=False) as page:
            assert page.status == 403 and "console-view" in await page.text()
        async with http.get(admin + "/alerts/", allow_redirects=False) as page:
            assert page.status == 200 and 'href="/console/"' not in await page.text()


def test_a_missing_or_bad_staff_file_stops_the_gateway_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.write_text("olga:scrypt$1$2$3$4$5:console-act,root\n")
    for path, expected in [
        (tmp_path / "missing", "No such file"),
        (bad, "unknown role 'root'"),
    ]:
        custom = dataclasses.replace(settings, staff=StaffSettings(file=path))
        with pytest.raises(ConfigError) as caught:
            Gateway(custom, load_policy_set(custom.policies_dir))
        assert expected in str(caught.value) and "\n" not in str(caught.value)
        assert str(path) in str(caught.value)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="add-reviewer NAME --file"):
        Gateway(
            dataclasses.replace(settings, staff=StaffSettings(file=missing)),
            load_policy_set(settings.policies_dir),
        )


def test_the_old_reviewers_file_may_be_written_after_the_start(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As with the first version (the compose stack adds reviewers once it runs):
    anomaly.reviewers_file not written yet is a warning, and the console is there."""
    later = tmp_path / "reviewers"
    old = dataclasses.replace(
        settings, anomaly=dataclasses.replace(settings.anomaly, reviewers_file=later)
    )
    with caplog.at_level(logging.WARNING, "rabbitgate.server"):
        gateway = Gateway(old, load_policy_set(old.policies_dir))
    assert gateway.staff_login is not None
    assert any("does not exist yet" in r.getMessage() for r in caplog.records)
    bad = tmp_path / "bad"
    bad.write_text("sam:not-a-hash\n")
    wrong = dataclasses.replace(
        settings, anomaly=dataclasses.replace(settings.anomaly, reviewers_file=bad)
    )
    with pytest.raises(ConfigError, match="expected name:scrypt"):
        Gateway(wrong, load_policy_set(wrong.policies_dir))


@pytest.fixture
async def crowded_console(
    settings: Settings, cleanup_broker: None, staff_file: Path
) -> AsyncIterator[Gateway]:
    """A console whose one address may open a few hundred connections at once."""
    limits = dataclasses.replace(
        settings.limits, connects_burst=1000, connects_per_second_per_address=1000.0
    )
    custom = dataclasses.replace(settings, staff=StaffSettings(file=staff_file), limits=limits)
    gw = Gateway(custom, load_policy_set(custom.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


async def test_a_long_list_is_paged_in_a_real_browser(
    crowded_console: Gateway, connect_client: Any
) -> None:
    """205 real connections: 200 on the first page, "showing N of M", a next link."""
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup`"
    )
    console = crowded_console
    for start in range(0, 205, 41):
        crowd = (connect_client(f"crowd{n:03d}", gw=console) for n in range(start, start + 41))
        await asyncio.gather(*crowd)
    base = f"http://127.0.0.1:{console.admin_port}/console/"
    async with Browser() as browser:
        await log_in(browser, base, "vera")
        assert await browser.text("#count") == "showing 1–200 of 205 · page 1 of 2 next →"
        assert len(await browser.evaluate(user_cells())) == 200
        await browser.click_and_wait("#next")
        assert await browser.text("#count") == "showing 201–205 of 205 · page 2 of 2 ← previous"
        page_two = await browser.evaluate(user_cells())
        await browser.goto(base + "?user=crowd007&page=9")  # a page past the end: the last
        assert await browser.evaluate(user_cells()) == ["crowd007"]
    assert len(page_two) == 5 and all(u.startswith("crowd") for u in page_two)


def test_add_reviewer_writes_roles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from gateway.cli import main
    from gateway.operations.staff import read_staff

    target = tmp_path / "staff"
    argv = ["alerts", "add-reviewer", "olga", "--file", str(target), "--password-stdin"]
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main([*argv, "--roles", "console-act,review"]) == 0
    assert read_staff(target)["olga"].roles == {CONSOLE_ACT, REVIEW}
    assert "with roles console-act,review" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main([*argv, "--roles", "console-act,root"]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown role 'root'" in err and "\n" not in err
    assert read_staff(target)["olga"].roles == {CONSOLE_ACT, REVIEW}  # unchanged

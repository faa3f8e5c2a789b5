"""The alert review page on the admin port: a reviewer clicks through a review
in headless Chromium; the page's defenses, request by request."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.exceptions import InvalidStatus

from anomaly.alerts import make_alert
from anomaly.features import FEATURES, SubjectWindow
from anomaly.model import Reason
from anomaly.passwords import set_reviewer
from gateway.config import Settings

from .anomaly_helpers import next_alert, open_ws, scan_channels, user_alert_for, welcome
from .cdp import CHROMIUM, Browser

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
# A user name chosen by an attacker who holds a token: shown on the page, never run.
HOSTILE = '<img src=x onerror="document.title=1"><b id=pwn>x</b>'


@pytest.fixture
def reviewers(tmp_path: Path) -> Path:
    path = tmp_path / "reviewers"
    set_reviewer(path, "sam", PASSWORD)
    return path


async def raise_alerts(gateway: Any, client_ssl: ssl.SSLContext, token: str, address: str) -> None:
    ws = await open_ws(gateway.port, client_ssl, token, address)
    await welcome(ws)
    await scan_channels(ws, 40)
    await gateway.anomaly.detector.tick()
    await ws.close()


async def test_a_reviewer_acknowledges_and_closes_an_alert_in_a_real_browser(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    alert_queue: Any,
    reviewers: Path,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup` (CI does)"
    )
    gateway = await start_gateway(anomaly_settings(reviewers_file=reviewers))
    await raise_alerts(gateway, client_ssl, make_token("mallory"), "127.0.8.1")
    await raise_alerts(gateway, client_ssl, make_token(HOSTILE), "127.0.8.2")
    target = await user_alert_for(gateway, "mallory")
    for _ in range(4):  # two alerts for each scan (user, address) were published
        await next_alert(alert_queue)
    base = f"http://127.0.0.1:{gateway.admin_port}/alerts/"

    async with Browser() as browser:
        await browser.goto(base)
        assert (await browser.url()).endswith("/alerts/login")  # the page needs a login
        await browser.fill("#name", "sam")
        await browser.fill("#password", "not the password")
        await browser.click_and_wait("#login")
        assert await browser.text("#error") == "Wrong name or password."
        await browser.fill("#name", "sam")
        await browser.fill("#password", PASSWORD)
        await browser.click_and_wait("#login")
        assert await browser.text("#reviewer") == "sam"

        # Open alerts with their explanations; the hostile name is text, not markup.
        rows = await browser.evaluate("document.querySelectorAll('#alerts tr.alert').length")
        assert rows == 4
        page = await browser.text("#alerts")
        assert page is not None and "authorization denials 40, above 99% of normal windows" in page
        assert HOSTILE in page
        assert await browser.evaluate("document.querySelector('#pwn')") is None
        assert await browser.evaluate("document.title") != "1"

        # Filter: the user's alerts only (user and address windows both name mallory).
        await browser.fill("#q", "mallory")
        await browser.click_and_wait("#filter")
        shown = await browser.evaluate(
            "[...document.querySelectorAll('#alerts tr.alert')].map(r => r.dataset.id)"
        )
        assert target["id"] in shown and len(shown) == 2
        severity = target["severity"]
        await browser.evaluate(f"document.querySelector('#severity').value = '{severity}'")
        await browser.click_and_wait("#filter")
        severities = await browser.evaluate(
            "[...document.querySelectorAll('#alerts td.sev')].map(c => c.textContent)"
        )
        assert severities and set(severities) == {severity}
        await browser.goto(base + "?subject=mallory")

        # Acknowledge from the list, then close from the alert's page.
        await browser.click_and_wait(f"tr[data-id='{target['id']}'] button.ack")
        assert await browser.text("#message") == "Alert acknowledged."
        assert await browser.text("#status") == "acknowledged"
        assert await browser.text("#alert-id") == target["id"]
        reasons = await browser.text("#reasons")
        assert reasons is not None and "authorization denials 40" in reasons
        await browser.evaluate("document.querySelector('#resolution').value = 'true_positive'")
        await browser.fill("#note", "inbox scanning from a test account; token revoked")
        await browser.click_and_wait("#close")
        assert await browser.text("#message") == "Alert closed."
        assert await browser.text("#status") == "closed"
        closed_text = await browser.text("#resolution-text")
        assert closed_text is not None and "true_positive by sam" in closed_text
        history = await browser.text("#history")
        assert history is not None and "acknowledged by sam" in history

        # The closed alert has left the default (open) list.
        await browser.goto(base)
        ids = await browser.evaluate(
            "[...document.querySelectorAll('#alerts tr.alert')].map(r => r.dataset.id)"
        )
        assert target["id"] not in ids

        await browser.click_and_wait("#logout")
        await browser.goto(base)
        assert (await browser.url()).endswith("/alerts/login")

    # Recorded with the logged-in reviewer, and published on each change.
    stored = await asyncio.to_thread(gateway.anomaly.detector.store.get, target["id"])
    assert (stored["status"], stored["resolution"], stored["reviewer"]) == (
        "closed",
        "true_positive",
        "sam",
    )
    seen = []
    for _ in range(2):
        _, body = await next_alert(alert_queue)
        seen.append((body["id"], body["status"]))
    assert seen == [(target["id"], "acknowledged"), (target["id"], "closed")]


@pytest.fixture
async def review_page(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    reviewers: Path,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> Any:
    gateway = await start_gateway(anomaly_settings(reviewers_file=reviewers))
    await raise_alerts(gateway, client_ssl, make_token("mallory"), "127.0.9.1")
    return gateway


async def login(
    http: aiohttp.ClientSession, base: str, password: str = PASSWORD, cookies: list | None = None
) -> int:
    async with http.get(base + "login") as page:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None
    form = {"csrf": csrf.group(1), "name": "sam", "password": password}
    async with http.post(base + "login", data=form, allow_redirects=False) as answer:
        if cookies is not None:
            cookies.extend(answer.headers.getall("Set-Cookie", []))
        return answer.status


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found is not None
    return found.group(1)


async def test_review_page_defenses(review_page: Any) -> None:
    gateway = review_page
    base = f"http://127.0.0.1:{gateway.admin_port}/alerts/"
    alert = await user_alert_for(gateway, "mallory")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        # Nothing without a session.
        async with http.get(base, allow_redirects=False) as page:
            assert page.status == 303 and page.headers["Location"] == "/alerts/login"
        async with http.post(base + f"{alert['id']}/ack", allow_redirects=False) as page:
            assert page.status == 303
        # A login form without its CSRF token is refused.
        async with http.post(base + "login", data={"name": "sam", "password": PASSWORD}) as r:
            assert r.status == 403
        assert await login(http, base, "wrong password!") == 401
        set_cookies: list[str] = []
        assert await login(http, base, cookies=set_cookies) == 303
        session_cookie = next(c for c in set_cookies if c.startswith("rabbitgate_staff="))
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/alerts/"):
            assert attribute in session_cookie
        async with http.get(base) as page:
            text = await page.text()
            assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert page.headers["X-Frame-Options"] == "DENY"
            assert page.headers["Cache-Control"] == "no-store"
            assert "<script" not in text
        csrf = csrf_of(text)
        ack = base + f"{alert['id']}/ack"
        # A POST without the session's CSRF token, or from another origin, is refused.
        async with http.post(ack, data={"csrf": "forged"}) as answer:
            assert answer.status == 403
        headers = {"Origin": "https://evil.example"}
        async with http.post(ack, data={"csrf": csrf}, headers=headers) as answer:
            assert answer.status == 403
        assert (await asyncio.to_thread(gateway.anomaly.detector.store.get, alert["id"]))[
            "status"
        ] == "open"
        # A bad review step is explained on the page, not applied.
        close = base + f"{alert['id']}/close"
        form = {"csrf": csrf, "resolution": "true_positive", "note": ""}
        async with http.post(close, data=form) as answer:
            assert answer.status == 400
            assert "needs a note" in await answer.text()
        async with http.post(ack, data={"csrf": csrf}, allow_redirects=False) as answer:
            assert answer.status == 303
        stored = await asyncio.to_thread(gateway.anomaly.detector.store.get, alert["id"])
        assert (stored["status"], stored["reviewer"]) == ("acknowledged", "sam")


async def test_logins_are_throttled(review_page: Any) -> None:
    base = f"http://127.0.0.1:{review_page.admin_port}/alerts/"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        statuses = [await login(http, base, "wrong password!") for _ in range(12)]
        assert statuses[:10] == [401] * 10
        assert await login(http, base) == 401  # even the right password, for a while
        async with http.get(base + "login") as page:
            assert page.status == 200


async def test_the_review_page_is_not_on_the_public_port(
    review_page: Any, client_ssl: ssl.SSLContext
) -> None:
    from websockets.asyncio.client import connect

    with pytest.raises(InvalidStatus) as refused:
        await connect(f"wss://localhost:{review_page.port}/alerts/", ssl=client_ssl)
    assert refused.value.response.status_code == 404


SHOTS = Path(os.environ.get("RABBITGATE_SCREENSHOTS", tempfile.gettempdir())) / "review-shots"


async def screenshot(browser: Browser, name: str) -> Path:
    """Save what the reviewer sees (looked at by hand when the page changes)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = await browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def many_alerts(count: int) -> list[dict[str, Any]]:
    """Stored alerts of many subjects, as the detector makes them."""
    found = []
    now = time.time()
    for n in range(count):
        features = dict.fromkeys(FEATURES, 0.0)
        features["denials"] = float(n % 50)
        window = SubjectWindow(
            "address", f"user{n % 40}", f"127.0.7.{n % 200}", None, now - 60, now, features
        )
        reason = Reason("denials", float(n % 50), 1.0, f"authorization denials {n % 50}", 100.0)
        alert = make_alert(window, 0.70 + (n % 30) / 100, "high", [reason], now - n)
        alert["windows"] = 1 + n % 7
        found.append(alert)
    return found


async def test_review_at_volume_in_a_real_browser(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    reviewers: Path,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    """Search, sort, pages past 500, bulk acknowledge and close, reopen, manual ban and
    unban with a note, the chart, the default "active" filter, subjects shown once."""
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup`"
    )
    gateway = await start_gateway(anomaly_settings(reviewers_file=reviewers))
    store = gateway.anomaly.detector.store
    await asyncio.to_thread(store.add_many, many_alerts(620))
    await raise_alerts(gateway, client_ssl, make_token(HOSTILE), "127.0.3.3")
    base = f"http://127.0.0.1:{gateway.admin_port}/alerts/"
    async with Browser() as browser:
        await browser.goto(base)
        await browser.fill("#name", "sam")
        await browser.fill("#password", PASSWORD)
        await browser.click_and_wait("#login")
        # Default filter: active; 622 alerts, 100 a page; the chart drawn as SVG.
        assert await browser.evaluate("document.querySelector('#status').value") == "active"
        count = await browser.text("#count")
        assert count is not None and count.startswith("622 alerts") and "page 1 of 7" in count
        assert await browser.evaluate("document.querySelectorAll('#alerts tr.alert').length") == 100
        label = await browser.evaluate(
            "document.querySelector('#chart-svg').getAttribute('aria-label')"
        )
        assert label == "622 alerts in 24 h"
        assert await browser.evaluate("document.querySelectorAll('#chart-svg rect').length") >= 1
        await screenshot(browser, "1-list")
        # The subject once: "address 127.0.3.3", then the user it was seen with.
        await browser.fill("#q", "127.0.3.3")
        await browser.click_and_wait("#filter")
        subjects = await browser.evaluate(
            "[...document.querySelectorAll('#alerts tr.alert td:nth-child(5)')]"
            ".map(c => c.textContent.trim())"
        )
        assert len(subjects) == 2  # the address's alert and its user's
        assert any(s.startswith("address 127.0.3.3") for s in subjects), subjects
        assert all("address address" not in s and HOSTILE in s for s in subjects)
        assert await browser.evaluate("document.querySelector('#pwn')") is None
        await screenshot(browser, "2-search-address")
        # Pages past 500: page 6 and 7 (alerts 501-622), in score order.
        await browser.goto(base + "?sort=score&page=6")
        count = await browser.text("#count")
        assert count is not None and "page 6 of 7" in count
        scores = await browser.evaluate(
            "[...document.querySelectorAll('#alerts tr.alert td:nth-child(4)')]"
            ".map(c => +c.textContent)"
        )
        assert len(scores) == 100 and scores == sorted(scores, reverse=True)
        await browser.click_and_wait("#next")
        assert await browser.evaluate("document.querySelectorAll('#alerts tr.alert').length") == 22
        # Search by reason, then bulk acknowledge what was found.
        await browser.goto(base + "?q=denials+49")
        ids = await browser.evaluate(
            "[...document.querySelectorAll('#alerts tr.alert')].map(r => r.dataset.id)"
        )
        assert len(ids) == 12  # n % 50 == 49 for n < 620
        await browser.evaluate("document.querySelectorAll('input.pick').forEach(b => b.click())")
        await browser.click_and_wait("#bulk-apply")
        assert await browser.text("#message") == "Alerts changed."
        stored = [await asyncio.to_thread(store.get, i) for i in ids]
        assert {a["status"] for a in stored} == {"acknowledged"}
        # Bulk close as benign, with a note: they leave the active list.
        await browser.goto(base + "?q=denials+49")
        await browser.evaluate("document.querySelectorAll('input.pick').forEach(b => b.click())")
        await browser.evaluate("document.querySelector('#bulk-action').value = 'benign'")
        await browser.fill("#bulk-note", "load test from the QA team")
        await browser.click_and_wait("#bulk-apply")
        await browser.goto(base + "?q=denials+49")
        assert await browser.evaluate("document.querySelectorAll('#alerts tr.alert').length") == 0
        # Reopen one from its page.
        await browser.goto(base + ids[0])
        assert await browser.text("#status") == "closed"
        await browser.fill("#reopen-note", "not QA after all")
        await browser.click_and_wait("#reopen")
        assert await browser.text("#message") == "Alert reopened."
        assert await browser.text("#status") == "open"
        await screenshot(browser, "3-reopened")
        # Ban the hostile user's address by hand, with a note; then unban.
        found = await asyncio.to_thread(store.find, subject="127.0.3.3")
        (hostile,) = [a for a in found if a["subject"]["kind"] == "address"]
        await browser.goto(base + hostile["id"])
        # The subject's security events: which channels were refused, for whom.
        evidence = await browser.text("#evidence")
        assert evidence is not None and "denied" in evidence and "user.u0.inbox" in evidence
        assert "Bearer" not in evidence and "eyJ" not in evidence  # never a token
        await browser.fill("#ban-note", "scanning again")
        await browser.click_and_wait("#ban")
        assert await browser.text("#message") == "Subject banned."
        assert gateway.node.restrictions.banned("address", "127.0.3.3")
        actions = await browser.text("#actions")
        assert actions is not None and "banned address 127.0.3.3" in actions and "by sam" in actions
        await screenshot(browser, "4-banned")
        await browser.fill("#unban-note", "talked to them")
        await browser.click_and_wait("#unban")
        assert await browser.text("#message") == "Subject unbanned."
        assert not gateway.node.restrictions.banned("address", "127.0.3.3")
        history = await browser.text("#history")
        assert history is not None and "talked to them" in history

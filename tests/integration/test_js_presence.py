"""The JS client's presence (clients/js/rabbitgate.js) in real headless Chromium against a
real gateway: ``presence(channel)``, ``onJoin``/``onLeave``, and ``forbidden``."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import pytest

from gateway.app import Gateway
from tests.integration import test_js_client as js
from tests.integration.test_js_client import page_server, plain_gateway  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

POLICY = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [role:member]
    publish: [role:member]
    presence: [role:member]
    presence_events: true
  - channel: "secret.{{room}}"
    exchange: {p}.secret
    subscribe: [anyone]
"""

PAGE = r"""<!doctype html>
<meta charset="utf-8">
<pre id="result">running</pre>
<script type="module">
import { RabbitgateClient } from "/rabbitgate.js";
const wsUrl = new URLSearchParams(location.search).get("ws");
const token = (sub) => fetch(`/token?sub=${sub}`).then((r) => r.text());
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(predicate, what) {
  const end = Date.now() + 10000;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await pause(20);
  }
}
async function run() {
  const events = [];
  const alice = new RabbitgateClient(wsUrl, {
    token: () => token("alice"),
    onMessage: () => {},
    onJoin: (e) => { events.push([e.type, e.user, e.channel]); },
    onLeave: (e) => { events.push([e.type, e.user, e.channel]); },
  });
  const bob = new RabbitgateClient(wsUrl, { token: () => token("bob") });
  await alice.connect();
  await bob.connect();
  await alice.subscribe("chat.jsp");
  await bob.subscribe("chat.jsp");
  await until(() => events.some((e) => e[0] === "join" && e[1] === "bob"), "bob's join");
  const listed = await alice.presence("chat.jsp");
  await bob.unsubscribe("chat.jsp");
  await until(() => events.some((e) => e[0] === "leave" && e[1] === "bob"), "bob's leave");
  let refused = null;
  try { await alice.presence("secret.x"); } catch (error) { refused = error.code; }
  alice.close(); bob.close();
  return {
    count: listed.count,
    users: listed.clients.map((c) => c.user).sort(),
    bob: events.filter((e) => e[1] === "bob"),
    refused,
  };
}
let result;
try { result = await run(); } catch (error) { result = { error: String(error) }; }
document.getElementById("result").textContent = JSON.stringify(result);
await fetch("/result", { method: "POST", body: JSON.stringify(result) });
</script>
"""


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-presence.yaml").write_text(POLICY.format(p=exchange_prefix))
    return folder


async def test_the_browser_client_lists_presence_and_hears_join_and_leave(
    plain_gateway: Gateway,  # noqa: F811
    page_server: js.PageServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert js.CHROMIUM.exists(), (
        "chromium is missing: `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup`"
    )
    monkeypatch.setattr(js, "PAGE", PAGE)  # what the page server serves at /
    ws_url = f"ws://127.0.0.1:{plain_gateway.port}/ws"
    page = f"http://127.0.0.1:{page_server.server_port}/?ws={urllib.parse.quote(ws_url)}"
    log_file = tmp_path / "chromium.log"
    with log_file.open("wb") as log:
        browser = await asyncio.create_subprocess_exec(
            str(js.CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--enable-logging=stderr", f"--user-data-dir={tmp_path / 'profile'}", page,
            stdout=log, stderr=log,
        )  # fmt: skip
        try:
            finished = await asyncio.to_thread(page_server.done.wait, 60)
        finally:
            if browser.returncode is None:
                browser.kill()
            await browser.wait()
    console = log_file.read_text(errors="replace")[-4000:]
    assert finished, f"the page reported nothing within 60 s; chromium said:\n{console}"
    result = page_server.result
    assert result is not None and "error" not in result, f"{result}\n{console}"
    assert result["count"] == 2 and result["users"] == ["alice", "bob"]
    assert result["bob"] == [["join", "bob", "chat.jsp"], ["leave", "bob", "chat.jsp"]]
    assert result["refused"] == "forbidden"

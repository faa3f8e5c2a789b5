"""The real ``@stomp/stompjs`` client (npm, tests/stomp-node/) against a real
gateway over TLS, with real signed tokens and the real RabbitMQ: in Node, and
in headless Chromium from the library's own browser bundle.

``scripts/setup`` installs the npm project when it is missing: no skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import shutil
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

pytestmark = pytest.mark.integration

NODE_PROJECT = Path(__file__).resolve().parents[1] / "stomp-node"
BUNDLE = NODE_PROJECT / "node_modules" / "@stomp" / "stompjs" / "bundles" / "stomp.umd.js"
CHROMIUM = Path("/usr/bin/chromium")


def _installed() -> None:
    assert shutil.which("node"), "node is missing (scripts/setup expects it)"
    assert BUNDLE.exists(), "the npm project is not installed: run `bash scripts/setup`"


async def _run(*command: str, timeout: float = 90) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=NODE_PROJECT,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


def _check_basics(basics: dict[str, Any]) -> str:
    """What every stompjs run must have seen; returns the first message's seq."""
    connected = basics["connected"]
    assert connected["version"] == "1.2"
    assert connected["server"].startswith("rabbitgate/")
    assert connected["session"] and connected["heart-beat"]
    assert "x-seq" in basics["subscribeReceipt"]
    assert basics["confirms"] == ["send-0", "send-1", "send-2"]
    received = basics["received"]
    bodies = [m["body"] for m in received]
    assert bodies[:3] == ['{"n":0}', '{"n":1}', '{"n":2}']
    assert bodies[3] == '"plain text"'  # no content-type: the body is data as a string
    first = received[0]["headers"]
    assert first["subscription"] == "sub-a"
    assert first["destination"] == "/topic/chat.js"
    assert first["content-type"] == "application/json"
    assert first["x-from"] == "bob"
    seqs = [int(m["headers"]["x-seq"]) for m in received]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert basics["errors"] == []
    return str(first["x-seq"])


def _check_refusals(result: dict[str, Any]) -> None:
    for case, code, close in [
        ("queue", "bad_request", 1002),
        ("wildcard", "bad_request", 1002),
        ("ack", "bad_request", 1002),
        ("forbidden", "forbidden", 1008),
    ]:
        (error,) = result[case]["errors"]
        assert error["message"] == code, (case, error)
        assert result[case]["closes"] == [close], case
    bad = result["badPasscode"]
    assert bad["connected"] is None and bad["errors"][0]["message"] == "unauthorized"
    assert bad["closes"] == [4401]
    expiry = result["expiry"]
    assert expiry["connected"] is not None
    assert expiry["errors"][0]["message"] == "unauthorized"
    assert "expired" in expiry["errors"][0]["body"]
    assert expiry["closes"] == [4401]


async def test_stompjs_in_node(
    gateway: Gateway, certs: Any, make_token: Callable[..., str], tmp_path: Path
) -> None:
    _installed()
    config = {
        "url": f"wss://localhost:{gateway.port}/ws",
        "ca": str(certs.ca_cert),
        "tokens": {
            "alice": make_token("alice"),
            "bob": make_token("bob"),
            "carol": make_token("carol"),
            "expiring": make_token("erin", ttl=4),
        },
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    result = json.loads(await _run("node", "scenarios.mjs", str(config_file)))
    assert "error" not in result, result
    since = _check_basics(result["basics"])
    replay = result["replay"]
    assert [m["body"] for m in replay] == ['{"n":1}', '{"n":2}', '"plain text"']
    assert replay[0]["headers"]["x-recovered"] == "true"
    assert all("x-recovered" not in m["headers"] for m in replay[1:])
    assert int(replay[0]["headers"]["x-seq"]) > int(since)
    _check_refusals(result)


PRESENCE_POLICY = """
version: 1
rules:
  - channel: "room.{{name}}"
    exchange: {p}.rooms
    subscribe: [role:member]
    publish: [role:member]
    presence: [role:member]
  - channel: "secret.{{name}}"
    exchange: {p}.secret
    subscribe: [anyone]
"""


async def test_stompjs_asks_presence_in_node(
    settings: Settings,
    cleanup_broker: None,
    exchange_prefix: str,
    certs: Any,
    make_token: Callable[..., str],
    tmp_path: Path,
) -> None:
    _installed()
    folder = tmp_path / "presence-policies"
    folder.mkdir()
    (folder / "10-rooms.yaml").write_text(PRESENCE_POLICY.format(p=exchange_prefix))
    custom = dataclasses.replace(
        settings, policies_dir=folder, redis_url="redis://127.0.0.1:6379/0"
    )
    gw = Gateway(custom, load_policy_set(folder))
    await gw.start()
    try:
        config = {
            "url": f"wss://localhost:{gw.port}/ws",
            "ca": str(certs.ca_cert),
            "tokens": {"alice": make_token("alice"), "bob": make_token("bob")},
        }
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps(config))
        result = json.loads(await _run("node", "presence.mjs", str(config_file)))
    finally:
        await gw.stop()
    assert "error" not in result, result
    answer = result["answer"]
    assert answer["headers"]["destination"] == "/presence/room.js"
    assert answer["headers"]["x-event"] == "presence"
    assert answer["headers"]["subscription"].startswith("sub-")  # stompjs named it
    assert answer["body"]["type"] == "presence" and answer["body"]["channel"] == "room.js"
    assert answer["body"]["count"] == 1
    assert [c["user"] for c in answer["body"]["clients"]] == ["alice"]
    assert result["again"]["body"] == answer["body"]
    assert result["again"]["headers"]["subscription"] != answer["headers"]["subscription"]
    assert result["errorsBefore"] == 0  # asking and unsubscribing raised nothing
    (error,) = result["forbidden"]["errors"]
    assert error["message"] == "forbidden"
    assert error["body"] == "not allowed to see presence of secret.js"
    assert result["forbidden"]["closes"] == [1008]


# --- Chromium ---------------------------------------------------------------------

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>stompjs in the browser</title>
<script src="/stomp.umd.js"></script>
<script type="module">
const params = new URLSearchParams(location.search);
const url = params.get("ws");
const token = (sub, ttl) => fetch(`/token?sub=${sub}&ttl=${ttl || 600}`).then((r) => r.text());
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(predicate, what, ms = 10000) {
  const end = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await pause(10);
  }
}
function open(passcode) {
  const seen = { connected: null, errors: [], closes: [] };
  // brokerURL: the browser's own WebSocket, offering v12.stomp, v11.stomp, v10.stomp.
  const client = new StompJs.Client({
    brokerURL: url,
    connectHeaders: { login: "guest", passcode },
    reconnectDelay: 0,
    onConnect: (frame) => { seen.connected = frame.headers; },
    onStompError: (frame) => { seen.errors.push({ ...frame.headers, body: frame.body }); },
    onWebSocketClose: (event) => { seen.closes.push(event.code); },
  });
  client.activate();
  return { client, seen };
}
const receipt = (client, id) =>
  new Promise((resolve) => client.watchForReceipt(id, (frame) => resolve(frame.headers)));

async function run() {
  const alice = open(await token("alice"));
  const bob = open(await token("bob"));
  await until(() => alice.seen.connected && bob.seen.connected, "CONNECTED");
  const received = [];
  const subscribed = receipt(alice.client, "sub-receipt");
  alice.client.subscribe("/topic/chat.js",
    (m) => received.push({ headers: m.headers, body: m.body }),
    { id: "sub-a", receipt: "sub-receipt" });
  const subscribeReceipt = await subscribed;
  const confirms = [];
  for (let n = 0; n < 3; n += 1) {
    const confirmed = receipt(bob.client, `send-${n}`);
    bob.client.publish({ destination: "/topic/chat.js", body: JSON.stringify({ n }),
      headers: { "content-type": "application/json", receipt: `send-${n}` } });
    confirms.push((await confirmed)["receipt-id"]);
  }
  bob.client.publish({ destination: "/topic/chat.js", body: "plain text" });
  await until(() => received.length === 4, "four messages");
  const replayed = [];
  const carol = open(await token("carol"));
  await until(() => carol.seen.connected, "carol");
  carol.client.subscribe("/topic/chat.js",
    (m) => replayed.push({ headers: m.headers, body: m.body }),
    { "x-since": received[0].headers["x-seq"] });
  await until(() => replayed.length === 3, "the replay");
  const queue = open(await token("alice"));
  await until(() => queue.seen.connected, "queue");
  queue.client.subscribe("/queue/jobs", () => {});
  await until(() => queue.seen.closes.length > 0, "the refusal");
  const expiring = open(await token("erin", 2));
  await until(() => expiring.seen.closes.length > 0, "the expiry", 15000);
  for (const c of [alice, bob, carol, queue, expiring]) await c.client.deactivate();
  return {
    basics: { connected: alice.seen.connected, subscribeReceipt, confirms, received,
      errors: alice.seen.errors.concat(bob.seen.errors) },
    replay: replayed,
    queue: { errors: queue.seen.errors, closes: queue.seen.closes },
    expiry: { connected: expiring.seen.connected, errors: expiring.seen.errors,
      closes: expiring.seen.closes },
  };
}
let result;
try { result = await run(); } catch (error) { result = { error: String(error) }; }
await fetch("/result", { method: "POST", body: JSON.stringify(result) });
</script>
"""


class _PageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, make_token: Callable[..., str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.make_token = make_token
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _PageServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/":
            self._reply(PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/stomp.umd.js":
            self._reply(BUNDLE.read_bytes(), "text/javascript; charset=utf-8")
        elif url.path == "/token":
            token = self.server.make_token(query["sub"][0], ttl=float(query["ttl"][0]))
            self._reply(token.encode(), "text/plain")
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.result = orjson.loads(body)
        self._reply(b"ok", "text/plain")
        self.server.done.set()

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def page_server(make_token: Callable[..., str]) -> Iterator[_PageServer]:
    server = _PageServer(make_token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_stompjs_in_chromium(
    gateway: Gateway, page_server: _PageServer, tmp_path: Path
) -> None:
    _installed()
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup` (CI does)"
    )
    # The gateway keeps TLS on; this browser profile alone accepts the test CA's
    # certificate without trusting it (the page itself comes over plain HTTP).
    ws_url = f"wss://localhost:{gateway.port}/ws"
    page = f"http://127.0.0.1:{page_server.server_port}/?ws={urllib.parse.quote(ws_url)}"
    log_file = tmp_path / "chromium.log"
    with log_file.open("wb") as log:
        browser = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--ignore-certificate-errors",
            "--enable-logging=stderr",
            f"--user-data-dir={tmp_path / 'profile'}",
            page,
            stdout=log,
            stderr=log,
        )
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
    since = _check_basics(result["basics"])
    replay = result["replay"]
    assert [m["body"] for m in replay] == ['{"n":1}', '{"n":2}', '"plain text"']
    assert replay[0]["headers"]["x-recovered"] == "true"
    assert int(replay[0]["headers"]["x-seq"]) > int(since)
    (error,) = result["queue"]["errors"]
    assert error["message"] == "bad_request" and result["queue"]["closes"] == [1002]
    expiry = result["expiry"]
    assert expiry["connected"] is not None and expiry["closes"] == [4401]
    assert expiry["errors"][0]["message"] == "unauthorized"

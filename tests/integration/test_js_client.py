"""The browser client (clients/js/rabbitgate.js) in a real headless Chromium
against a real gateway on the real RabbitMQ.

Browsers do not trust our development CA, so this gateway runs with TLS off
(as behind a TLS-terminating proxy). A local HTTP server gives the page the
module, fresh tokens (``/token``), a way to have the server drop the page's
connection (``/drop``), and takes the page's result back (``POST /result``).
Chromium must be installed (``scripts/setup`` installs it in CI): no skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import serve

from gateway.app import Gateway
from gateway.config import Settings, TlsSettings
from gateway.policy.rules import load_policy_set

from .processes import free_port

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
MODULE = Path(__file__).resolve().parents[2] / "clients" / "js" / "rabbitgate.js"

PAGE = r"""<!doctype html>
<meta charset="utf-8">
<title>rabbitgate browser client</title>
<pre id="result">running</pre>
<script type="module">
import {
  RabbitgateClient, SeqTracker, ClientClosed, CannotConnect, QueueFull,
  backoffDelay, tokenExpiry, shouldReconnect,
} from "/rabbitgate.js";

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

async function logic() {
  const tracker = new SeqTracker();
  tracker.add("c");
  tracker.onAck("c", 10, undefined);
  const jitter = Array.from({ length: 500 }, () => backoffDelay(4, 0.5, 30));
  return {
    ceilings: [0, 1, 2, 6, 7, 1000].map((attempt) => backoffDelay(attempt, 0.5, 30, () => 1)),
    jitterSpread: jitter.every((d) => d >= 0 && d <= 8)
      && Math.min(...jitter) < 1 && Math.max(...jitter) > 7,
    expiry: [
      typeof tokenExpiry(await token("alice")), tokenExpiry("garbage"), tokenExpiry("a.%%%.b"),
    ],
    reconnect: [1006, 4401, 4403, 1008].map((code) => shouldReconnect(code, true))
      .concat(shouldReconnect(4401, false)),
    dedup: [
      tracker.accept("c", 10), tracker.accept("c", 11), tracker.accept("c", 11),
      tracker.onAck("c", 3, false), tracker.accept("c", 4),
    ],
  };
}

async function reconnect() {
  let calls = 0;
  let release;
  const gate = new Promise((resolve) => { release = resolve; });
  const received = [];
  const lost = [];
  const client = new RabbitgateClient(wsUrl, {
    token: async () => {
      calls += 1;
      if (calls === 2) await gate; // hold the reconnect while bob publishes
      return token("alice");
    },
    onMessage: (message) => { received.push(message); },
    onRecoveryLost: (channel) => { lost.push(channel); },
    backoffBase: 0.05,
    backoffCap: 0.5,
  });
  const bob = new RabbitgateClient(wsUrl, { token: () => token("bob") });
  await client.connect();
  await bob.connect();
  await client.subscribe("chat.js");
  await client.publish("chat.js", "first");
  await until(() => received.length === 1, "first");
  const firstSession = client.session;

  await fetch("/drop?sub=alice"); // the server ends alice's connection
  await until(() => calls === 2, "the reconnect");
  await bob.publish("chat.js", "while away");
  const queued = client.publish("chat.js", "queued"); // sent after the reconnect
  release();
  await queued;
  await bob.publish("chat.js", "after");
  await until(() => received.length >= 4, "four messages");
  await pause(300); // a duplicate would show up now
  const result = {
    data: received.map((m) => m.data),
    senders: received.map((m) => m.sender),
    seqsIncrease: received.every((m, i) => i === 0 || m.seq > received[i - 1].seq),
    calls,
    lost,
    connections: client.connections,
    newSession: client.session !== null && client.session !== firstSession,
    pong: (await client.ping()) < 5,
  };
  client.close();
  bob.close();
  return result;
}

async function queueBound() {
  const client = new RabbitgateClient("ws://127.0.0.1:9/ws", { token: "t", maxQueuedPublishes: 1 });
  const waiting = client.publish("chat.q", 1).catch((e) => e);
  const beyond = await client.publish("chat.q", 2).catch((e) => e);
  client.close();
  const first = await waiting;
  return { beyond: beyond instanceof QueueFull, closed: first instanceof ClientClosed };
}

class HostileSocket {
  static opened = 0;
  constructor() {
    HostileSocket.opened += 1;
    HostileSocket.last = this;
    this.protocol = "rabbitgate.v1";
    setTimeout(() => this.onopen?.(), 0);
  }
  send(text) {
    const frame = JSON.parse(text);
    const good = { type: "message", channel: "c.x", seq: 2, data: "ok", from: "u", ts: 1 };
    if (frame.type === "auth") {
      this.emit([
        "garbage before welcome",
        '{"type":"welcome","session":"s","user":"u","heartbeat":20}',
      ]);
    } else if (frame.type === "subscribe") {
      this.emit([
        JSON.stringify({ type: "ack", id: frame.id, seq: 1 }),
        "not json", "[1,2]", "null", '"text"', '{"type":5}', '{"type":"surprise"}', '{"no":"type"}',
        new ArrayBuffer(3),
        '{"type":"message","channel":"c.x","seq":"2","data":"bad seq"}',
        '{"type":"message","channel":7,"seq":2,"data":"bad channel"}',
        '{"type":"message","channel":"c.x","seq":2.5,"data":"float seq"}',
        '{"type":"message","channel":"c.other","seq":9,"data":"not subscribed"}',
        '{"type":"ack","id":[1]}', '{"type":"ack","id":99999}', '{"type":"error"}',
        JSON.stringify(good), JSON.stringify(good), // a duplicate
        JSON.stringify({ ...good, seq: 1, data: "old" }),
        JSON.stringify({ ...good, seq: 3, data: "next", from: 7, ts: "x" }),
      ]);
    } else if (frame.type === "ping") {
      this.emit([JSON.stringify({ type: "pong", id: frame.id })]);
    }
  }
  emit(frames) {
    setTimeout(() => { for (const data of frames) this.onmessage?.({ data }); }, 0);
  }
  close() {}
}

async function hostile() {
  const received = [];
  const errors = [];
  const client = new RabbitgateClient("ws://hostile.invalid/ws", {
    token: "t",
    WebSocket: HostileSocket,
    onMessage: (m) => { received.push([m.data, m.seq, m.sender, m.ts]); },
    onError: (e) => { errors.push(e.code); },
    backoffBase: 0.01,
  });
  await client.connect();
  await client.subscribe("c.x");
  await until(() => received.length >= 2, "the good messages");
  const pong = (await client.ping()) < 5;
  HostileSocket.last.onclose({ code: 4403, reason: "banned" });
  const after = await client.ping().catch((e) => e);
  await pause(200);
  return {
    received, errors, pong,
    banned: after instanceof ClientClosed && after.closeCode === 4403,
    opened: HostileSocket.opened,
  };
}

// What no retry can fix, in a real browser: a URL that is not ws(s):// throws at
// once; through the WebSocket seam, a server that selects no subprotocol and an
// error event carrying a certificate error (what Node's `ws` reports; browsers
// say nothing) reject connect() with CannotConnect after one attempt.
class SilentSocket {
  static opened = 0;
  constructor(url, protocols) {
    SilentSocket.opened += 1;
    this.protocol = SilentSocket.selects;
    setTimeout(() => (SilentSocket.fails ? this.fail() : this.onopen?.()), 0);
  }
  fail() {
    this.onerror?.({ error: Object.assign(new Error("unable to verify the first certificate"),
      { code: "UNABLE_TO_VERIFY_LEAF_SIGNATURE" }) });
    this.onclose?.({ code: 1006, reason: "" });
  }
  send() {}
  close() {}
}

async function failFast() {
  const thrown = [];
  for (const url of ["https://127.0.0.1/ws", "http://x/ws", "127.0.0.1:8443/ws", ""]) {
    try { new RabbitgateClient(url, { token: "t" }); thrown.push("none"); }
    catch (error) {
      thrown.push(error instanceof TypeError && /must start with wss:\/\//.test(error.message));
    }
  }
  const outcomes = [];
  for (const [selects, fails] of [["", false], ["rabbitgate.v1", true]]) {
    Object.assign(SilentSocket, { opened: 0, selects, fails });
    const client = new RabbitgateClient("wss://127.0.0.1:1/ws", {
      token: "t", WebSocket: SilentSocket, backoffBase: 0.01, backoffCap: 0.02,
    });
    const error = await client.connect().then(() => null, (e) => e);
    await pause(100);
    outcomes.push({
      cannot: error instanceof CannotConnect,
      message: error?.message ?? null,
      opened: SilentSocket.opened,
      publish: await client.publish("c.x", 1).then(() => "sent", (e) => e instanceof CannotConnect),
    });
  }
  return { thrown, outcomes };
}

let result;
try {
  result = {
    logic: await logic(), reconnect: await reconnect(),
    queue: await queueBound(), hostile: await hostile(), failFast: await failFast(),
  };
} catch (error) {
  result = { error: String(error), stack: error?.stack };
}
document.getElementById("result").textContent = JSON.stringify(result);
await fetch("/result", { method: "POST", body: JSON.stringify(result) });
</script>
"""


class PageServer(http.server.ThreadingHTTPServer):
    """Serves the page, the module and tokens; takes the result back."""

    daemon_threads = True

    def __init__(self, make_token: Callable[..., str], drop: Callable[[str], None]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.make_token = make_token
        self.drop = drop
        self.tokens_issued = 0
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/":
            self._reply(PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/rabbitgate.js":
            self._reply(MODULE.read_bytes(), "text/javascript; charset=utf-8")
        elif url.path == "/token":
            self.server.tokens_issued += 1
            self._reply(self.server.make_token(query["sub"][0]).encode(), "text/plain")
        elif url.path == "/drop":
            self.server.drop(query["sub"][0])
            self._reply(b"dropped", "text/plain")
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.result = json.loads(body)
        self._reply(b"ok", "text/plain")
        self.server.done.set()

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
async def plain_gateway(settings: Settings, cleanup_broker: None) -> Any:
    plain = dataclasses.replace(settings, tls=TlsSettings(enabled=False))
    gw = Gateway(plain, load_policy_set(plain.policies_dir))
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
async def page_server(
    make_token: Callable[..., str], plain_gateway: Gateway
) -> AsyncIterator[PageServer]:
    loop = asyncio.get_running_loop()

    def drop(sub: str) -> None:  # called from the HTTP thread
        def on_loop() -> None:
            for session in list(plain_gateway.node.sessions):
                if session.principal.sub == sub:
                    session.close(4409, "dropped by the test")

        loop.call_soon_threadsafe(on_loop)

    server = PageServer(make_token, drop)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_the_browser_client_reconnects_recovers_and_survives_a_hostile_server(
    plain_gateway: Gateway, page_server: PageServer, tmp_path: Path
) -> None:
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup` (CI does)"
    )
    ws_url = f"ws://127.0.0.1:{plain_gateway.port}/ws"
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

    assert result["logic"] == {
        "ceilings": [0.5, 1, 2, 30, 30, 30],
        "jitterSpread": True,
        "expiry": ["number", None, None],
        "reconnect": [True, True, False, False, False],
        "dedup": [False, True, False, True, True],
    }
    reconnect = result["reconnect"]
    assert reconnect["data"] == ["first", "while away", "queued", "after"]
    assert reconnect["senders"] == ["alice", "bob", "alice", "bob"]
    assert reconnect["seqsIncrease"] and reconnect["lost"] == []
    assert reconnect["calls"] == 2 and reconnect["connections"] == 2
    assert reconnect["newSession"] and reconnect["pong"]
    assert result["queue"] == {"beyond": True, "closed": True}
    hostile = result["hostile"]
    assert hostile["received"] == [["ok", 2, "u", 1], ["next", 3, None, None]]
    assert hostile["errors"] == ["internal"]
    assert hostile["pong"] and hostile["banned"] and hostile["opened"] == 1
    fail_fast = result["failFast"]
    assert fail_fast["thrown"] == [True, True, True, True]
    no_subprotocol, bad_certificate = fail_fast["outcomes"]
    assert no_subprotocol["cannot"] and no_subprotocol["opened"] == 1
    assert "did not select the rabbitgate.v1 subprotocol" in no_subprotocol["message"]
    assert bad_certificate["cannot"] and bad_certificate["opened"] == 1
    assert "does not verify (UNABLE_TO_VERIFY_LEAF_SIGNATURE)" in bad_certificate["message"]
    assert no_subprotocol["publish"] is True and bad_certificate["publish"] is True


# --- the npm package ----------------------------------------------------------

PACKAGE = MODULE.parent
NODE_MODULES = PACKAGE / "node_modules"


def _npm_ready() -> None:
    assert shutil.which("node"), "node is missing: `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup`"
    assert (NODE_MODULES / ".bin" / "tsc").exists(), (
        "clients/js/node_modules is missing: run `bash scripts/setup` (npm ci)"
    )


def test_the_package_is_an_esm_module_with_types() -> None:
    package = json.loads((PACKAGE / "package.json").read_text())
    assert package["type"] == "module"
    assert package["types"] == "./rabbitgate.d.ts"
    assert package["exports"]["."] == {"types": "./rabbitgate.d.ts", "default": "./rabbitgate.js"}
    assert set(package["files"]) >= {"rabbitgate.js", "rabbitgate.d.ts", "README.md"}
    assert "dependencies" not in package  # none: one module, no build step
    assert (PACKAGE / "package-lock.json").exists()


def test_the_typescript_declarations_match_how_an_application_uses_the_module() -> None:
    """tsc (strict) compiles test/types.ts against rabbitgate.d.ts; its
    ``@ts-expect-error`` lines fail the build if the declarations accept too much."""
    _npm_ready()
    done = subprocess.run(
        [NODE_MODULES / ".bin" / "tsc", "-p", "test/tsconfig.json"],
        cwd=PACKAGE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_export_of_the_module_is_declared() -> None:
    _npm_ready()
    exported = subprocess.run(
        ["node", "--input-type=module", "-e",
         "const m = await import(process.argv[1]); console.log(Object.keys(m).sort().join(' '))",
         str(MODULE)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    declarations = (PACKAGE / "rabbitgate.d.ts").read_text()
    missing = [
        name for name in exported.stdout.split()
        if not re.search(rf"export (?:declare )?(?:class|function|const) {name}\b", declarations)
    ]  # fmt: skip
    assert missing == []


def _node_fail_fast(url: str, token: str = "t", retries: int = 0) -> dict[str, Any]:
    done = subprocess.run(
        ["node", "test/failfast.mjs", url, token, str(retries)],
        cwd=PACKAGE, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


async def test_under_node_a_certificate_that_does_not_verify_rejects_at_once(
    gateway: Gateway, make_token: Callable[..., str]
) -> None:
    """The real TLS gateway, whose dev CA Node does not trust, through the `ws` package."""
    _npm_ready()
    url = f"wss://localhost:{gateway.port}/ws"
    outcome = await asyncio.to_thread(_node_fail_fast, url, make_token("alice"))
    assert outcome["name"] == "CannotConnect", outcome
    assert "does not verify" in outcome["message"] and "certs/ca.pem" in outcome["message"]
    assert outcome["tokens"] == 1  # one attempt, no retry


async def test_under_node_a_wss_url_for_a_port_without_tls_rejects_at_once(
    gateway: Gateway,
) -> None:
    _npm_ready()
    url = f"wss://localhost:{gateway.admin_port}/ws"
    outcome = await asyncio.to_thread(_node_fail_fast, url)
    assert outcome["name"] == "CannotConnect", outcome
    assert "does not speak TLS on this port" in outcome["message"] and outcome["tokens"] == 1


async def test_under_node_a_server_that_is_not_a_rabbitgate_endpoint_rejects_at_once(
    plain_gateway: Gateway,
) -> None:
    """A wrong path on the gateway (HTTP 404), and a WebSocket server that selects
    no subprotocol."""
    _npm_ready()
    outcome = await asyncio.to_thread(
        _node_fail_fast, f"ws://127.0.0.1:{plain_gateway.port}/socket"
    )
    assert outcome["name"] == "CannotConnect", outcome
    assert "HTTP 404" in outcome["message"] and outcome["tokens"] == 1

    async def handler(ws: Any) -> None:
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:  # selects no subprotocol
        port = server.sockets[0].getsockname()[1]
        outcome = await asyncio.to_thread(_node_fail_fast, f"ws://127.0.0.1:{port}/ws")
    assert outcome["name"] == "CannotConnect", outcome
    assert "rabbitgate.v1 subprotocol" in outcome["message"] and outcome["tokens"] == 1


def test_under_node_a_network_failure_is_retried() -> None:
    """Nobody listening on the port: the client tries again (the script reports the
    third attempt and stops), where a certificate or a 404 stopped it at the first."""
    _npm_ready()
    port = free_port()  # nobody listening on it
    outcome = _node_fail_fast(f"ws://127.0.0.1:{port}/ws", "t", retries=3)
    assert outcome == {"name": "retried", "tokens": 3}

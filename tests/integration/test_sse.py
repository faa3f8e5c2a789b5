"""Server-Sent Events (spec section 8) on a real gateway: a real HTTP client
reading the stream over TLS, and a browser's EventSource in headless Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.app import Gateway
from gateway.config import Settings, TlsSettings
from gateway.limits.restrictions import Rule as Restriction
from gateway.policy.rules import load_policy_set, parse_policy_files
from gateway.transports.sse import EventIds

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")


class EventStream:
    """Reads one text/event-stream response into events (comments kept apart)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, timeout: float = 5) -> dict[str, str] | None:
        """The next event ({"event", "data", "id"?}); None at the end of the stream."""
        event: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if "data" in event:
                    return event
                event = {}
                continue
            if text.startswith(":"):
                self.comments.append(text[1:].strip())
                continue
            name, _, field_value = text.partition(":")
            event[name] = field_value[1:] if field_value.startswith(" ") else field_value

    async def next_of(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        event = await self.next(timeout)
        assert event is not None, f"the stream ended before an {kind} event"
        assert event.get("event") == kind, event
        return event

    def close(self) -> None:
        self.response.close()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


OpenFn = Callable[..., Any]


@pytest.fixture
def open_sse(
    http_session: aiohttp.ClientSession,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> OpenFn:
    async def open_stream(
        gw: Gateway,
        *channels: str,
        sub: str | None = "alice",
        token: str | None = None,
        header: bool = True,
        last_event_id: str | None = None,
        **token_args: Any,
    ) -> aiohttp.ClientResponse:
        if token is None and sub is not None:
            token = make_token(sub, **token_args)
        params = [("channel", channel) for channel in channels]
        headers = {}
        if token is not None and header:
            headers["Authorization"] = f"Bearer {token}"
        elif token is not None:
            params.append(("access_token", token))
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        scheme = "https" if gw.settings.tls.enabled else "http"
        return await http_session.get(
            f"{scheme}://localhost:{gw.sse_port}/events",
            params=params,
            headers=headers,
            ssl=client_ssl if scheme == "https" else False,
        )

    return open_stream


async def stream_of(open_sse: OpenFn, gw: Gateway, *channels: str, **kw: Any) -> EventStream:
    response = await open_sse(gw, *channels, **kw)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    return EventStream(response)


async def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def sse_streams(gw: Gateway) -> list[Any]:
    return [s for s in gw.node.sessions if s.kind == "sse"]


async def test_an_sse_event_carries_the_same_json_as_a_websocket_message(
    gateway: Gateway, connect_client: Any, open_sse: OpenFn
) -> None:
    stream = await stream_of(open_sse, gateway, "chat.same", "news.same")
    alice_ws = await connect_client("alice")
    await alice_ws.request("subscribe", channel="chat.same")
    bob = await connect_client("bob")
    for text in ("one", "two"):
        assert (await bob.request("publish", channel="chat.same", data={"t": text}))[
            "type"
        ] == "ack"

    over_ws = await alice_ws.messages_until(2)
    events = [await stream.next_of("message"), await stream.next_of("message")]
    assert [orjson.loads(e["data"]) for e in events] == over_ws
    assert over_ws[0]["from"] == "bob" and over_ws[1]["data"] == {"t": "two"}
    positions = [EventIds(["chat.same", "news.same"]).decode(e["id"]) for e in events]
    assert [p["chat.same"] for p in positions] == [m["seq"] for m in over_ws]
    # news.same had no message: its position is where its exchange's stream
    # stood at the subscribe, a valid Last-Event-ID point.
    assert isinstance(positions[0]["news.same"], int)
    assert positions[0]["news.same"] == positions[1]["news.same"]
    assert stream.response.headers["Cache-Control"].startswith("no-cache")
    # One subscriber in the hub per channel, like a WebSocket session.
    (sse,) = sse_streams(gateway)
    assert set(sse.subscriptions) == {"chat.same", "news.same"}
    stream.close()
    await until(lambda: not sse_streams(gateway), "the stream to leave the node")
    assert list(gateway.node.hub.subscribers("news.same")) == []


async def test_refusals_come_before_the_stream(
    gateway: Gateway, open_sse: OpenFn, make_token: Callable[..., str]
) -> None:
    cases = [
        ({"sub": None}, 401),
        ({"token": make_token("alice") + "x"}, 401),
        ({"token": make_token("alice", ttl=-60)}, 401),
        ({}, 400),  # no channel at all
        ({"channels": ("chat.#",)}, 400),
        ({"channels": ("chat.ok", "chat..bad")}, 400),
        ({"channels": tuple(f"chat.c{i}" for i in range(101))}, 400),
        ({"channels": ("chat.ok", "user.bob.inbox")}, 403),  # alice may not read bob's inbox
    ]
    for kwargs, status in cases:
        channels = kwargs.pop("channels", () if status == 400 else ("chat.ok",))
        response = await open_sse(gateway, *channels, **kwargs)
        try:
            assert response.status == status, (kwargs, await response.text())
            assert response.content_type == "application/json"
            if status == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        finally:
            response.close()
    assert sse_streams(gateway) == []
    assert len(gateway.node.hub) == 0
    failures = gateway.metrics.auth_failures
    assert failures.labels("missing")._value.get() == 1
    assert failures.labels("bad_signature")._value.get() == 1
    assert failures.labels("expired")._value.get() == 1


async def test_access_token_in_the_query_works_for_sse_only(
    gateway: Gateway,
    open_sse: OpenFn,
    connect_client: Any,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    stream = await stream_of(open_sse, gateway, "chat.query", header=False)
    bob = await connect_client("bob")
    await bob.request("publish", channel="chat.query", data="via query token")
    event = await stream.next_of("message")
    assert orjson.loads(event["data"])["data"] == "via query token"
    stream.close()

    # The WebSocket endpoint ignores it: no welcome, closed for want of an auth frame.
    query = urllib.parse.urlencode({"access_token": make_token("alice")})
    async with connect(f"wss://localhost:{gateway.port}/ws?{query}", ssl=client_ssl) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 4408


async def test_last_event_id_resumes_after_what_the_client_missed(
    gateway: Gateway, open_sse: OpenFn, connect_client: Any
) -> None:
    bob = await connect_client("bob")
    first = await stream_of(open_sse, gateway, "chat.resume")
    await bob.request("publish", channel="chat.resume", data="seen")
    seen = await first.next_of("message")
    first.close()
    await until(lambda: not sse_streams(gateway), "the first stream to end")
    for data in ("missed 1", "missed 2"):
        assert (await bob.request("publish", channel="chat.resume", data=data))["type"] == "ack"

    again = await stream_of(open_sse, gateway, "chat.resume", last_event_id=seen["id"])
    recovery = orjson.loads((await again.next_of("recovery"))["data"])
    assert recovery["channel"] == "chat.resume" and recovery["recovered"] is True
    replayed = [await again.next_of("message"), await again.next_of("message")]
    assert [orjson.loads(e["data"])["data"] for e in replayed] == ["missed 1", "missed 2"]
    await bob.request("publish", channel="chat.resume", data="live")
    live = await again.next_of("message")
    assert orjson.loads(live["data"])["data"] == "live"
    seqs = [
        EventIds(["chat.resume"]).decode(e["id"])["chat.resume"] for e in (seen, *replayed, live)
    ]  # type: ignore[index]
    assert seqs == sorted(set(seqs))
    again.close()

    # An id that is not ours recovers nothing, and says so.
    garbage = await stream_of(open_sse, gateway, "chat.resume", last_event_id="not-an-id")
    recovery = orjson.loads((await garbage.next_of("recovery"))["data"])
    assert recovery["recovered"] is False
    await bob.request("publish", channel="chat.resume", data="after garbage")
    assert orjson.loads((await garbage.next_of("message"))["data"])["data"] == "after garbage"
    garbage.close()


async def test_heartbeats_flow_and_token_expiry_ends_the_stream(
    settings: Settings, cleanup_broker: None, open_sse: OpenFn
) -> None:
    limits = dataclasses.replace(settings.limits, heartbeat_seconds=0.2)
    gw = Gateway(
        dataclasses.replace(settings, limits=limits), load_policy_set(settings.policies_dir)
    )
    await gw.start()
    try:
        stream = await stream_of(open_sse, gw, "chat.expiry", ttl=3)  # exp: 2 to 3 s from now
        ended = await stream.next_of("gateway-error", timeout=10)
        assert orjson.loads(ended["data"]) == {
            "type": "error",
            "code": "unauthorized",
            "message": "token expired",
        }
        assert await stream.next(timeout=5) is None  # and the stream is over
        assert stream.comments.count("heartbeat") >= 5
        await until(lambda: not sse_streams(gw), "the stream to leave the node")
        assert gw.metrics.connections_closed.labels("4401")._value.get() == 1
    finally:
        await gw.stop()


async def test_a_policy_reload_ends_a_stream_whose_channels_are_no_longer_allowed(
    gateway: Gateway, open_sse: OpenFn, exchange_prefix: str
) -> None:
    stream = await stream_of(open_sse, gateway, "chat.revoked")
    revoked = f"""
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {exchange_prefix}.chat
    subscribe: [nobody]
    publish: [nobody]
"""
    assert await gateway.node.swap_policies(parse_policy_files({"10.yaml": revoked})) == 1
    forbidden = orjson.loads((await stream.next_of("gateway-error"))["data"])
    assert (forbidden["code"], forbidden["channel"]) == ("forbidden", "chat.revoked")
    last = orjson.loads((await stream.next_of("gateway-error"))["data"])
    assert last["code"] == "forbidden" and "channel" not in last
    assert await stream.next() is None


async def test_gateway_stop_ends_streams_with_a_reason(
    settings: Settings, cleanup_broker: None, open_sse: OpenFn
) -> None:
    gw = Gateway(settings, load_policy_set(settings.policies_dir))
    await gw.start()
    stream = await stream_of(open_sse, gw, "chat.bye")
    stopping = asyncio.create_task(gw.stop())
    try:
        ended = orjson.loads((await stream.next_of("gateway-error"))["data"])
        assert ended["code"] == "unavailable"
        assert await stream.next() is None
    finally:
        await stopping


async def test_a_slow_sse_consumer_is_dropped_with_a_bounded_buffer(
    settings: Settings,
    cleanup_broker: None,
    exchange_prefix: str,
    amqp: aio_pika.abc.AbstractConnection,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    limits = dataclasses.replace(
        settings.limits, send_buffer_bytes=256 * 1024, send_buffer_messages=50
    )
    gw = Gateway(
        dataclasses.replace(settings, limits=limits), load_policy_set(settings.policies_dir)
    )
    await gw.start()
    try:
        # A client that sends its request and then never reads a byte.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.sse_port or 0))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_ssl, server_hostname="localhost", limit=1024
        )
        token = make_token("alice")
        writer.write(
            b"GET /events?channel=chat.slow HTTP/1.1\r\nHost: localhost\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        await until(lambda: len(sse_streams(gw)) == 1, "the stream to start")
        (stream,) = sse_streams(gw)

        channel = await amqp.channel()
        exchange = await channel.get_exchange(f"{exchange_prefix}.chat")
        body = orjson.dumps("x" * 50_000)
        high_water = 0
        for _ in range(300):
            await exchange.publish(aio_pika.Message(body), routing_key="chat.slow")
            high_water = max(high_water, stream.outbox.pending()[0])
            if stream not in gw.node.sessions:
                break
        await until(lambda: not sse_streams(gw), "the slow consumer to be dropped", timeout=30)
        assert high_water <= limits.send_buffer_bytes
        assert stream.end_code == 4409
        assert gw.metrics.connections_closed.labels("4409")._value.get() == 1
        assert list(gw.node.hub.subscribers("chat.slow")) == []
        writer.transport.abort()
    finally:
        await gw.stop()


# --- a browser's EventSource --------------------------------------------------

PAGE = """<!doctype html><meta charset="utf-8"><title>sse</title>
<script>
const params = new URLSearchParams(location.search);
// One POST after the other, so the reports arrive in the order the events did.
let chain = Promise.resolve();
const report = (body) => {
  chain = chain.then(() => fetch("/report", {method: "POST", body: JSON.stringify(body)}));
};
const source = new EventSource(params.get("sse"));
source.onopen = () => report({open: true});
source.addEventListener("message", (e) => report({id: e.lastEventId, data: e.data}));
source.onerror = () => report({error: source.readyState});
</script>
"""


class ReportServer(http.server.ThreadingHTTPServer):
    """Serves the page and keeps what the page POSTs back."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReportHandler)
        self.reports: list[dict[str, Any]] = []
        self.lock = threading.Lock()


class _ReportHandler(http.server.BaseHTTPRequestHandler):
    server: ReportServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0"))
        report = json.loads(self.rfile.read(length))
        with self.server.lock:
            self.server.reports.append(report)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


async def test_a_browser_eventsource_receives_messages(
    settings: Settings,
    cleanup_broker: None,
    make_token: Callable[..., str],
    tmp_path: Path,
) -> None:
    assert CHROMIUM.exists(), (
        "chromium is missing: run `RABBITGATE_BROWSER_TESTS=1 bash scripts/setup` (CI does)"
    )
    plain = dataclasses.replace(settings, tls=TlsSettings(enabled=False), sse_port=0)
    gw = Gateway(plain, load_policy_set(plain.policies_dir))
    await gw.start()
    server = ReportServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    log_file = tmp_path / "chromium.log"
    browser = None
    try:
        query = urllib.parse.urlencode(
            [("channel", "chat.browser"), ("access_token", make_token("alice"))]
        )
        sse_url = f"http://127.0.0.1:{gw.sse_port}/events?{query}"
        page = f"http://127.0.0.1:{server.server_port}/?" + urllib.parse.urlencode({"sse": sse_url})
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
                f"--user-data-dir={tmp_path / 'profile'}",
                page,
                stdout=log,
                stderr=log,
            )

        def reports() -> list[dict[str, Any]]:
            with server.lock:
                return list(server.reports)

        def console() -> str:
            return log_file.read_text(errors="replace")[-3000:]

        try:
            await until(lambda: {"open": True} in reports(), "EventSource to open", timeout=60)
        except AssertionError:
            raise AssertionError(f"no open report: {reports()}\n{console()}") from None
        headers = {"Authorization": f"Bearer {make_token('bob')}"}
        async with connect(f"ws://127.0.0.1:{gw.port}/ws", additional_headers=headers) as bob:
            assert orjson.loads(await bob.recv())["type"] == "welcome"
            for i in range(3):
                frame = {"type": "publish", "id": i, "channel": "chat.browser", "data": {"n": i}}
                await bob.send(orjson.dumps(frame).decode())
                assert orjson.loads(await bob.recv()) == {"type": "ack", "id": i}

        def received() -> list[dict[str, Any]]:
            return [r for r in reports() if "data" in r]

        await until(lambda: len(received()) == 3, "the browser to report 3 events", timeout=20)
        frames = [orjson.loads(r["data"]) for r in received()]
        assert [f["data"] for f in frames] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert all(f["type"] == "message" and f["from"] == "bob" for f in frames)
        ids = [EventIds(["chat.browser"]).decode(r["id"]) for r in received()]
        assert ids == [{"chat.browser": f["seq"]} for f in frames]
        assert not [r for r in reports() if "error" in r], console()
    finally:
        if browser is not None and browser.returncode is None:
            browser.kill()
            await browser.wait()
        server.shutdown()
        server.server_close()
        thread.join(5)
        await gw.stop()


async def test_sse_streams_count_against_the_connection_limits(
    settings: Settings, cleanup_broker: None, open_sse: OpenFn, connect_client: Any
) -> None:
    limits = dataclasses.replace(settings.limits, max_connections_per_user=2)
    gw = Gateway(
        dataclasses.replace(settings, limits=limits), load_policy_set(settings.policies_dir)
    )
    await gw.start()
    try:
        await connect_client("alice", gw=gw)  # WebSocket and SSE share the cap
        first = await stream_of(open_sse, gw, "chat.cap")
        refused = await open_sse(gw, "chat.cap")
        assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
        refused.close()
        assert gw.metrics.rate_limited.labels("connections_per_user")._value.get() == 1
        first.close()
        await until(lambda: not sse_streams(gw), "the first stream to end")

        async def admitted() -> bool:
            response = await open_sse(gw, "chat.cap")
            response.close()
            return response.status == 200

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not await admitted():  # the slot comes back once the handler has finished
            assert loop.time() < deadline, "the released slot was never given back"
            await asyncio.sleep(0.05)
    finally:
        await gw.stop()


async def test_banned_users_and_addresses_get_no_stream(gateway: Gateway, open_sse: OpenFn) -> None:
    restrictions = gateway.node.restrictions
    restrictions.add(Restriction("user", "mallory", "ban", time.time() + 60))
    refused = await open_sse(gateway, "chat.ban", sub="mallory")
    assert refused.status == 403 and "banned" in await refused.text()
    refused.close()

    stream = await stream_of(open_sse, gateway, "chat.ban")  # alice, not banned
    restrictions.add(Restriction("address", "127.0.0.1", "ban", time.time() + 60))
    for live in sse_streams(gateway):  # what the detector does to live connections
        live.close(4403, "banned")
    ended = orjson.loads((await stream.next_of("gateway-error"))["data"])
    assert (ended["code"], ended["message"]) == ("forbidden", "banned")
    assert await stream.next() is None
    again = await open_sse(gateway, "chat.ban")
    assert again.status == 403
    again.close()
    assert gateway.metrics.connections_closed.labels("4403")._value.get() == 1


async def test_the_operators_list_counts_the_frames_written_to_a_stream(
    gateway: Gateway, connect_client: Any, open_sse: OpenFn
) -> None:
    from gateway.operations.connections import ConnectionFilter

    async def written() -> Any:
        (row,) = (await gateway.connections.list(ConnectionFilter(user="carol")))["connections"]
        assert row["transport"] == "sse"
        return row["messages_out"]

    stream = await stream_of(open_sse, gateway, "chat.counted", sub="carol")
    before = await written()
    assert isinstance(before, int)
    bob = await connect_client("bob")
    for n in range(3):
        assert (await bob.request("publish", channel="chat.counted", data=n))["type"] == "ack"
    for _ in range(3):
        await stream.next_of("message")
    assert await written() == before + 3
    stream.close()

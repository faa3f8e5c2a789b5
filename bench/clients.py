"""Subscribers and publishers for both targets, and the client worker process.

A message's JSON body is ``{"t":<time.time_ns() at send>,"p":"<padding>"}``,
padded to the requested size, for both targets. A subscriber finds ``"t":``
in each payload it receives (a rabbitgate ``message`` frame or a STOMP
``MESSAGE`` frame) and records now - t. Publishers ask for a confirmation of
every message (rabbitgate: a publish ``id``, acked after RabbitMQ's confirm;
STOMP: a ``receipt`` header, answered after the broker's confirm) and keep at
most ``window`` unconfirmed.

Workers run in their own processes (``worker_main``), take commands over a
pipe and answer with plain dicts, so the controller can spread thousands of
connections over several cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import time
from array import array
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import orjson

from bench.wire import WsClient, open_ws
from gateway.config import JwtSettings
from gateway.devtools.devtokens import mint_token

_SEND_TIME = re.compile(rb'"t":(\d+)')
_BODY_OVERHEAD = len(b'{"t":1234567890123456789,"p":""}')
STOMP_DESTINATION = "/topic/{channel}"


def body_padding(size: int) -> bytes:
    return b"x" * max(0, size - _BODY_OVERHEAD)


def make_body(padding: bytes) -> bytes:
    return b'{"t":%d,"p":"%s"}' % (time.time_ns(), padding)


def stomp_frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = "".join(f"{name}:{value}\n" for name, value in headers.items())
    return f"{command}\n{head}\n".encode() + body + b"\x00"


class Stats:
    """Counters of one worker; only what happens while ``measuring`` counts."""

    def __init__(self) -> None:
        self.measuring = False
        self.received = 0
        self.latencies_ns: array[int] = array("q")
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.other = 0
        self.error_samples: list[str] = []

    def reset(self) -> None:
        self.received = self.sent = self.acked = self.errors = self.other = 0
        self.latencies_ns = array("q")
        self.error_samples = []

    def on_message(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        """A subscriber's text payload (buffer slice, valid only during the call)."""
        found = _SEND_TIME.search(buf, start, end)
        if found is None:
            self._not_a_message(buf, start, end)
            return
        if self.measuring:
            self.received += 1
            self.latencies_ns.append(now_ns - int(found.group(1)))

    def _not_a_message(self, buf: bytearray, start: int, end: int) -> None:
        if buf.startswith(b'{"type":"error"', start) or buf.startswith(b"ERROR", start):
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(bytes(buf[start : min(end, start + 200)]).decode())
        else:
            self.other += 1

    def report(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "latencies_ns": self.latencies_ns.tobytes(),
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "other": self.other,
            "error_samples": self.error_samples,
        }


# --- connecting --------------------------------------------------------------


def _ssl_context(endpoint: dict[str, Any]) -> ssl.SSLContext | None:
    ca_file = endpoint.get("ca_file")
    if not ca_file:
        return None
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)


class Connector:
    """Opens authenticated connections to one endpoint (``target.*.endpoint()``)."""

    def __init__(self, endpoint: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.kind = endpoint["kind"]
        self.ssl = _ssl_context(endpoint)
        self._jwt: JwtSettings | None = None
        if self.kind in ("gateway", "gateway-stomp"):
            self._jwt = JwtSettings(
                algorithms=("HS256",),
                secret=endpoint["jwt_secret"],
                issuer=endpoint["issuer"],
                audience=endpoint["audience"],
            )

    def token(self, sub: str) -> str:
        assert self._jwt is not None
        return mint_token(self._jwt, sub=sub, roles=["bench"], ttl_seconds=3600)

    async def open(self, sub: str, token: str | None = None) -> WsClient:
        """A connection past ``welcome`` (rabbitgate) or ``CONNECTED`` (STOMP)."""
        e = self.endpoint
        if self.kind == "gateway":
            headers = {"Authorization": f"Bearer {token or self.token(sub)}"}
            client = await open_ws(
                e["host"],
                e["port"],
                e["path"],
                ssl_context=self.ssl,
                server_hostname=e["server_hostname"],
                subprotocol="rabbitgate.v1",
                headers=headers,
            )
            welcome = await client.next_text()
            if not welcome.startswith(b'{"type":"welcome"'):
                client.close()
                raise ConnectionError(f"expected welcome, got {welcome[:120]!r}")
            heartbeat = orjson.loads(welcome).get("heartbeat")
            if isinstance(heartbeat, int | float) and heartbeat > 0:
                client.heartbeat = float(heartbeat)
            return client
        if self.kind == "socketio":
            client = await open_ws(e["host"], e["port"], e["path"])
            opened = await client.next_text()  # Engine.IO "open": 0{"sid":...}
            if not opened.startswith(b"0{"):
                client.close()
                raise ConnectionError(f"expected an Engine.IO open, got {opened[:120]!r}")
            client.send_text(b"40")  # Socket.IO CONNECT to the main namespace
            connected = await client.next_text()
            if not connected.startswith(b"40"):
                client.close()
                raise ConnectionError(f"expected a Socket.IO CONNECT, got {connected[:120]!r}")
            return client
        if self.kind == "floor":
            return await open_ws(e["host"], e["port"], e["path"])
        if self.kind == "gateway-stomp":
            # rabbitgate's STOMP (contract section 10): the same endpoint as the
            # JSON protocol, the JWT as passcode; the frames are Web-STOMP's.
            client = await open_ws(
                e["host"],
                e["port"],
                e["path"],
                ssl_context=self.ssl,
                server_hostname=e["server_hostname"],
                subprotocol="v12.stomp",
            )
            passcode = token or self.token(sub)
        else:
            client = await open_ws(e["host"], e["port"], e["path"], subprotocol="v12.stomp")
            passcode = "guest"
        connect = {
            "accept-version": "1.2",
            "host": "/",
            "login": "guest",
            "passcode": passcode,
            "heart-beat": "0,0",
        }
        client.send_text(stomp_frame("CONNECT", connect))
        connected = await client.next_text()
        if not connected.startswith(b"CONNECTED"):
            client.close()
            raise ConnectionError(f"expected CONNECTED, got {connected[:120]!r}")
        return client

    async def subscribe(self, client: WsClient, channel: str, handler: Callable[..., None]) -> None:
        """Subscribe and wait for the confirmation, then hand payloads to ``handler``."""
        if self.kind == "gateway":
            client.send_text(orjson.dumps({"type": "subscribe", "id": 1, "channel": channel}))
            while True:
                frame = orjson.loads(await client.next_text())
                if frame.get("type") == "ack" and frame.get("id") == 1:
                    break
                if frame.get("type") == "error":
                    raise ConnectionError(f"subscribe refused: {frame}")
        elif self.kind == "socketio":
            client.send_text(b'421["subscribe",%s]' % orjson.dumps(channel))
            while True:
                frame_bytes = await client.next_text()
                if frame_bytes.startswith(b"431["):
                    break
                if frame_bytes == b"2":
                    client.send_text(b"3")
            handler = socketio_handler(client, handler)
        elif self.kind == "floor":
            client.send_text(b"subscribe")
            if await client.next_text() != b"subscribed":
                raise ConnectionError("the floor server did not confirm the subscription")
        else:
            headers = {
                "id": "0",
                "destination": STOMP_DESTINATION.format(channel=channel),
                "ack": "auto",
                "receipt": "subscribed",
            }
            client.send_text(stomp_frame("SUBSCRIBE", headers))
            while True:
                frame_bytes = await client.next_text()
                if frame_bytes.startswith(b"RECEIPT"):
                    break
                if frame_bytes.startswith(b"ERROR"):
                    raise ConnectionError(f"subscribe refused: {frame_bytes[:200]!r}")
        client.on_text = handler


def socketio_handler(client: WsClient, handler: Callable[..., None]) -> Callable[..., None]:
    """``handler`` for a Socket.IO subscriber: Engine.IO pings ("2") are answered
    ("3") so the server keeps the connection; everything else goes to ``handler``."""

    def on_text(buf: bytearray, start: int, end: int, now_ns: int) -> None:
        if end - start == 1 and buf[start] == 0x32:
            client.send_text(b"3")
            return
        handler(buf, start, end, now_ns)

    return on_text


class Publisher:
    """One publishing connection with a window of unconfirmed messages."""

    def __init__(
        self, client: WsClient, kind: str, channel: str, size: int, window: int, stats: Stats
    ) -> None:
        self.client = client
        self.stats = stats
        self.window = window
        self.inflight = 0
        self.room = asyncio.Event()
        self._padding = body_padding(size)
        self._seq = 0
        if kind == "gateway":
            self._template = b'{"type":"publish","id":%d,"channel":"' + channel.encode()
            self._template += b'","data":%s}'
            self._is_ack = self._gateway_ack
        elif kind == "socketio":
            # An event with an ack id: answered 43<id>["ok"] once emitted.
            self._template = b'42%d["publish",' + orjson.dumps(channel) + b",%s]"
            self._is_ack = self._socketio_ack
        elif kind == "floor":
            self._template = b"%s"
            self._is_ack = self._gateway_ack
        else:
            destination = STOMP_DESTINATION.format(channel=channel)
            self._template = (
                b"SEND\ndestination:" + destination.encode() + b"\ncontent-type:application/json"
                b"\nreceipt:%d\ncontent-length:%d\n\n%s\x00"
            )
            self._is_ack = self._stomp_receipt
        self._kind = kind
        client.on_text = self._on_text

    def send_one(self) -> None:
        body = make_body(self._padding)
        self._seq += 1
        if self._kind in ("gateway", "socketio"):
            payload = self._template % (self._seq, body)
        elif self._kind == "floor":
            payload = body
        else:
            payload = self._template % (self._seq, len(body), body)
        self.client.send_text(payload)
        self.inflight += 1
        if self.stats.measuring:
            self.stats.sent += 1

    def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        if end - start == 1 and buf[start] == 0x32:  # an Engine.IO ping: "2"
            self.client.send_text(b"3")
            return
        if self._is_ack(buf, start):
            self.inflight -= 1
            if self.stats.measuring:
                self.stats.acked += 1
        else:
            # An error answers one publish too: it leaves the window.
            self.inflight -= 1
            self.stats._not_a_message(buf, start, end)
        self.room.set()

    @staticmethod
    def _gateway_ack(buf: bytearray, start: int) -> bool:
        return buf.startswith(b'{"type":"ack"', start)

    @staticmethod
    def _socketio_ack(buf: bytearray, start: int) -> bool:
        return buf.startswith(b"43", start)

    @staticmethod
    def _stomp_receipt(buf: bytearray, start: int) -> bool:
        return buf.startswith(b"RECEIPT", start)

    async def run(self, rate: float, stop: asyncio.Event) -> None:
        """Publish at ``rate`` messages/s (0: as fast as the window allows) until ``stop``."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate if rate > 0 else 0.0
        due = loop.time()
        burst = 0
        while not stop.is_set() and self.client.is_open:
            if interval:
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    burst = 0
                due += interval
            while self.inflight >= self.window and not stop.is_set():
                self.room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.room.wait(), 1.0)
                burst = 0
            if stop.is_set():
                break
            self.send_one()
            burst += 1
            if burst >= 256:  # never hold the loop for long while catching up
                burst = 0
                await asyncio.sleep(0)


# --- the worker process --------------------------------------------------------


def worker_main(pipe: Connection, spec: dict[str, Any]) -> None:
    """Entry point of a client worker process (multiprocessing, spawn)."""
    from bench.target import raise_nofile_limit

    raise_nofile_limit()
    try:
        import uvloop

        uvloop.run(_worker(pipe, spec))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_worker(pipe, spec))


async def gather_limited(
    count: int, limit: int, make: Callable[[int], Any]
) -> tuple[list[Any], Counter[str]]:
    """Run ``make(i)`` for i in range(count), ``limit`` at a time; results and failures."""
    semaphore = asyncio.Semaphore(limit)
    results: list[Any] = []
    failures: Counter[str] = Counter()

    async def one(i: int) -> None:
        async with semaphore:
            try:
                results.append(await make(i))
            except Exception as exc:
                failures[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return results, failures


async def _worker(pipe: Connection, spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def on_command() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except EOFError:  # the controller went away
            loop.remove_reader(pipe.fileno())
            commands.put_nowait(("exit",))

    loop.add_reader(pipe.fileno(), on_command)
    # libuv made the pipe non-blocking; a large answer (latency samples) must
    # not fail half-written, and commands are small and arrive whole.
    os.set_blocking(pipe.fileno(), True)
    connector = Connector(spec["endpoint"])
    stats = Stats()
    channel = spec["channel"]
    name = spec["name"]

    async def open_subscriber(i: int) -> WsClient:
        client = await connector.open(f"{name}-s{i}")
        await connector.subscribe(client, channel, stats.on_message)
        return client

    async def open_publisher(i: int) -> Publisher:
        client = await connector.open(f"{name}-p{i}")
        return Publisher(client, connector.kind, channel, spec["size"], spec["window"], stats)

    limit = spec.get("connect_concurrency", 100)
    subscribers, failures = await gather_limited(spec["subscribers"], limit, open_subscriber)
    publishers, pub_failures = await gather_limited(spec["publishers"], limit, open_publisher)
    failures.update(pub_failures)
    pipe.send(
        (
            "ready",
            {
                "subscribers": len(subscribers),
                "publishers": len(publishers),
                "failures": dict(failures),
            },
        )
    )
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    clients: list[WsClient] = subscribers + [p.client for p in publishers]
    while True:
        command = await commands.get()
        kind = command[0]
        if kind == "measure_on":
            stats.reset()
            stats.measuring = True
            pipe.send(("ok",))
        elif kind == "measure_off":
            stats.measuring = False
            report = stats.report()
            report["closed"] = sum(1 for c in clients if not c.is_open)
            report["close_codes"] = dict(Counter(c.close_code for c in clients if c.close_code))
            pipe.send(("stats", report))
        elif kind == "publish_on":
            stop.clear()
            rate = spec["rate"]
            tasks = [asyncio.create_task(p.run(rate, stop)) for p in publishers]
            pipe.send(("ok",))
        elif kind == "publish_off":
            stop.set()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            pipe.send(("ok", {"inflight": sum(p.inflight for p in publishers)}))
        elif kind == "exit":
            break
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)
    with contextlib.suppress(OSError, ValueError):
        pipe.send(("bye",))

"""The fan-out load tool of bench.fleet: every subscriber and publisher in one
process, as cheap per delivered message as it can honestly be.

On a 2-core machine the load tool shares the cores with the gateway workers
and RabbitMQ, so every microsecond it spends per delivery is taken from the
workers it measures. bench/clients.py (bench.load's tool) parses every
WebSocket frame in Python, runs a regex on every message and wakes up for
every read: 7-10 us of CPU per delivery here (0.5-0.9 of a core). This
tool, after the setup (upgrade, ``welcome``, ``subscribe`` acked, on plain
blocking sockets), runs one loop over epoll without asyncio:

* **Counting, not parsing.** A subscriber's bytes are never split into
  frames: the messages in a read are counted with one ``bytes.count`` of the
  marker ``{"type":"message"`` (a C-speed scan; a marker split between two
  reads is found with the few bytes carried over). The marker cannot occur
  inside a message's ``data``: that is JSON nested in the frame, where a
  quote is escaped, and the bench's bodies are ``{"t":...,"p":"xxx..."}``.
  Error frames are counted the same way.
* **Latency sampled**, one sample per read: the send time of the last message
  in the read (``"t":<ns>``), against the time of the read. Per read, not per
  message: the percentiles are of reads (at saturation every figure is the
  queue, seconds; docs/fleet.md uses these runs for throughput only).
* **Reading in ticks.** The loop sleeps out the rest of each ``tick`` (250 ms
  by default) before it polls again, so a read carries every message that
  arrived during the tick instead of one wakeup and one ``recv`` per message.
  Most of what is left is the kernel's (loopback TCP receive, ~25-35 us per
  ``recv`` here, mostly system time): 9.5-10 us per delivery with 20 ms
  ticks, 2.2-3.9 with 100 ms, 1.4-2.0 with 250 ms (``--tick``, measured
  interleaved on this 2-vCPU VM).
  That adds at most a tick to the latency and leaves the gateway's work per
  delivery unchanged (its writes go to socket buffers of ~200 KiB either way;
  a real client on another host never costs the gateway a wakeup at all).
* **Publishers in the same loop**: each tick, every publisher tops its
  window up in one ``send``; acks are counted like messages.

No TLS (``wss://``): bench.fleet's ``--load-tool clients`` keeps bench.load's
tool for that. The gateway is started with server pings off (this tool never
parses frames, so it could not answer one; bench.fleet sets
``limits.heartbeat_seconds``): a connection the gateway closes anyway is seen
as an end of stream and reported in ``closed``.

The controller drives it over a pipe with bench.clients' commands
(``measure_on``/``measure_off``/``publish_on``/``publish_off``/``exit``), so
bench.pool's ``Worker`` runs it.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import time
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import orjson

from bench.clients import Connector, body_padding, make_body
from bench.wire import OP_TEXT, client_frame

MESSAGE = b'{"type":"message"'
ERROR = b'{"type":"error"'
ACK = b'{"type":"ack"'
SEND_TIME = b'"t":'
CARRY = len(MESSAGE) - 1  # the longest marker; shorter ones fit in its carry too
READ_BYTES = 1 << 18
SETUP_THREADS = 32
SETUP_TIMEOUT = 30.0


class SetupError(ConnectionError):
    pass


# --- setup: blocking sockets ---------------------------------------------------


class _Frames:
    """Whole server frames from a blocking socket (setup only)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise SetupError("closed by the gateway during setup")
        self.buf += data

    def headers(self) -> bytes:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > 16384:
                raise SetupError("oversized handshake answer")
            self._fill()
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        return head

    def text(self) -> bytes:
        while True:
            buf = self.buf
            if len(buf) >= 2:
                length, start = buf[1] & 0x7F, 2
                if length == 126 and len(buf) >= 4:
                    length, start = int.from_bytes(buf[2:4], "big"), 4
                elif length == 127 and len(buf) >= 10:
                    length, start = int.from_bytes(buf[2:10], "big"), 10
                if length < 126 or start > 2:
                    end = start + length
                    if len(buf) >= end:
                        opcode = buf[0] & 0x0F
                        payload = bytes(buf[start:end])
                        del buf[:end]
                        if opcode == 0x8:
                            raise SetupError(f"closed by the gateway: {payload[2:80]!r}")
                        if opcode == OP_TEXT:
                            return payload
                        continue  # a ping during setup: none are sent (heartbeats off)
            self._fill()


def _open(endpoint: dict[str, Any], token: str) -> tuple[socket.socket, _Frames]:
    sock = socket.create_connection((endpoint["host"], endpoint["port"]), timeout=SETUP_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {endpoint['path']} HTTP/1.1\r\nHost: {endpoint['host']}:{endpoint['port']}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: rabbitgate.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    sock.sendall(request.encode())
    frames = _Frames(sock)
    status = frames.headers().split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        sock.close()
        raise SetupError(f"upgrade refused: {status[:80]!r}")
    welcome = frames.text()
    if not welcome.startswith(b'{"type":"welcome"'):
        sock.close()
        raise SetupError(f"expected welcome, got {welcome[:80]!r}")
    return sock, frames


def _subscriber(endpoint: dict[str, Any], token: str, channel: str) -> tuple[socket.socket, bytes]:
    sock, frames = _open(endpoint, token)
    sock.sendall(
        client_frame(OP_TEXT, orjson.dumps({"type": "subscribe", "id": 1, "channel": channel}))
    )
    while True:
        frame = orjson.loads(frames.text())
        if frame.get("type") == "ack" and frame.get("id") == 1:
            return sock, bytes(frames.buf)
        if frame.get("type") == "error":
            sock.close()
            raise SetupError(f"subscribe refused: {frame.get('code')}")


# --- the measuring loop ----------------------------------------------------------


class Sink:
    """Counters of every connection; ``on_data`` is the whole per-read cost."""

    def __init__(self) -> None:
        self.measuring = False
        self.received = 0
        self.errors = 0
        self.sent = 0
        self.acked = 0
        self.latencies_ns: array[int] = array("q")
        self.error_samples: list[str] = []

    def reset(self) -> None:
        self.received = self.errors = self.sent = self.acked = 0
        self.latencies_ns = array("q")
        self.error_samples = []

    def error_seen(self, data: bytes, count: int) -> None:
        self.errors += count
        if len(self.error_samples) < 3:
            at = data.find(ERROR)
            if at >= 0:
                self.error_samples.append(data[at : at + 160].decode(errors="replace"))


class _Conn:
    __slots__ = ("sock", "carry", "publisher", "inflight", "closed", "out")

    def __init__(self, sock: socket.socket, publisher: bool) -> None:
        self.sock = sock
        self.carry = b""
        self.publisher = publisher
        self.inflight = 0
        self.closed = False
        self.out = b""  # a publisher's frames the socket did not take yet


def count_markers(carry: bytes, data: bytes, marker: bytes) -> int:
    """Occurrences of ``marker`` in ``carry + data`` that are not wholly in
    ``carry`` (counted with the read before). ``carry`` is shorter than the marker."""
    found = data.count(marker)
    if carry:
        found += (carry + data[: len(marker) - 1]).count(marker)
    return found


def send_time(data: bytes) -> int | None:
    """The ``"t":<ns>`` of the last message in ``data``, if it is whole there."""
    at = data.rfind(SEND_TIME)
    if at < 0:
        return None
    end = data.find(b",", at)
    digits = data[at + 4 : end]
    return int(digits) if end > 0 and digits.isdigit() else None


def sink_main(pipe: Connection, spec: dict[str, Any]) -> None:
    """Entry point of the load tool's process (bench.pool's Worker, spawn)."""
    from bench.target import raise_nofile_limit

    raise_nofile_limit()
    endpoint = spec["endpoint"]
    connector = Connector(endpoint)
    channel = spec["channel"]
    failures: Counter[str] = Counter()

    def setup(i: int) -> tuple[socket.socket, bytes, bool] | None:
        publisher = i >= spec["subscribers"]
        name = f"p{i}" if publisher else f"s{i}"
        try:
            token = connector.token(f"{spec['name']}-{name}")
            if publisher:
                sock, frames = _open(endpoint, token)
                return sock, bytes(frames.buf), True
            sock, rest = _subscriber(endpoint, token, channel)
            return sock, rest, False
        except (OSError, SetupError, ValueError) as exc:
            failures[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
            return None

    total = spec["subscribers"] + spec["publishers"]
    with ThreadPoolExecutor(SETUP_THREADS) as pool:
        opened = [c for c in pool.map(setup, range(total)) if c is not None]
    sink = Sink()
    conns: dict[int, _Conn] = {}
    poll = select.epoll()
    for sock, rest, publisher in opened:
        sock.setblocking(False)
        conn = _Conn(sock, publisher)
        conns[sock.fileno()] = conn
        poll.register(sock.fileno(), select.EPOLLIN)
        if rest:
            _on_data(conn, rest, sink, time.time_ns())
    publishers = [c for c in conns.values() if c.publisher]
    subscribed = len(conns) - len(publishers)
    pipe.send(
        (
            "ready",
            {"subscribers": subscribed, "publishers": len(publishers), "failures": dict(failures)},
        )
    )
    _run(pipe, poll, conns, publishers, sink, spec)
    for conn in conns.values():
        conn.sock.close()
    pipe.send(("bye",))


def _on_data(conn: _Conn, data: bytes, sink: Sink, now_ns: int) -> None:
    carry = conn.carry
    if conn.publisher:
        answered = count_markers(carry, data, ACK)
        failed = count_markers(carry, data, ERROR)
        conn.inflight -= answered + failed
        if sink.measuring:
            sink.acked += answered
            if failed:
                sink.error_seen(data, failed)
    else:
        found = count_markers(carry, data, MESSAGE)
        if sink.measuring:
            sink.received += found
            if found:
                sent = send_time(data)
                if sent is not None:
                    sink.latencies_ns.append(now_ns - sent)
            if ERROR in data:
                sink.error_seen(data, count_markers(carry, data, ERROR))
    conn.carry = (carry + data)[-CARRY:] if len(data) < CARRY else data[-CARRY:]


def _run(
    pipe: Connection,
    poll: select.epoll,
    conns: dict[int, _Conn],
    publishers: list[_Conn],
    sink: Sink,
    spec: dict[str, Any],
) -> None:
    tick = spec.get("tick_seconds", 0.25)
    window = spec["window"]
    channel = spec["channel"].encode()
    padding = body_padding(spec["size"])
    template = b'{"type":"publish","id":%d,"channel":"' + channel + b'","data":%s}'
    seq = 0
    publishing = False
    pipe_fd = pipe.fileno()
    poll.register(pipe_fd, select.EPOLLIN)
    recv = socket.socket.recv
    while True:
        started = time.monotonic()
        events = poll.poll(tick)
        now_ns = time.time_ns()  # one clock read per tick: a read's arrival within it
        for fd, _ in events:
            if fd == pipe_fd:
                command = pipe.recv()[0]
                if command == "exit":
                    return
                answer: tuple[Any, ...] = ("ok",)
                if command == "measure_on":
                    sink.reset()
                    sink.measuring = True
                elif command == "measure_off":
                    sink.measuring = False
                    closed = sum(1 for c in conns.values() if c.closed)
                    answer = (
                        "stats",
                        {
                            "received": sink.received,
                            "latencies_ns": sink.latencies_ns.tobytes(),
                            "sent": sink.sent,
                            "acked": sink.acked,
                            "errors": sink.errors,
                            "other": 0,
                            "error_samples": sink.error_samples,
                            "closed": closed,
                            "close_codes": {},
                        },
                    )
                elif command == "publish_on":
                    publishing = True
                elif command == "publish_off":
                    publishing = False
                    answer = ("ok", {"inflight": sum(p.inflight for p in publishers)})
                pipe.send(answer)
                continue
            conn = conns[fd]
            try:
                data = recv(conn.sock, READ_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                conn.closed = True
                poll.unregister(fd)
                continue
            _on_data(conn, data, sink, now_ns)
        if publishing:
            for p in publishers:
                if p.closed:
                    continue
                room = window - p.inflight
                if not p.out and room > 0:
                    frames = []
                    for _ in range(room):
                        seq += 1
                        frames.append(client_frame(OP_TEXT, template % (seq, make_body(padding))))
                    p.out = b"".join(frames)
                    p.inflight += room
                    if sink.measuring:
                        sink.sent += room
                if p.out:
                    # Non-blocking: what the socket does not take now goes next tick,
                    # whole frames only ever being made once.
                    try:
                        p.out = p.out[p.sock.send(p.out) :]
                    except BlockingIOError:
                        pass
                    except OSError:
                        p.closed = True
        rest = tick - (time.monotonic() - started)
        if rest > 0:
            time.sleep(rest)

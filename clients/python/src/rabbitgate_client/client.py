"""An asyncio client for rabbitgate (wire contract v1) that rides out disconnects.

    async with RabbitgateClient("wss://gw.example:8443/ws", token=fetch_token) as client:
        await client.subscribe("chat.lobby")
        await client.publish("chat.lobby", {"text": "hi"})
        async for message in client.messages():
            print(message.channel, message.seq, message.data)

By itself it authenticates with an ``auth`` frame (as a browser must), reconnects
after any disconnect with exponential backoff and full jitter, refreshes the
token in band before it expires, resubscribes with ``since`` and drops messages
it has already delivered, and queues publishes while disconnected. The pure
decisions (backoff, token expiry, close codes, seq bookkeeping) are the small
functions at the top; only ``RabbitgateClient`` does I/O.

What retrying cannot fix fails at once, with a message saying what to change:
a URL that is not ws:// or wss:// (ValueError from the constructor), a TLS
certificate that does not verify, a wss:// URL for a port without TLS, a
server that is not a rabbitgate endpoint (HTTP 400/404/405/426 to the upgrade,
or no ``rabbitgate.v1`` subprotocol): ``connect()`` raises CannotConnect. Only
network failures are retried.

It depends on websockets alone (the standard library's json, not orjson: a
client's frames are small, and one dependency less for every application).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import json
import logging
import random
import ssl as ssl_module
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

log = logging.getLogger("rabbitgate.client")

TokenSource = str | Callable[[], Awaitable[str] | str]
SUBPROTOCOL = Subprotocol("rabbitgate.v1")
CLOSE_AUTH = 4401
CLOSE_BANNED = 4403
# Close codes after which a retry cannot help (contract section 7): banned,
# or refused at connection level (origin not allowed, too many connections).
FATAL_CLOSE_CODES = frozenset({1008, CLOSE_BANNED})
STABLE_SECONDS = 10.0  # a connection that lasted this long resets the backoff
OPEN_TIMEOUT = 10.0  # TCP + TLS + upgrade + welcome
REQUEST_TIMEOUT = 10.0
MAX_ATTEMPTS = 3  # per publish/subscribe, for `unavailable` or a connection lost before the ack
# Answers to the upgrade that say "this is not a rabbitgate WebSocket endpoint":
# the same request gets the same answer, so they are not retried.
NOT_AN_ENDPOINT_STATUSES = frozenset({400, 404, 405, 426})


class RabbitgateError(Exception):
    """An ``error`` frame from the gateway (``code``: contract section 4), or a local failure."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        channel: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.retry_after, self.channel = retry_after, channel


class QueueFull(RabbitgateError):
    """``max_queued_publishes`` publishes already wait for a connection."""


class Disconnected(RabbitgateError):
    """The connection was lost before the answer came (``ping`` only; the rest is retried)."""


class ClientClosed(RabbitgateError):
    """The client stopped: ``close()`` was called, or the gateway refused it for good."""

    def __init__(self, close_code: int | None, reason: str) -> None:
        super().__init__("closed", reason)
        self.close_code = close_code


class CannotConnect(ClientClosed):
    """A failure no retry can fix (certificate, not a rabbitgate endpoint); ``reason`` says
    what to change."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Message:
    channel: str
    seq: int
    data: Any
    sender: str | None  # the publisher's verified `sub` (the frame's `from`)
    ts: int | None  # milliseconds since the epoch


# --- pure decisions ---------------------------------------------------------


def backoff_delay(
    attempt: int, base: float, cap: float, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**attempt)); spreads a reconnect storm."""
    return uniform(0.0, min(cap, base * 2 ** min(attempt, 60)))


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read WITHOUT verifying it: only to plan a refresh."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):  # binascii.Error, UnicodeDecodeError, JSONDecodeError
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def refresh_delay(exp: float | None, now: float, margin: float) -> float | None:
    """Seconds until an in-band refresh is due; None for a token that never expires."""
    return None if exp is None else max(0.0, exp - margin - now)


def handshake_refusal(status: int, retry_after: str | None) -> tuple[int | None, float]:
    """An HTTP refusal of the upgrade -> (close code it amounts to, least seconds to wait).

    403 is a banned address (like close 4403); 429 asks to wait ``Retry-After`` seconds.
    """
    if status == 403:
        return CLOSE_BANNED, 0.0
    try:
        wait = float(retry_after) if status == 429 and retry_after else 0.0
    except ValueError:  # an HTTP date: not worth parsing, the backoff still applies
        wait = 0.0
    return None, wait if 0.0 <= wait <= 3600.0 else 0.0


def check_url(url: str) -> None:
    """Raise ValueError for a URL the client can never connect to (checked before any I/O)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(
            f"rabbitgate: the gateway URL must start with wss:// (or ws:// when the gateway runs "
            f"without TLS), not {scheme + '://' if scheme else 'no scheme'}: {url!r}"
        )


def not_an_endpoint(url: str, status: int) -> str | None:
    """The reason to stop for good when the upgrade was answered ``status``; None to retry."""
    if status not in NOT_AN_ENDPOINT_STATUSES:
        return None
    return (
        f"{url} answered the WebSocket upgrade with HTTP {status}: it is not a rabbitgate "
        "endpoint (check the host, the port and the /ws path), or it refused the "
        "rabbitgate.v1 subprotocol"
    )


def certificate_reason(url: str, exc: ssl_module.SSLCertVerificationError) -> str:
    detail = exc.verify_message or str(exc)
    return (
        f"the TLS certificate of {url} does not verify ({detail}); pass "
        "ssl=ssl.create_default_context(cafile=CA_FILE) with the CA that signed it "
        "(the development gateway's is certs/ca.pem)"
    )


# OpenSSL's reasons for "the peer answered the ClientHello with something that is
# not TLS": a plain listener (a wss:// URL for a ws:// port). Not transient.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"})


def not_tls_reason(url: str, exc: ssl_module.SSLError) -> str | None:
    """The reason to stop for good after a TLS handshake error; None to retry."""
    if exc.reason not in NOT_TLS_REASONS:
        return None
    return (
        f"{url} does not speak TLS on this port ({exc.reason}): use ws:// when the gateway "
        "runs without TLS, or the port of its TLS listener"
    )


def should_reconnect(close_code: int | None, token_is_callback: bool) -> bool:
    """After the connection ended with ``close_code`` (None: never opened)."""
    if close_code in FATAL_CLOSE_CODES:
        return False
    if close_code == CLOSE_AUTH:
        return token_is_callback  # a fixed token that was refused will be refused again
    return True


@dataclass
class SeqTracker:
    """Per subscribed channel, the last seq delivered: the ``since`` of a resubscribe,
    and what is a duplicate. ``on_ack`` says when the app must reload its state."""

    last: dict[str, int | None] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)

    def add(self, channel: str) -> None:
        self.last.setdefault(channel, None)

    def remove(self, channel: str) -> None:
        self.last.pop(channel, None)
        self.acked.discard(channel)

    def since(self, channel: str) -> int | None:
        return self.last.get(channel)

    def accept(self, channel: str, seq: int) -> bool:
        """True (and remembered) for a message to deliver; False for a duplicate or a stray."""
        if channel not in self.last:
            return False
        previous = self.last[channel]
        if previous is not None and seq <= previous:
            return False
        self.last[channel] = seq
        return True

    def on_ack(self, channel: str, seq: int | None, recovered: object) -> bool:
        """Record a subscribe ack; True when messages may have been missed."""
        if channel not in self.last:
            return False
        previous = self.last[channel]
        if channel not in self.acked:  # the first subscribe: the channel's present is the start
            self.acked.add(channel)
            if seq is not None and (previous is None or seq > previous):
                self.last[channel] = seq
            return False
        if previous is None:  # resubscribed without `since`: lost only if something was published
            self.last[channel] = seq
            return seq is not None
        if recovered is True:  # the replay follows; keep `previous` so none of it is dropped
            return False
        # Not recovered (or a server that did not say): start again from the present,
        # which may be below `previous` when the history was reset.
        self.last[channel] = seq
        return True


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error(frame: dict[str, Any]) -> RabbitgateError:
    retry_after = frame.get("retry_after")
    return RabbitgateError(
        str(frame.get("code", "internal")),
        str(frame.get("message", "")),
        retry_after=retry_after if isinstance(retry_after, int | float) else None,
        channel=frame.get("channel") if isinstance(frame.get("channel"), str) else None,
    )


@dataclass(eq=False)
class _Publish:
    id: int
    text: str
    future: asyncio.Future[None]
    attempts: int = 0


# --- the client -------------------------------------------------------------


class RabbitgateClient:
    """Call ``connect()`` (or use ``async with``), then subscribe/publish; ``close()`` at the end.

    ``token`` is a string or a callable (sync or async) returning one; the callable
    is called for each (re)connect and each refresh. ``on_message(message)`` and
    ``on_recovery_lost(channel)`` may be plain functions or coroutines; both run in
    order with the messages, off the reader. Without ``on_message``, read
    ``messages()``. ``on_error(error)`` hears errors no call waits for (a
    subscription ended by the policies, a resubscribe refused).
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource,
        ssl: ssl_module.SSLContext | None = None,
        on_message: Callable[[Message], Any] | None = None,
        on_recovery_lost: Callable[[str], Any] | None = None,
        on_error: Callable[[RabbitgateError], Any] | None = None,
        max_queued_publishes: int = 1000,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        refresh_margin: float = 30.0,
    ) -> None:
        check_url(url)
        self.url = url
        self._token = token
        self._connect_kwargs: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
        self._on_message, self._on_recovery_lost, self._on_error = (
            on_message,
            on_recovery_lost,
            on_error,
        )
        self.max_queued_publishes = max_queued_publishes
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.refresh_margin = refresh_margin
        self.session: str | None = None  # the gateway's session id, while connected
        self.connections = 0  # how many times a welcome was received
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()  # set while connected, and for good once stopped
        self._closed: ClientClosed | None = None
        self._fatal = False
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._subscribing: dict[int, str] = {}  # subscribe request id -> channel
        self._queue: deque[_Publish] = deque()  # publishes waiting for a connection, in order
        self._inflight: dict[int, _Publish] = {}  # sent, waiting for the ack
        self._tracker = SeqTracker()
        self._first_ack: dict[str, asyncio.Future[None]] = {}
        self._inbox: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._sending_on: ClientConnection | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RabbitgateClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the connection loop; return at the first ``welcome``.

        Raises CannotConnect at once for what no retry can fix (a certificate that
        does not verify, a server that is not a rabbitgate endpoint), ClientClosed
        when the gateway refuses for good (banned, policy, a fixed token refused).
        Retries network failures forever, logging a WARNING for the first one:
        bound the wait with ``asyncio.timeout`` if needed.
        """
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
            if self._on_message is not None:
                self._spawn(self._dispatch_loop())
        await self._wait_ready()

    async def close(self) -> None:
        """Close the connection and stop; queued and unacked publishes fail with ClientClosed."""
        self._stop(ClientClosed(1000, "closed by the client"), fatal=False)
        if self._ws is not None:
            await self._ws.close()
        for task in [self._runner, *self._tasks]:
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def subscribe(self, channel: str) -> None:
        """Subscribe (once; resubscribed with ``since`` after every reconnect).

        Waits for the first ack; raises RabbitgateError (``forbidden``, ...) if refused.
        """
        if channel not in self._tracker.last:
            self._tracker.add(channel)
            self._first_ack[channel] = asyncio.get_running_loop().create_future()
            if self._ws is not None and self._ready.is_set():
                self._spawn(self._subscribe_on(self._ws, channel))
        if channel in self._first_ack:
            await asyncio.shield(self._first_ack[channel])

    async def unsubscribe(self, channel: str) -> None:
        self._tracker.remove(channel)
        if (waiter := self._first_ack.pop(channel, None)) is not None:
            waiter.cancel()
        if self._ws is not None and self._ready.is_set():
            with contextlib.suppress(Disconnected):
                await self._request(self._ws, {"type": "unsubscribe", "channel": channel})

    async def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` (any JSON value); return once RabbitMQ confirmed it.

        While disconnected the publish waits in order in a bounded queue (QueueFull
        beyond ``max_queued_publishes``). ``unavailable`` and a connection lost
        before the ack are retried (at most MAX_ATTEMPTS sends, so a publish may
        arrive twice); other error frames raise RabbitgateError.
        """
        if self._closed is not None:
            raise self._closed
        if len(self._queue) >= self.max_queued_publishes:
            raise QueueFull("queue_full", f"{len(self._queue)} publishes already wait")
        request_id = next(self._ids)
        frame = {"type": "publish", "id": request_id, "channel": channel, "data": data}
        item = _Publish(request_id, _dumps(frame), asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._flush()
        await item.future

    async def ping(self) -> float:
        """Round trip to the gateway in seconds; raises Disconnected if the connection drops."""
        ws = await self._wait_ready()
        started = time.monotonic()
        await self._request(ws, {"type": "ping"})
        return time.monotonic() - started

    async def messages(self) -> AsyncIterator[Message]:
        """Each new message, in order, once. Ends at ``close()``; raises ClientClosed if refused."""
        if self._on_message is not None:
            raise RuntimeError("messages() cannot be used together with on_message")
        while (item := await self._inbox.get()) is not None:
            if (message := await self._side_effects(item)) is not None:
                yield message
        self._inbox.put_nowait(None)  # for any other reader
        if self._fatal and self._closed is not None:
            raise self._closed

    # --- connection loop ----------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except Exception as exc:  # a bad URL or a bug: stop loudly rather than hang callers
            log.exception("rabbitgate client stopped")
            self._stop(ClientClosed(None, f"client failed: {exc!r}"), fatal=True)

    async def _connection_loop(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while self._closed is None:
            close_code: int | None = None
            reason = ""
            opened_at: float | None = None
            ws: ClientConnection | None = None
            at_least = 0.0
            fatal: str | None = None
            try:
                token = await self._fetch_token()
                async with asyncio.timeout(OPEN_TIMEOUT):
                    ws = await connect(
                        self.url,
                        subprotocols=[SUBPROTOCOL],
                        compression=None,
                        **self._connect_kwargs,
                    )
                    if ws.subprotocol != SUBPROTOCOL:
                        raise _NotAnEndpoint(
                            f"{self.url} did not select the rabbitgate.v1 subprotocol: it is "
                            "not a rabbitgate endpoint (check the host, the port and the /ws path)"
                        )
                    await ws.send(_dumps({"type": "auth", "token": token}))
                    welcome = await _await_welcome(ws)
                opened_at = loop.time()
                self._on_connected(ws, welcome, token)
                async for raw in ws:
                    await self._handle(raw)
            except ssl_module.SSLCertVerificationError as exc:
                fatal = certificate_reason(self.url, exc)
            except ssl_module.SSLError as exc:
                fatal = not_tls_reason(self.url, exc)
                if fatal is None:
                    log.log(
                        logging.WARNING if attempt == 0 else logging.INFO,
                        "TLS with %s failed: %s; retrying",
                        self.url,
                        exc,
                    )
            except _NotAnEndpoint as exc:
                fatal = str(exc)
            except InvalidURI as exc:
                fatal = f"rabbitgate: {exc}"
            except InvalidStatus as exc:
                response = exc.response
                fatal = not_an_endpoint(self.url, response.status_code)
                log.info("connection to %s refused: HTTP %d", self.url, response.status_code)
                close_code, at_least = handshake_refusal(
                    response.status_code, response.headers.get("Retry-After")
                )
                reason = f"HTTP {response.status_code}"
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, _NoToken) as exc:
                # The first failure in a row is a WARNING (shown even without any
                # logging set up), so that a client that cannot reach its gateway says so.
                log.log(
                    logging.WARNING if attempt == 0 else logging.INFO,
                    "connection to %s failed: %s%s; retrying",
                    self.url,
                    exc or type(exc).__name__,
                    _hint(self.url, exc),
                )
            finally:
                if ws is not None:
                    await ws.close()
                    close_code, reason = ws.close_code, ws.close_reason or ""
                self._on_disconnected()
            if self._closed is not None:
                return
            if fatal is not None:
                log.error("rabbitgate client: %s", fatal)
                self._stop(CannotConnect(fatal), fatal=True)
                return
            if not should_reconnect(close_code, callable(self._token)):
                log.warning("gateway closed with %s (%s); not reconnecting", close_code, reason)
                self._stop(ClientClosed(close_code, reason or "refused by the gateway"), fatal=True)
                return
            if opened_at is not None and loop.time() - opened_at >= STABLE_SECONDS:
                attempt = 0
            delay = max(at_least, backoff_delay(attempt, self.backoff_base, self.backoff_cap))
            attempt += 1
            log.info("closed with %s (%s); reconnecting in %.2f s", close_code, reason, delay)
            await asyncio.sleep(delay)

    async def _fetch_token(self) -> str:
        if not callable(self._token):
            return self._token
        try:
            token = self._token()
            return str(await token) if inspect.isawaitable(token) else str(token)
        except Exception as exc:  # the identity provider may be down: retried with backoff
            raise _NoToken(f"token callback failed: {exc!r}") from exc

    def _on_connected(self, ws: ClientConnection, welcome: dict[str, Any], token: str) -> None:
        # Synchronous on purpose: nothing can subscribe between these lines twice.
        self._ws, self.session = ws, str(welcome.get("session"))
        self.connections += 1
        self._ready.set()
        for channel in list(self._tracker.last):
            self._spawn(self._subscribe_on(ws, channel))
        self._refresher = self._spawn(self._refresh_loop(ws, token))
        heartbeat = welcome.get("heartbeat")
        if isinstance(heartbeat, int | float) and heartbeat > 0:
            self._keepalive = self._spawn(self._keepalive_loop(ws, float(heartbeat)))
        self._flush()

    def _on_disconnected(self) -> None:
        self._ws = self.session = None
        if self._closed is None:
            self._ready.clear()
        if self._refresher is not None:
            self._refresher.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for waiter in self._requests.values():
            if not waiter.done():
                waiter.set_exception(Disconnected("disconnected", "connection lost"))
        self._requests.clear()
        self._subscribing.clear()
        # Sent but not acked: unknown fate. Send again first, in the original order.
        for item in sorted(self._inflight.values(), key=lambda i: i.id, reverse=True):
            item.attempts += 1
            if item.attempts >= MAX_ATTEMPTS:
                _fail(item.future, RabbitgateError("unavailable", "connection lost before the ack"))
            else:
                self._queue.appendleft(item)
        self._inflight.clear()

    def _stop(self, error: ClientClosed, *, fatal: bool) -> None:
        if self._closed is not None:
            return
        self._closed, self._fatal = error, fatal
        self._ready.set()  # wakes whoever waits for a connection; they find _closed
        for item in [*self._queue, *self._inflight.values()]:
            _fail(item.future, error)
        self._queue.clear()
        self._inflight.clear()
        for waiter in self._first_ack.values():
            _fail(waiter, error)
        self._inbox.put_nowait(None)

    async def _wait_ready(self) -> ClientConnection:
        while True:
            await self._ready.wait()
            if self._closed is not None:
                raise self._closed
            if self._ws is not None:
                return self._ws

    # --- frames -------------------------------------------------------------

    async def _handle(self, raw: str | bytes) -> None:
        """One frame from the gateway. Anything malformed is logged and skipped."""
        try:
            frame = json.loads(raw)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            log.warning("ignored a frame that is not JSON: %.80r", raw)
            return
        if not isinstance(frame, dict):
            log.warning("ignored a frame that is not an object: %.80r", raw)
            return
        kind = frame.get("type")
        if kind == "message":
            channel, seq = frame.get("channel"), _int_or_none(frame.get("seq"))
            if not isinstance(channel, str) or seq is None:
                log.warning("ignored a malformed message frame: %.80r", raw)
            elif self._tracker.accept(channel, seq):
                sender = frame.get("from")
                message = Message(
                    channel, seq, frame.get("data"),
                    sender if isinstance(sender, str) else None, _int_or_none(frame.get("ts")),
                )  # fmt: skip
                await self._inbox.put(("message", message))
            return
        if kind not in ("ack", "error", "pong"):
            log.debug("ignored a frame of type %.40r", kind)
            return
        request_id = _int_or_none(frame.get("id"))
        if request_id in self._inflight:
            self._on_publish_answer(self._inflight.pop(request_id), frame)
        elif (waiter := self._requests.get(request_id)) is not None:  # type: ignore[arg-type]
            channel = self._subscribing.pop(request_id, None)  # type: ignore[arg-type]
            if channel is not None and kind == "ack":
                await self._on_subscribed(channel, frame)
            if not waiter.done():
                waiter.set_result(frame)
        elif kind == "error":
            error = _error(frame)
            if error.channel is not None:  # a subscription the policies ended
                self._tracker.remove(error.channel)
                self._first_ack.pop(error.channel, None)
            await self._inbox.put(("error", error))

    def _on_publish_answer(self, item: _Publish, frame: dict[str, Any]) -> None:
        if frame.get("type") == "ack":
            _succeed(item.future)
            return
        error = _error(frame)
        item.attempts += 1
        if error.code != "unavailable" or item.attempts >= MAX_ATTEMPTS:
            _fail(item.future, error)
            return
        delay = error.retry_after or backoff_delay(
            item.attempts, self.backoff_base, self.backoff_cap
        )
        asyncio.get_running_loop().call_later(delay, self._retry, item)

    def _retry(self, item: _Publish) -> None:
        if self._closed is None and not item.future.done():
            self._queue.appendleft(item)
            self._flush()

    def _flush(self) -> None:
        """Send queued publishes, in order, by one task so the order holds."""
        # A sender still stuck on a previous connection does not count: it stops by itself.
        idle = self._sender is None or self._sender.done() or self._sending_on is not self._ws
        if idle and self._queue and self._ws is not None and self._ready.is_set():
            self._sending_on = self._ws
            self._sender = self._spawn(self._send_queued(self._ws))

    async def _send_queued(self, ws: ClientConnection) -> None:
        while self._queue and self._ws is ws:
            item = self._queue.popleft()
            if item.future.done():  # the caller gave up (cancelled)
                continue
            self._inflight[item.id] = item
            try:
                await ws.send(item.text)
            except ConnectionClosed:
                return  # _on_disconnected puts it back in the queue

    async def _request(
        self, ws: ClientConnection, frame: dict[str, Any], *, subscribing: str | None = None
    ) -> dict[str, Any]:
        """Send a frame with a fresh id; return its ack/pong/error frame."""
        request_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._requests[request_id] = waiter
        if subscribing is not None:
            self._subscribing[request_id] = subscribing
        try:
            await ws.send(_dumps({**frame, "id": request_id}))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await waiter
        except ConnectionClosed:
            raise Disconnected("disconnected", "connection lost") from None
        finally:
            self._requests.pop(request_id, None)
            self._subscribing.pop(request_id, None)

    async def _subscribe_on(self, ws: ClientConnection, channel: str) -> None:
        since = self._tracker.since(channel)
        frame: dict[str, Any] = {"type": "subscribe", "channel": channel}
        if since is not None:
            frame["since"] = since
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                answer = await self._request(ws, frame, subscribing=channel)
            except Disconnected:
                return  # the next connection subscribes again
            except TimeoutError:
                answer = {"type": "error", "code": "unavailable", "message": "no answer in time"}
            if answer.get("type") == "ack":
                return  # _on_subscribed did the rest, before the frames that follow the ack
            error = _error(answer)
            if error.code != "unavailable" or attempt == MAX_ATTEMPTS:
                self._tracker.remove(channel)
                waiter = self._first_ack.pop(channel, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)
                else:
                    await self._inbox.put(("error", error))
                return
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_cap))

    async def _on_subscribed(self, channel: str, ack: dict[str, Any]) -> None:
        """Called by the reader for a subscribe ack, before it reads the replay behind it."""
        lost = self._tracker.on_ack(channel, _int_or_none(ack.get("seq")), ack.get("recovered"))
        if (waiter := self._first_ack.pop(channel, None)) is not None:
            _succeed(waiter)
        if lost:  # through the inbox: the app hears it before the channel's next message
            await self._inbox.put(("recovery_lost", channel))

    async def _keepalive_loop(self, ws: ClientConnection, interval: float) -> None:
        """An application ping every heartbeat interval: the gateway closes a
        connection that sends no frame for its idle timeout, and a listen-only
        client would otherwise send none."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self._request(ws, {"type": "ping"})
            except (Disconnected, TimeoutError):
                return

    async def _refresh_loop(self, ws: ClientConnection, token: str) -> None:
        """Send a fresh token ``refresh_margin`` seconds before ``exp``; the server
        closes with 4401 at ``exp`` otherwise (and then we reconnect)."""
        if not callable(self._token):
            return
        exp = token_expiry(token)
        while (delay := refresh_delay(exp, time.time(), self.refresh_margin)) is not None:
            await asyncio.sleep(delay)
            try:
                token = await self._fetch_token()
                answer = await self._request(ws, {"type": "auth", "token": token})
            except Disconnected:
                return
            except (_NoToken, TimeoutError) as exc:
                answer = {"type": "error", "code": "unauthorized", "message": str(exc)}
            new_exp = token_expiry(token)
            if answer.get("type") == "ack" and (exp is None or new_exp is None or new_exp > exp):
                exp = new_exp
            else:  # refused, or no later exp: try again shortly, until the server gives up
                log.warning("token refresh did not take: %s", answer.get("message", "same exp"))
                await asyncio.sleep(1.0)

    # --- delivery to the application -----------------------------------------

    async def _dispatch_loop(self) -> None:
        assert self._on_message is not None
        while (item := await self._inbox.get()) is not None:
            if (message := await self._side_effects(item)) is not None:
                await _call(self._on_message, message)

    async def _side_effects(self, item: tuple[str, Any]) -> Message | None:
        kind, value = item
        if kind == "recovery_lost" and self._on_recovery_lost is not None:
            await _call(self._on_recovery_lost, value)
        elif kind == "error":
            log.warning("gateway error: %s", value)
            if self._on_error is not None:
                await _call(self._on_error, value)
        return value if kind == "message" else None

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _hint(url: str, exc: BaseException) -> str:
    """A closed connection before any HTTP answer, on ws://, is most often a TLS port;
    it is still retried (a gateway also closes at once an address it throttles)."""
    if url.lower().startswith("ws://") and isinstance(exc.__cause__, EOFError):
        return " (closed before any HTTP answer: a TLS port? then the URL is wss://)"
    return ""


class _NoToken(Exception):
    """The token callback failed."""


class _NotAnEndpoint(Exception):
    """The server is not a rabbitgate WebSocket endpoint."""


async def _await_welcome(ws: ClientConnection) -> dict[str, Any]:
    while True:
        raw = await ws.recv()
        try:
            frame = json.loads(raw)
        except ValueError:
            frame = None
        if isinstance(frame, dict) and frame.get("type") == "welcome":
            return frame
        log.warning("ignored a frame before welcome: %.80r", raw)


async def _call(callback: Callable[..., Any], *args: Any) -> None:
    """Run an application callback (plain or async); its failure is logged, never ours."""
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("callback %r failed", callback)


def _succeed(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)

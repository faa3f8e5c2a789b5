"""Refusing, before TLS, an address that ignores ``Retry-After``.

A handshake over a per-address limit is answered HTTP 429 with
``Retry-After`` (``gateway/limits/limiter.py``). That answer can only be given after
the TLS handshake, so a client that ignores it and reconnects at once makes
the gateway pay a full TLS handshake per attempt, on the event loop that
serves everyone else (in the flood benchmark, a flooder's 70-90 refused
reconnects a second were 10 % of the gateway's profile).

So an address that comes back more than ``handshake_refusals_before_drop``
times while a ``Retry-After`` it was given is still running has its new
connections closed right after the TCP accept, before any TLS or HTTP work,
until that ``Retry-After`` ends. A client that honours ``Retry-After`` never
meets this; one that does not gets the same refusal, only cheaper for us.

``RefusalMemory`` is the decision (pure, clock injected); ``connection_class``
puts it in front of websockets' connection, starting TLS itself
(``loop.start_tls``) only for connections it lets through.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from gateway.limits.buckets import TokenBucket
from gateway.transports.ws_adapter import forget_request_in_parser, release, start_handler

Clock = Callable[[], float]
# How long a TLS close_notify exchange may take (websockets' close timeout).
SHUTDOWN_TIMEOUT_SECONDS = 5.0
# What a connection may send before websockets takes it: a ClientHello, then
# the HTTP request (itself limited by websockets to 8 KiB a line).
MAX_EARLY_BYTES = 256 * 1024
# Close codes of the control-frame limits (see AdmittedConnection.process_event).
CLOSE_RATE_LIMITED = 4429
_CONTROL = (Opcode.PING, Opcode.PONG)


@dataclass(slots=True)
class _Refused:
    until: float  # the latest Retry-After given to the address ends then
    ignored: int  # handshakes it made (and we refused) before that


class RefusalMemory:
    """Which addresses keep coming back while told to wait. Bounded: the
    ``max_addresses`` most recently refused are remembered."""

    def __init__(self, tolerance: int, max_addresses: int, clock: Clock = time.monotonic) -> None:
        self.tolerance = tolerance  # 0: never drop before TLS
        self._max = max_addresses
        self._clock = clock
        self._refused: OrderedDict[str, _Refused] = OrderedDict()

    def refused(self, address: str | None, retry_after: float) -> None:
        """The address's handshake was refused with this ``Retry-After`` (seconds)."""
        if address is None or self.tolerance == 0:
            return
        now = self._clock()
        entry = self._refused.get(address)
        if entry is not None and now < entry.until:
            entry.ignored += 1
            entry.until = max(entry.until, now + retry_after)
            self._refused.move_to_end(address)
            return
        self._refused[address] = _Refused(now + retry_after, 0)
        self._refused.move_to_end(address)
        while len(self._refused) > self._max:
            self._refused.popitem(last=False)

    def drop(self, address: str | None) -> bool:
        """Close this new connection before TLS? (True while the address is
        still inside a ``Retry-After`` it has ignored too often.)"""
        if address is None:
            return False
        entry = self._refused.get(address)
        if entry is None:
            return False
        if self._clock() >= entry.until:
            del self._refused[address]
            return False
        return entry.ignored >= self.tolerance > 0

    def __len__(self) -> int:
        return len(self._refused)


def connection_class(
    drop: Callable[[str | None], bool],
    on_drop: Callable[[str | None], None],
    ssl_context: ssl.SSLContext | None,
    tls_timeout: float,
    *,
    control_frames_per_second: float = 100.0,
    control_frames_burst: int = 500,
    max_unread_bytes: int | None = None,
) -> type[AdmittedConnection]:
    """A websockets connection class that asks ``drop(address)`` at TCP accept
    and aborts at once when told to; otherwise it starts TLS itself (when
    ``ssl_context`` is set) and hands the encrypted transport to websockets.

    The listener must then be created *without* ``ssl``: TLS happens here.
    """
    return type(
        "AdmittedConnection",
        (AdmittedConnection,),
        {
            "drop": staticmethod(drop),
            "on_drop": staticmethod(on_drop),
            "ssl_context": ssl_context,
            "tls_timeout": tls_timeout,
            "tls_handshakes": set(),
            "control_rate": control_frames_per_second,
            "control_burst": control_frames_burst,
            "max_unread_bytes": max_unread_bytes,
        },
    )


class AdmittedConnection(ServerConnection):
    """Configured by ``connection_class``; see there.

    Starting TLS on an accepted connection has one trap: uvloop starts
    reading a new transport right after ``connection_made`` even when it was
    paused there, so the client's ClientHello can reach this protocol before
    the TLS protocol exists. Such bytes are kept and fed to the TLS protocol
    once it is connected, before its transport reads anything more (see
    ``_start_tls``). Likewise the TLS protocol hands over what follows the
    handshake (the HTTP request) before ``start_tls`` returns; it is kept
    until websockets has the connection. Both are bounded.
    """

    drop: Callable[[str | None], bool]
    on_drop: Callable[[str | None], None]
    ssl_context: ssl.SSLContext | None
    tls_timeout: float
    # TLS handshakes in progress: a task must be referenced until it ends.
    tls_handshakes: set[asyncio.Task[None]]
    # Control frames (pings, pongs) a peer may send: the frame limits of data
    # frames (limits.frames_per_second / frames_burst), in a bucket of their
    # own, made at the first one (most peers never ping).
    control_rate: float
    control_burst: int
    _control: TokenBucket | None = None
    # What the transport may hold unsent (limits.send_buffer_bytes plus a
    # frame) before the peer counts as not reading; None: no bound.
    max_unread_bytes: int | None
    _handed_over = False  # websockets has the connection (and its state to wind up)
    _tls_started = False
    _fed = False  # the TLS protocol has the bytes read before it existed
    _early: list[bytes] | None = None  # raw bytes until fed, then decrypted ones
    _early_bytes = 0
    _early_eof = False
    # The client's address when a trusted proxy forwarded it (set by the
    # handshake; None: the TCP peer is the client).
    forwarded_client: str | None = None

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        # Not kept for the connection's life: the handshake request (and token).
        forget_request_in_parser(protocol)
        super().__init__(protocol, *args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._tls_started:
            # uvloop's TLS protocol calls connection_made once more, with the
            # encrypted transport, when the handshake is done.
            self._hand_over(transport)
            return
        # (uvloop's transports are not asyncio.Transport subclasses.)
        self._raw = raw = cast(asyncio.Transport, transport)
        peer = raw.get_extra_info("peername")
        address = str(peer[0]) if peer else None
        if self.drop(address):
            self.on_drop(address)
            raw.abort()
            asyncio.get_running_loop().call_soon(release, self)
            return
        if self.ssl_context is None:
            self._hand_over(raw)
            return
        raw.pause_reading()  # honoured by asyncio's loop, not by uvloop's
        self._tls_started = True
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._start_tls(raw))
        self.tls_handshakes.add(task)
        task.add_done_callback(self.tls_handshakes.discard)
        # FIFO ready queue: the task's first step (start_tls pauses the
        # transport, swaps in the TLS protocol and queues its connection_made
        # and resume_reading), then this, which queues the feed after them:
        # the feed runs in the same batch as resume_reading, before any read.
        loop.call_soon(loop.call_soon, self._feed_tls)

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        assert self.ssl_context is not None
        try:
            encrypted = await asyncio.get_running_loop().start_tls(
                raw,
                self,
                self.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.tls_timeout,
                ssl_shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
            )
        except asyncio.CancelledError:  # the server is stopping
            raw.abort()
            raise
        except Exception:  # a failed or timed-out TLS handshake; nothing started yet
            raw.abort()
            asyncio.get_running_loop().call_soon(release, self)
            return
        if self._handed_over:
            return  # uvloop: done in connection_made
        if encrypted is None or encrypted.is_closing():
            raw.abort()
            asyncio.get_running_loop().call_soon(release, self)
            return
        self._hand_over(encrypted)

    def _feed_tls(self) -> None:
        self._fed = True
        raw, self._early, self._early_bytes = self._early, None, 0
        if not raw or self._raw.is_closing():
            return
        # A buffered protocol (asyncio's and uvloop's TLS protocols are, though
        # uvloop's is no asyncio.BufferedProtocol subclass).
        tls: Any = self._raw.get_protocol()
        if tls is self or not hasattr(tls, "buffer_updated"):
            self._raw.abort()  # start_tls failed before swapping protocols
            return
        data = memoryview(b"".join(raw))
        while data:
            buffer = memoryview(tls.get_buffer(len(data)))
            n = min(len(buffer), len(data))
            buffer[:n] = data[:n]
            tls.buffer_updated(n)
            data = data[n:]

    def _hand_over(self, transport: asyncio.BaseTransport) -> None:
        self._handed_over = True
        # websockets' connection_made, and release() when it is all over.
        start_handler(self, transport)
        early, self._early = self._early, None
        for data in early or ():
            super().data_received(data)
        if self._early_eof:
            super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._handed_over:
            super().data_received(data)
            # websockets answers every ping with a pong written at once, with
            # no backpressure: a peer that pings and never reads would grow
            # the send buffer without bound (and a close frame would queue
            # behind it). Past the send buffer limit it is a slow consumer;
            # dropped here, since it would read no close frame anyway.
            limit = self.max_unread_bytes
            transport = self.transport
            if limit is not None and transport is not None:
                if transport.get_write_buffer_size() > limit:
                    transport.abort()
            return
        self._early_bytes += len(data)
        if self._early_bytes > MAX_EARLY_BYTES:
            self._raw.abort()
        elif self._early is None:
            self._early = [data]
        else:
            self._early.append(data)

    def process_event(self, event: object) -> None:
        if isinstance(event, Frame) and event.opcode in _CONTROL:
            # Pings and pongs never reach recv(), where data frames are
            # metered: metered here, with the same limits.
            bucket = self._control
            if bucket is None:
                bucket = self._control = TokenBucket(self.control_rate, self.control_burst)
            allowed, _ = bucket.take(self.loop.time())
            if not allowed:
                # Stops the parser too: no more pongs for what is still unread.
                self.protocol.fail(CLOSE_RATE_LIMITED, "rate limits broken too often")
                self.send_data()
                # A peer that does not read never answers the close either.
                self.loop.call_later(self.close_timeout or 0, self._abort_unless_closed)
                return
        super().process_event(event)  # type: ignore[arg-type]

    def _abort_unless_closed(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    def eof_received(self) -> None:
        if self._handed_over:
            super().eof_received()
            return
        if not self._fed:  # the client left before TLS started
            self._raw.abort()
        self._early_eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over:
            super().connection_lost(exc)

    @classmethod
    def abort_handshakes(cls) -> None:
        """At shutdown: TLS handshakes still in progress are abandoned."""
        for task in list(cls.tls_handshakes):
            task.cancel()

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
(``gateway/transports/tls.py``) only for connections it lets through.
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
from gateway.transports.tls import TlsLayer
from gateway.transports.ws_adapter import forget_request_in_parser, release, start_handler

Clock = Callable[[], float]
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

    With TLS the accepted TCP transport is handed to a ``TlsLayer``
    (gateway/transports/tls.py) inside ``connection_made``, before the
    transport reads anything, and websockets gets the layer as its transport
    once the handshake is done: nothing the client sends can reach this
    protocol before then, and what came with the handshake's last flight is
    handed over right after websockets has the connection.
    """

    drop: Callable[[str | None], bool]
    on_drop: Callable[[str | None], None]
    ssl_context: ssl.SSLContext | None
    tls_timeout: float
    # TLS handshakes in progress (aborted when the server stops accepting).
    tls_handshakes: set[TlsLayer]
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
    # The client's address when a trusted proxy forwarded it (set by the
    # handshake; None: the TCP peer is the client).
    forwarded_client: str | None = None

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        # Not kept for the connection's life: the handshake request (and token).
        forget_request_in_parser(protocol)
        super().__init__(protocol, *args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses.)
        raw = cast(asyncio.Transport, transport)
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
        layer = TlsLayer(
            raw,
            self,
            self.ssl_context,
            self.tls_timeout,
            on_open=self._tls_opened,
            on_failure=self._tls_failed,
        )
        self.tls_handshakes.add(layer)

    def _tls_opened(self, layer: TlsLayer) -> None:
        self.tls_handshakes.discard(layer)
        self._hand_over(layer)

    def _tls_failed(self, layer: TlsLayer) -> None:
        # A failed, refused or timed-out handshake (or the server stopping):
        # websockets never had the connection, so nothing else releases it.
        self.tls_handshakes.discard(layer)
        asyncio.get_running_loop().call_soon(release, self)

    def _hand_over(self, transport: asyncio.BaseTransport) -> None:
        self._handed_over = True
        # websockets' connection_made, and release() when it is all over.
        start_handler(self, transport)

    def data_received(self, data: bytes) -> None:
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

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over:
            super().connection_lost(exc)

    @classmethod
    def abort_handshakes(cls) -> None:
        """At shutdown: TLS handshakes still in progress are abandoned."""
        for layer in list(cls.tls_handshakes):
            layer.abort()

"""One aiohttp application on one address: the admin and SSE listeners.

No access log: request lines hold query strings, and the SSE endpoint accepts
a token there (``?access_token=``), which must never reach a log. Nor does
aiohttp's own error log of a request it could not parse, which quotes the
start of the request line or header (a token).

A public listener (SSE) also gets what websockets gives ``/ws``
(``HandshakeGuard``): an address with ``max_per_address`` connections open
here, or that the handshake refusals say to drop, has its new ones dropped
at TCP accept, before TLS (``/ws`` decides there too, in
gateway/transports/admission.py): a flood from one address costs no
handshake past its cap. Then the TLS handshake must end within the
handshake timeout (the gateway's own TLS layer, gateway/transports/tls.py,
as on ``/ws``), and the request's headers must have arrived within it too,
else the connection is dropped (aiohttp itself waits for them without a
limit, or until its keep-alive timeout on newer versions, 75 s). Half-open
connections (slowloris) cost at most the handshake timeout each, and one
address can hold at most its cap, TLS handshakes in progress included.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.transports.tls import TlsLayer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HandshakeLimits:
    timeout: float  # limits.handshake_timeout_seconds: TLS, then the request's headers
    max_per_address: int  # limits.max_connections_per_address, at this listener
    # Addresses to drop as they connect (the handshake refusals, gateway/admission.py).
    drop: Callable[[str | None], bool] = lambda _: False
    # The largest header value: what aiohttp allows (8190) is less than
    # "Bearer " + a token of jwt.max_token_bytes (8 KiB); None: aiohttp's.
    max_header_value: int | None = None
    # Addresses neither dropped nor capped: trusted proxies carry many clients.
    exempt: Callable[[str | None], bool] = lambda _: False


class OpenConnections:
    """Connections open per address at one listener. No I/O."""

    def __init__(self, max_per_address: int) -> None:
        self.max_per_address = max_per_address
        self._open: dict[str | None, int] = {}
        self.refused = 0

    def enter(self, address: str | None) -> bool:
        """Count a new connection; False (and nothing counted) past the cap."""
        held = self._open.get(address, 0)
        if held >= self.max_per_address:
            self.refused += 1
            return False
        self._open[address] = held + 1
        return True

    def leave(self, address: str | None) -> None:
        held = self._open.get(address, 0) - 1
        if held > 0:
            self._open[address] = held
        else:
            self._open.pop(address, None)

    def held(self, address: str | None) -> int:
        return self._open.get(address, 0)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the handshake limits.

    A proxy, not a subclass: aiohttp's RequestHandler has __slots__ and
    private state; this only needs the asyncio protocol methods. With TLS it
    is the application protocol of the connection's ``TlsLayer``: admitted
    on the TCP connection, handed to aiohttp once TLS is up.
    """

    def __init__(self, inner: asyncio.Protocol, guard: HandshakeGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None  # what aiohttp writes to
        self._address: str | None = None
        self._counted = False  # admitted: counted at the address, until it is gone
        self._capped = False  # counted in the address's open connections
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses.)
        raw = cast(asyncio.Transport, transport)
        peer = raw.get_extra_info("peername")
        self._address = str(peer[0]) if peer else None
        if not self._guard.admit(self, self._address):
            raw.abort()
            return
        self._counted = True
        tls = self._guard.tls
        if tls is None:
            self._open(raw)
            return
        # From here the layer is the TCP transport's protocol; it calls
        # _opened, or _failed (the connection never reaches aiohttp).
        self._guard.handshakes.add(
            TlsLayer(
                raw,
                self,
                tls,
                self._guard.limits.timeout,
                on_open=self._opened,
                on_failure=self._failed,
            )
        )

    def _opened(self, layer: TlsLayer) -> None:
        self._guard.handshakes.discard(layer)
        self._open(layer)

    def _failed(self, layer: TlsLayer) -> None:
        self._guard.handshakes.discard(layer)
        self._gone()

    def _open(self, transport: asyncio.Transport) -> None:
        """The request's headers are due within the handshake timeout from now."""
        self._transport = transport
        self._guard.track(self, transport)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.limits.timeout, self._expired)
        self._inner.connection_made(transport)

    def request_started(self) -> None:
        """The request's headers are in (aiohttp called the handler)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is not None:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        opened = self._transport is not None
        inner = self._inner
        self._gone()
        if opened:
            inner.connection_lost(exc)

    def _gone(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._counted:
            self._counted = False
            self._guard.left(self, self._address)
        # Let go of the transport: it refers back to this protocol, and the
        # gateway freezes what lives longer than a second (gc_freeze_seconds),
        # so a cycle left here would never be collected.
        self._transport = None


class HandshakeGuard:
    """The handshake limits of one listener (see the module's docstring)."""

    def __init__(self, limits: HandshakeLimits, tls: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.tls = tls
        self.open = OpenConnections(limits.max_per_address)
        self._by_transport: dict[asyncio.BaseTransport, _Guarded] = {}
        # TLS handshakes in progress, aborted when the listener stops.
        self.handshakes: set[TlsLayer] = set()

    def admit(self, connection: _Guarded, address: str | None) -> bool:
        """Count the connection at its address, or False: drop it now."""
        if not self.limits.exempt(address):
            if self.limits.drop(address) or not self.open.enter(address):
                return False
            connection._capped = True
        return True

    def track(self, connection: _Guarded, transport: asyncio.BaseTransport) -> None:
        """aiohttp has the connection on ``transport`` (see ``middleware``)."""
        self._by_transport[transport] = connection

    def left(self, connection: _Guarded, address: str | None) -> None:
        if connection._capped:
            self.open.leave(address)
        if connection._transport is not None:
            self._by_transport.pop(connection._transport, None)

    def abort_handshakes(self) -> None:
        for layer in list(self.handshakes):
            layer.abort()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            connection = self._by_transport.get(request.transport)
            if connection is not None:
                connection.request_started()
        return await handler(request)


class UnparsedRequestFilter(logging.Filter):
    """aiohttp logs a request it could not parse (a request line or header
    over 8190 bytes, say) at ERROR with the exception, whose text quotes the
    start of the offending line: ``/events?access_token=eyJ...`` or
    ``Bearer eyJ...``. Such a record becomes one INFO line naming only the
    kind of error: no token reaches the logs. Other records pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused an HTTP request that could not be parsed (%s, status %s)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_UNPARSED_FILTER = UnparsedRequestFilter()


class HttpListener:
    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handler_cancellation: bool = False,
        shutdown_timeout: float = 5.0,
        handshake: HandshakeLimits | None = None,
        reuse_port: bool = False,
        unix_path: Path | None = None,
    ) -> None:
        """``reuse_port``: share the port with other processes (SO_REUSEPORT, the
        workers of one supervisor); ``unix_path``: listen on this Unix socket
        instead of ``host:port`` (a worker's admin socket)."""
        self._reuse_port, self._unix_path = reuse_port, unix_path
        # Behind a guard, TLS is the guard's (after the address is admitted);
        # otherwise the loop's.
        self._guard = HandshakeGuard(handshake, ssl_context) if handshake is not None else None
        extra: dict[str, Any] = {}
        if self._guard is not None:
            # The first middleware: it sees every request aiohttp parsed.
            app.middlewares.insert(0, self._guard.middleware)
            # Between two requests of a connection (after a refusal, say), the
            # same bound as before the first.
            extra["keepalive_timeout"] = handshake.timeout if handshake else 75.0
            if handshake is not None and handshake.max_header_value is not None:
                extra["max_field_size"] = handshake.max_header_value
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=handler_cancellation,
            shutdown_timeout=shutdown_timeout,
            **extra,
        )
        self._host, self._port, self._ssl = host, port, ssl_context
        self._server: asyncio.Server | None = None

    @property
    def guard(self) -> HandshakeGuard | None:
        return self._guard

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one picked for port 0)."""
        assert self._server is not None, "not started"
        if self._unix_path is not None:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and serve; the app's routes are frozen from here on. Raises OSError."""
        # Idempotent: one filter, however many listeners.
        logging.getLogger("aiohttp.server").addFilter(_UNPARSED_FILTER)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        factory: Callable[[], asyncio.BaseProtocol] = server
        if guard is not None:
            factory = lambda: _Guarded(server(), guard)  # noqa: E731
        loop = asyncio.get_running_loop()
        # Not aiohttp's TCPSite: it gives the TLS handshake no timeout (asyncio's
        # default, 60 s) and the connections no guard.
        loop_ssl = None if guard is not None else self._ssl
        if self._unix_path is not None:
            self._server = await loop.create_unix_server(  # type: ignore[assignment]
                factory, str(self._unix_path), ssl=loop_ssl, backlog=1024
            )
            return
        self._server = await loop.create_server(  # type: ignore[assignment]
            factory,
            self._host,
            self._port,
            ssl=loop_ssl,
            backlog=1024,
            reuse_port=self._reuse_port or None,
        )

    async def stop(self) -> None:
        """Stop accepting, wait up to the shutdown timeout for handlers, close the rest."""
        if self._server is not None:
            self._server.close()
        if self._guard is not None:
            self._guard.abort_handshakes()
        await self._runner.cleanup()

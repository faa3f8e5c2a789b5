"""One aiohttp application on one address: the admin and SSE listeners.

No access log: request lines hold query strings, and the SSE endpoint accepts
a token there (``?access_token=``), which must never reach a log. Nor does
aiohttp's own error log of a request it could not parse, which quotes the
start of the request line or header (a token).

A public listener (SSE) also gets what websockets gives ``/ws``
(``HandshakeGuard``): the TLS handshake must end within the handshake
timeout, and then the request's headers must have arrived within it too,
else the connection is dropped (aiohttp itself waits for them without a
limit, or until its keep-alive timeout on newer versions, 75 s); and an
address with ``max_per_address`` connections open here, or that the
handshake refusals say to drop, has its new ones dropped as they come,
before any request is parsed. Half-open connections (slowloris) cost at most
the handshake timeout each, and one address can hold at most its cap.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HandshakeLimits:
    timeout: float  # limits.handshake_timeout_seconds: TLS, then the request's headers
    max_per_address: int  # limits.max_connections_per_address, at this listener
    # Addresses to drop as they connect (the handshake refusals, gateway/admission.py).
    drop: Callable[[str | None], bool] = lambda _: False
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
    private state; this only needs the asyncio protocol methods.
    """

    def __init__(self, inner: asyncio.Protocol, guard: HandshakeGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._address: str | None = None
        self._counted = False  # let in: aiohttp's protocol has the connection
        self._capped = False  # counted in the address's open connections
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if peer else None
        if not self._guard.admit(self, self._address):
            self._transport.abort()
            return
        self._counted = True
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
        if self._counted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._counted:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self._counted:
            return
        self._counted = False
        self._guard.left(self, self._address)
        self._inner.connection_lost(exc)


class HandshakeGuard:
    """The handshake limits of one listener (see the module's docstring)."""

    def __init__(self, limits: HandshakeLimits) -> None:
        self.limits = limits
        self.open = OpenConnections(limits.max_per_address)
        self._by_transport: dict[asyncio.BaseTransport, _Guarded] = {}

    def admit(self, connection: _Guarded, address: str | None) -> bool:
        """Let the connection in (and count it), or False: drop it now."""
        if not self.limits.exempt(address):
            if self.limits.drop(address) or not self.open.enter(address):
                return False
            connection._capped = True
        if connection._transport is not None:
            self._by_transport[connection._transport] = connection
        return True

    def left(self, connection: _Guarded, address: str | None) -> None:
        if connection._capped:
            self.open.leave(address)
        if connection._transport is not None:
            self._by_transport.pop(connection._transport, None)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            connection = self._by_transport.get(request.transport)
            if connection is not None:
                connection.request_started()
        return await handler(request)


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
        self._guard = HandshakeGuard(handshake) if handshake is not None else None
        extra: dict[str, Any] = {}
        if self._guard is not None:
            # The first middleware: it sees every request aiohttp parsed.
            app.middlewares.insert(0, self._guard.middleware)
            # Between two requests of a connection (after a refusal, say), the
            # same bound as before the first.
            extra["keepalive_timeout"] = handshake.timeout if handshake else 75.0
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
        handshake_timeout = guard.limits.timeout if guard and self._ssl else None
        if self._unix_path is not None:
            self._server = await loop.create_unix_server(  # type: ignore[assignment]
                factory,
                str(self._unix_path),
                ssl=self._ssl,
                ssl_handshake_timeout=handshake_timeout,
                backlog=1024,
            )
            return
        self._server = await loop.create_server(  # type: ignore[assignment]
            factory,
            self._host,
            self._port,
            ssl=self._ssl,
            ssl_handshake_timeout=handshake_timeout,
            backlog=1024,
            reuse_port=self._reuse_port or None,
        )

    async def stop(self) -> None:
        """Stop accepting, wait up to the shutdown timeout for handlers, close the rest."""
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()

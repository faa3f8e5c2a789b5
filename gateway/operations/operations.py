"""The gateway's operational side, wired in one place: metrics, the audit
stream, the admin listener and the SSE listener.

``Gateway`` makes one ``Operations`` in its constructor (the sinks are on the
event bus from then on, and ``admin_app`` takes extra routes until start),
starts it once the WebSocket listener is up and stops it first thing.
"""

from __future__ import annotations

import logging
import ssl
from typing import Protocol

from aiohttp import web

from gateway.config import ConfigError, Settings
from gateway.core.gate import Gate
from gateway.core.node import Node
from gateway.core.reloader import PolicyReloader
from gateway.operations.admin import build_admin_app
from gateway.telemetry.audit import audit_sink
from gateway.transports.admission import RefusalMemory
from gateway.transports.httplistener import HandshakeLimits, HttpListener
from gateway.transports.sse_server import SSE_PATH, SseEndpoint

log = logging.getLogger("rabbitgate.server")


class GatewayParts(Protocol):
    """The parts of a gateway its operational side works with (``Gateway`` is one)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def node(self) -> Node: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def handshake_refusals(self) -> RefusalMemory:
        """Addresses that ignore Retry-After, dropped before TLS on every public port."""
        ...

    @property
    def reloader(self) -> PolicyReloader: ...

    @property
    def draining(self) -> bool: ...


class Operations:
    def __init__(self, gateway: GatewayParts) -> None:
        node = gateway.node
        node.events.subscribe(node.metrics.sink)
        node.events.subscribe(audit_sink)
        node.metrics.watch(gateway)
        self._settings = gateway.settings
        self._gateway = gateway
        self.admin_app: web.Application = build_admin_app(gateway)
        sse_port = gateway.settings.sse_port
        self.sse = SseEndpoint(gateway.gate, gateway.settings) if sse_port is not None else None
        self._admin: HttpListener | None = None
        self._sse: HttpListener | None = None

    @property
    def admin_port(self) -> int:
        assert self._admin is not None, "not started"
        return self._admin.port

    @property
    def sse_port(self) -> int | None:
        return self._sse.port if self._sse is not None else None

    async def start(self, ssl_context: ssl.SSLContext | None) -> None:
        """Listen for SSE (with the public TLS context) and for admin requests.

        Raises ConfigError when a port cannot be bound.
        """
        s = self._settings
        if self.sse is not None and s.sse_port is not None:
            node = self._gateway.node
            proxies = node.trusted_proxies
            # What /ws has: the handshake timeout and per-address caps before
            # any request is parsed (slowloris, gateway/httplistener.py).
            handshake = HandshakeLimits(
                timeout=s.limits.handshake_timeout_seconds,
                max_per_address=s.limits.max_connections_per_address,
                drop=self._gateway.handshake_refusals.drop,
                exempt=proxies.trusts,
            )
            self._sse = HttpListener(
                self.sse.app,
                s.host,
                s.sse_port,
                ssl_context=ssl_context,
                handler_cancellation=True,
                handshake=handshake,
                reuse_port=s.reuse_port,
            )
            await _bind(self._sse, s.host, s.sse_port)
            scheme = "https" if ssl_context else "http"
            log.info("SSE on %s://%s:%d%s", scheme, s.host, self._sse.port, SSE_PATH)
        if s.admin_socket is not None:
            # A supervisor's worker: the supervisor serves the admin port.
            self._admin = HttpListener(self.admin_app, "", 0, unix_path=s.admin_socket)
            await _bind(self._admin, str(s.admin_socket), 0)
            return
        self._admin = HttpListener(self.admin_app, s.admin_host, s.admin_port)
        await _bind(self._admin, s.admin_host, s.admin_port)
        log.info("admin on http://%s:%d (/metrics /healthz /readyz)", s.admin_host, self.admin_port)

    async def stop(self) -> None:
        """End every SSE stream (1001), then close both listeners."""
        if self.sse is not None:
            self.sse.close_all()
        for listener in (self._sse, self._admin):
            if listener is not None:
                await listener.stop()
        self._sse = self._admin = None


async def _bind(listener: HttpListener, host: str, port: int) -> None:
    try:
        await listener.start()
    except OSError as exc:
        await listener.stop()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

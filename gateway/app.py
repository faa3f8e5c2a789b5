"""One gateway process, wired in one place: node, gate, transports, operations.

``Gateway`` builds the parts (``core/``: node, gate, reloader; the WebSocket
listener of ``transports/websocket.py``; ``operations/``: metrics, audit,
admin and SSE listeners; the anomaly detector when enabled), starts them in
order and stops them in reverse. It holds no decision and does no wire work
of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING

from websockets.asyncio.server import Server, ServerConnection

from gateway.auth.tokens import TokenVerifier
from gateway.config import ConfigError, Settings
from gateway.core.gate import Gate
from gateway.core.node import Node
from gateway.core.reloader import PolicyReloader
from gateway.devtools.devcerts import server_ssl_context
from gateway.operations.connections import Connections, LocalConnections
from gateway.operations.connections_admin import ConnectionsAdmin, OperatorFileError
from gateway.operations.console import ConsolePages
from gateway.operations.fleet_connections import FleetConnections
from gateway.operations.malloc import fix_mmap_threshold
from gateway.operations.operations import Operations
from gateway.operations.staff_login import StaffLogin, staff_login_for
from gateway.policy.rules import PolicySet
from gateway.presence.service import PresenceService
from gateway.transports.admission import RefusalMemory
from gateway.transports.heartbeat import Heartbeat
from gateway.transports.outbox import fan_out
from gateway.transports.websocket import WebSocketListener

if TYPE_CHECKING:
    from anomaly.service import AnomalyService

log = logging.getLogger("rabbitgate.server")


class Gateway:
    """One gateway process: its node, its transports and its operational side."""

    def __init__(self, settings: Settings, policies: PolicySet) -> None:
        self.settings = settings
        self.node = Node(settings, policies, fan_out=fan_out)
        self.reloader = PolicyReloader(
            self.node, settings.policies_dir, watch=settings.policy_watch
        )
        # Presence across every process through Redis (gateway/presence/); without
        # redis_url the node keeps its own process-local table.
        if settings.redis_url is not None:
            node = self.node
            self.node.presence = PresenceService(
                settings.redis_url,
                f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}",
                timeout=settings.limits.redis_timeout_seconds,
                deliver=node.deliver_presence,
                wants_events=node.wants_presence_events,
                process_ttl_ms=int(settings.presence_ttl_seconds * 1000),
            )
        self.verifier = TokenVerifier(settings.jwt)
        # Who may connect and subscribe, for every transport (gateway/core/gate.py).
        self.gate = Gate(self.node, self.verifier)
        # Metrics, audit stream, admin and SSE listeners (gateway/operations/operations.py).
        self.metrics = self.node.metrics
        self.draining = False  # shutting down: /readyz answers 503
        self.ops = Operations(self)
        self.admin_app = self.ops.admin_app  # add admin routes to it before start()
        # What operators see of and do to live connections (the service behind the
        # /connections endpoints, the CLI and the console).
        # With redis_url, every process sharing it (gateway/operations/fleet_connections.py).
        local = LocalConnections(self.node, self.gate)
        self.connections: Connections = local
        self.fleet_connections: FleetConnections | None = None
        if settings.redis_url is not None:
            self.fleet_connections = FleetConnections(local, settings, self.metrics)
            self.connections = self.fleet_connections
        # The operator's /connections endpoints (list, kick, ban), behind operators_file.
        if settings.operators_file is not None:
            try:
                admin = ConnectionsAdmin(self.connections, settings.operators_file)
            except OperatorFileError as exc:
                raise ConfigError(str(exc)) from None
            admin.install(self.admin_app)
        # One login for the admin pages (staff.file): the live console here, the
        # alert review page with anomaly detection. None: neither is served.
        self.staff_login: StaffLogin | None = staff_login_for(settings)
        if self.staff_login is not None:
            ConsolePages(self.connections, self.staff_login).install(self.admin_app)
        # Anomaly detection, alerts and their review page (anomaly/); None when off.
        self.anomaly: AnomalyService | None = None
        if settings.anomaly.enabled:
            from anomaly.service import AnomalyService

            self.anomaly = AnomalyService(self)
        # The public WebSocket listener (gateway/transports/websocket.py).
        self.websocket = WebSocketListener(settings, self.gate)

    @property
    def port(self) -> int:
        return self.websocket.port

    @property
    def _server(self) -> Server | None:
        return self.websocket.server

    @property
    def heartbeat(self) -> Heartbeat[ServerConnection] | None:
        return self.websocket.heartbeat

    @property
    def handshake_refusals(self) -> RefusalMemory:
        return self.websocket.refusals

    @property
    def admin_port(self) -> int:
        return self.ops.admin_port

    @property
    def sse_port(self) -> int | None:
        return self.ops.sse_port

    async def start(self) -> None:
        """Load keys, connect to RabbitMQ, listen. Raises ConfigError/BrokerUnavailable."""
        ssl_context = None
        if self.settings.tls.enabled:
            ssl_context = server_ssl_context(
                self.settings.tls.cert_file, self.settings.tls.key_file
            )
        await self.verifier.start()
        await self.node.start()
        await self.node.presence.start()
        if self.fleet_connections is not None:
            await self.fleet_connections.start()  # takes the fleet's operator bans
        if self.anomaly is not None:
            await self.anomaly.start()
        await self.reloader.start()  # watches policies_dir; SIGHUP calls reload_soon
        # Before the first connection: keeps uvloop's per-connection TLS read
        # buffers out of the heap (gateway/operations/malloc.py).
        fix_mmap_threshold()
        await self.websocket.start(ssl_context)
        await self.ops.start(ssl_context)

    async def shut_down(self) -> None:
        """What SIGTERM does: report not ready, go on serving for
        ``shutdown_delay_seconds`` (a load balancer sees /readyz 503 and stops
        sending new clients here), then ``stop``."""
        self.draining = True
        delay = self.settings.shutdown_delay_seconds
        if delay > 0:
            log.info("not ready any more; stopping in %g s", delay)
            await asyncio.sleep(delay)
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, then leave RabbitMQ."""
        await self.ops.stop()  # SSE streams end with 1001 too
        await self.reloader.stop()  # no policy swap while shutting down
        if self.websocket.server is not None:
            self.websocket.stop_accepting()  # open connections stay
            # In-flight publishes get their confirm and their ack (or error)
            # before the connection goes; new ones are refused meanwhile.
            self.node.shutting_down = True
            sessions = list(self.node.sessions)
            if sessions:
                await asyncio.gather(*(session.drain() for session in sessions))
        await self.websocket.close()
        # After every connection ended: a clean stop takes this process's
        # entries out of Redis at once instead of letting them lapse.
        await self.node.presence.stop()
        if self.fleet_connections is not None:
            await self.fleet_connections.stop()
        if self.anomaly is not None:
            await self.anomaly.stop()
        await self.node.stop()
        await self.verifier.close()

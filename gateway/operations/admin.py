"""The admin listener: Prometheus metrics, liveness and readiness.

Separate from the public listeners and bound to 127.0.0.1 by default: it has
no authentication of its own, so expose it only to the monitoring network.

``build_admin_app(gateway)`` returns the aiohttp ``Application``; a caller adds
its own pages with ``app.router.add_get(...)`` (or passes ``routes``) before
the gateway starts, when the router is frozen. ``Gateway.admin_app`` is the
gateway's instance.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.core.node import Node


class Served(Protocol):
    """What the admin listener reads of a gateway (``Gateway`` is one)."""

    @property
    def node(self) -> Node: ...

    @property
    def draining(self) -> bool: ...


GATEWAY = web.AppKey("gateway", Served)


def build_admin_app(
    gateway: Served, routes: Iterable[web.AbstractRouteDef] = ()
) -> web.Application:
    """The admin app of ``gateway``: /metrics, /healthz, /readyz, and ``routes``."""
    app = web.Application()
    app[GATEWAY] = gateway
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_routes(list(routes))
    return app


def readiness(gateway: Served) -> str | None:
    """Why ``gateway`` cannot serve traffic now, or None when it can."""
    if gateway.draining:
        return "shutting down"
    node = gateway.node
    if not node.broker.connected:
        return "broker not connected"
    if not node.policies.rules:
        return "no policy rules loaded"
    return None


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    body = generate_latest(gateway.node.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    reason = readiness(gateway)
    if reason is not None:
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)
    return web.json_response({"status": "ready", "policy_digest": gateway.node.policies.digest})

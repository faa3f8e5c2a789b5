"""Anomaly detection as a part of one gateway: the detector and the review page.

``Gateway`` makes one ``AnomalyService`` when ``anomaly.enabled`` is set,
before it starts (the review page is added to the admin app then, while its
router still takes routes), and starts and stops it with itself.
"""

from __future__ import annotations

import logging
from typing import Protocol

from aiohttp import web

from anomaly.detector import Detector, Host
from gateway.telemetry.metrics import Metrics


class ServiceHost(Host, Protocol):
    """The gateway the service is part of (``gateway.app.Gateway`` is one)."""

    @property
    def admin_app(self) -> web.Application: ...

    @property
    def metrics(self) -> Metrics: ...


log = logging.getLogger("rabbitgate.anomaly")


class AnomalyService:
    def __init__(self, gateway: ServiceHost) -> None:
        self.gateway = gateway
        self.detector = Detector(gateway, metrics=gateway.metrics)
        self.review = None
        settings = gateway.settings.anomaly
        admin_app = gateway.admin_app
        if settings.reviewers_file is not None:
            from anomaly.review import ReviewPages

            self.review = ReviewPages(self.detector, settings)
            self.review.install(admin_app)

    async def start(self) -> None:
        await self.detector.start()
        if self.review is not None:
            self.review.attach_store(self.detector.store)

    async def stop(self) -> None:
        await self.detector.stop()

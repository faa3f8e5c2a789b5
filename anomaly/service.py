"""Anomaly detection as a part of one gateway: the detector and the review page.

``Gateway`` makes one ``AnomalyService`` when ``anomaly.enabled`` is set,
before it starts (the review page is added to the admin app then, while its
router still takes routes), and starts and stops it with itself.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from anomaly.alerts import STORE_FILE, AlertStore
from anomaly.detector import Detector, Host
from gateway.config import ConfigError
from gateway.operations.staff_login import StaffLogin
from gateway.telemetry.metrics import Metrics


class ServiceHost(Host, Protocol):
    """The gateway the service is part of (``gateway.app.Gateway`` is one)."""

    @property
    def admin_app(self) -> web.Application: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def staff_login(self) -> StaffLogin | None: ...


log = logging.getLogger("rabbitgate.anomaly")


class AnomalyService:
    def __init__(self, gateway: ServiceHost) -> None:
        self.gateway = gateway
        settings = gateway.settings.anomaly
        self.review: Any = None  # anomaly.review.ReviewPages, imported only when used
        self.detector: Detector | None = None
        self.shipper: Any = None  # anomaly.fleet.TrafficShipper
        if settings.fleet:
            # The fleet's detector runs elsewhere (`rabbitgate detector`); the review
            # page goes with it (the store is its own), so none here.
            from anomaly.fleet import TrafficShipper

            self.shipper = TrafficShipper(gateway)
            return
        check_store(settings.data_dir / STORE_FILE)
        self.detector = Detector(gateway, metrics=gateway.metrics)
        admin_app = gateway.admin_app
        # The review page is an area of the gateway's one staff login (staff.file,
        # or anomaly.reviewers_file, its old name); none configured: no page.
        if gateway.staff_login is not None:
            from anomaly.review import ReviewPages

            self.review = ReviewPages(self.detector, settings, gateway.staff_login)
            self.review.install(admin_app)

    async def start(self) -> None:
        if self.shipper is not None:
            await self.shipper.start()
            return
        assert self.detector is not None
        await self.detector.start()
        if self.review is not None:
            self.review.attach_store(self.detector.store)

    async def stop(self) -> None:
        if self.shipper is not None:
            await self.shipper.stop()
            return
        assert self.detector is not None
        await self.detector.stop()


def check_store(path: Path) -> None:
    """Refuse to start on an alert store SQLite cannot use, in one line (a
    supervisor restarting the gateway then shows the same line, not a traceback)."""
    try:
        AlertStore(path).close()
    except (sqlite3.DatabaseError, OSError) as exc:
        raise ConfigError(
            f"anomaly alert store {path} cannot be used ({exc}); move it away to start"
            " with an empty one"
        ) from None

"""Anomaly detection as a part of one gateway: the detector and the review page.

``Gateway`` makes one ``AnomalyService`` when ``anomaly.enabled`` is set,
before it starts (the review page is added to the admin app then, while its
router still takes routes), and starts and stops it with itself.
"""

from __future__ import annotations

import logging
from typing import Any

from anomaly.detector import Detector

log = logging.getLogger("rabbitgate.anomaly")


class AnomalyService:
    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        settings = gateway.settings.anomaly
        self.review = None
        self.detector: Any = None
        self.shipper: Any = None
        if settings.fleet:
            # The fleet's detector runs elsewhere (`rabbitgate detector`); the review
            # page goes with it (the store is its own), so none here.
            from anomaly.fleet import TrafficShipper

            self.shipper = TrafficShipper(gateway)
            return
        self.detector = Detector(gateway)
        admin_app = getattr(gateway, "admin_app", None)
        if settings.reviewers_file is not None and admin_app is not None:
            from anomaly.review import ReviewPages

            self.review = ReviewPages(self.detector, settings)
            self.review.install(admin_app)

    async def start(self) -> None:
        if self.shipper is not None:
            await self.shipper.start()
            return
        await self.detector.start()
        if self.review is not None:
            self.review.attach_store(self.detector.store)

    async def stop(self) -> None:
        if self.shipper is not None:
            await self.shipper.stop()
            return
        await self.detector.stop()

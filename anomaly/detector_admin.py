"""The admin listener of the fleet's detector (``rabbitgate detector``).

In fleet mode no gateway holds the alert store (it is the detector's), so the
review page is served here, next to ``/healthz``, ``/readyz`` and
``/metrics``, on ``anomaly.detector_admin_host``:``anomaly.detector_admin_port``
(127.0.0.1:9091 by default, beside the gateway's 9090). Like the gateway's
admin port it has no authentication of its own but the review page's logins:
expose it to the operators' network only.

The review page (``anomaly.review.ReviewPages``) is used as it is; what it
asks of "its detector" is given by ``FleetReviewHost``: restrictions go to
every gateway through ``rabbitgate.responses``, and a reviewer's ban closes
the subject's connections on the gateways (a ``restrict`` response), since
there are none in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.operations.staff_login import staff_login_for
from gateway.transports.httplistener import HttpListener

if TYPE_CHECKING:
    from anomaly.detector import Detector
    from anomaly.exchange import AlertOutbox

_background: set[asyncio.Task[None]] = set()


class FleetDetector(Protocol):
    """What the listener reads of ``anomaly.fleet.FleetDetector`` (a seam, so
    that this module does not import the one that starts it)."""

    events_received: int
    batches_refused: int
    responses_published: int
    responses_failed: int

    @property
    def settings(self) -> Any: ...

    @property
    def detector(self) -> Detector: ...

    @property
    def connected(self) -> bool: ...

    async def ban_now(self, kind: str, key: str) -> None: ...


class FleetReviewHost:
    """What ``ReviewPages`` calls on its detector, for the fleet's."""

    def __init__(self, fleet: FleetDetector) -> None:
        self.fleet = fleet

    @property
    def outbox(self) -> AlertOutbox | None:
        return self.fleet.detector.outbox

    async def sync_restrictions(self) -> None:
        await self.fleet.detector.sync_restrictions()

    def disconnect(self, kind: str, key: str) -> int:
        """Have the gateways close the subject's connections (with 4403); the
        count is theirs to know, so 0 here."""
        task = asyncio.get_running_loop().create_task(self.fleet.ban_now(kind, key))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return 0


class DetectorCollector(Collector):
    """The detector's counters, read at scrape time from the objects that keep them."""

    def __init__(self, fleet: FleetDetector) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Any]:
        fleet, detector = self.fleet, self.fleet.detector
        counters = (
            (
                "rabbitgate_detector_events_received",
                "Traffic events the fleet detector consumed from anomaly.traffic_exchange.",
                fleet.events_received,
            ),
            (
                "rabbitgate_detector_batches_refused",
                "Traffic batches dropped because they did not parse as traffic events.",
                fleet.batches_refused,
            ),
            (
                "rabbitgate_detector_events_dropped",
                "Traffic events dropped because no anomaly worker process was running.",
                detector.events_dropped,
            ),
            (
                "rabbitgate_detector_windows_lost",
                "Windows not scored because the anomaly worker died or hung before answering.",
                detector.windows_lost,
            ),
            (
                "rabbitgate_detector_alerts_capped",
                "Flagged subjects not raised as alerts: over anomaly.max_alerts_per_window.",
                detector.alerts_capped,
            ),
            (
                "rabbitgate_anomaly_worker_restarts",
                "Times the anomaly detector's worker process ended and was started again.",
                detector.worker_restarts,
            ),
            (
                "rabbitgate_detector_responses_published",
                "Bans, throttles and restriction sets published to anomaly.responses_exchange.",
                fleet.responses_published,
            ),
            (
                "rabbitgate_detector_responses_failed",
                "Responses that could not be published (the next window's full set catches up).",
                fleet.responses_failed,
            ),
        )
        for name, text, value in counters:
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family
        connected = GaugeMetricFamily(
            "rabbitgate_detector_broker_connected",
            "1 while the detector's RabbitMQ connection is open.",
        )
        connected.add_metric([], 1 if fleet.connected else 0)
        yield connected
        windows = CounterMetricFamily(
            "rabbitgate_detector_windows_closed", "Scoring windows the detector closed."
        )
        windows.add_metric([], detector.windows_closed)
        yield windows


def detector_readiness(fleet: FleetDetector, stopping: bool) -> str | None:
    """Why the detector cannot do its work now, or None."""
    if stopping:
        return "shutting down"
    if not fleet.connected:
        return "broker not connected"
    if fleet.detector.store is None:
        return "alert store not open"
    return None


class DetectorAdmin:
    """``start``/``stop`` with the detector; ``port`` once started."""

    def __init__(self, fleet: FleetDetector) -> None:
        self.fleet = fleet
        settings = fleet.settings.anomaly
        self.host, self.requested_port = settings.detector_admin_host, settings.detector_admin_port
        self.stopping = False
        self.registry = CollectorRegistry()
        self.registry.register(DetectorCollector(fleet))
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        # anomaly.review.ReviewPages behind the one staff login (staff.file, or its
        # old name anomaly.reviewers_file), as on a single gateway.
        self.review: Any = None
        login = staff_login_for(fleet.settings)
        if login is not None:
            from anomaly.review import ReviewPages

            self.review = ReviewPages(FleetReviewHost(fleet), settings, login)
            self.review.install(self.app)
        self._listener = HttpListener(self.app, self.host, self.requested_port)
        self._started = False

    @property
    def port(self) -> int:
        return self._listener.port

    async def start(self) -> None:
        """Listen; raises OSError (port taken) with the address in its text."""
        try:
            await self._listener.start()
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {self.host}:{self.requested_port}"
                f" (anomaly.detector_admin_port): {exc.strerror or exc}",
            ) from None
        self._started = True
        if self.review is not None:
            self.review.attach_store(self.fleet.detector.store)

    async def stop(self) -> None:
        self.stopping = True
        if self._started:
            await self._listener.stop()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = detector_readiness(self.fleet, self.stopping)
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

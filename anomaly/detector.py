"""The live detector: traffic events in, alerts and responses out.

The gateway process does only what is O(1) per event or small per window:

* the event-bus sink appends each ``TrafficEvent`` to a list (no wrapper);
* every ``FLUSH_SECONDS`` that list goes, as tuples in pickled batches, to the
  detector's worker process (``anomaly/child.py``, ``anomaly/worker.py``),
  which aggregates the windows, merges the long window, scores, explains,
  warms up, retrains and records — so none of that holds the GIL of the
  gateway, nor fills its heap with objects the collector has to scan;
* at each window boundary (aligned to the clock) a ``window`` message; the
  answer (the flagged decisions, or all of them when listeners or ``tick``
  want them) comes back in order, and on the loop each flagged subject gets
  one alert (not again for the same subject while its alert is younger than
  ``REALERT_WINDOWS`` windows, unless the severity rises), the response of its
  severity, the store's outbox flush.

The worker is supervised: if it dies (or answers no window for
``reply_timeout`` seconds, and is killed), that is logged and counted
(``worker_restarts``, ``rabbitgate_anomaly_worker_restarts_total``) and a
new one is started, which loads the model from disk; the windows in flight,
the long window begun and, while learning, the warm-up so far are lost, and
the first (partial) window of the new worker is dropped. Events are dropped,
and counted, while no worker runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from anomaly.alerts import STORE_FILE, AlertStore, Restriction, make_alert
from anomaly.child import WorkerGone, WorkerProcess
from anomaly.exchange import AlertOutbox, AlertPublisher
from anomaly.features import OVERFLOW, SubjectWindow
from anomaly.model import MODEL_FILE, AnomalyModel
from anomaly.settings import AnomalySettings
from anomaly.worker import Outcome, Scored, event_tuple
from gateway.limits.restrictions import Restrictions, Rule
from gateway.protocol.codes import CLOSE_BANNED
from gateway.telemetry.events import EventBus, TrafficEvent

if TYPE_CHECKING:
    from gateway.core.transport import Subscriber
    from gateway.telemetry.metrics import Metrics

__all__ = ["Detector", "Scored"]

log = logging.getLogger("rabbitgate.anomaly")

# Alert once per subject while its alert is open and younger than this many windows.
REALERT_WINDOWS = 10
# Events go to the worker this often, in batches of at most FLUSH_BATCH: a batch
# is pickled on the loop (about 1.5 us an event), so it is kept small.
FLUSH_SECONDS = 0.025
FLUSH_BATCH = 1000
# A worker that answers no window for this long is taken for hung and replaced.
REPLY_TIMEOUT_SECONDS = 300.0
# Restarts sooner than this after the previous one wait, doubling up to the cap
# (a worker that dies at every start must not spin).
RESTART_CALM_SECONDS = 60.0
MAX_RESTART_DELAY = 60.0
_SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}

Listener = Callable[[list[Scored]], None]


class HostNode(Protocol):
    """What the detector uses of the gateway's node: its events, its
    restrictions, its live connections (to close what a ban names)."""

    @property
    def events(self) -> EventBus: ...

    @property
    def restrictions(self) -> Restrictions: ...

    @property
    def sessions(self) -> Collection[Subscriber]: ...


class HostSettings(Protocol):
    @property
    def anomaly(self) -> AnomalySettings: ...

    @property
    def amqp_url(self) -> str: ...


class Host(Protocol):
    """The gateway a detector attaches to (``gateway.app.Gateway`` is one)."""

    @property
    def node(self) -> HostNode: ...

    @property
    def settings(self) -> HostSettings: ...


class Detector:
    """Attach to a gateway with ``Detector(gateway)``; ``start``/``stop`` with it."""

    def __init__(
        self,
        gateway: Host,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.gateway = gateway
        self.node = gateway.node
        self.metrics = metrics  # the gateway's, for the worker restarts counter
        self.settings: AnomalySettings = gateway.settings.anomaly
        self._clock = clock
        s = self.settings
        self.model_path = s.data_dir / MODEL_FILE
        self.store: AlertStore | None = None
        self.outbox: AlertOutbox | None = None
        self.publisher = AlertPublisher(gateway.settings.amqp_url, s.exchange)
        self.model: AnomalyModel | None = None  # the worker's, as of its last answer
        self.listeners: list[Listener] = []  # told every window's decisions (evaluation)
        self.windows_closed = 0
        self.long_windows_closed = 0
        self.windows_lost = 0  # windows whose worker died (or hung) before answering
        self.events_dropped = 0  # events that arrived while no worker ran
        self.worker_restarts = 0
        self.alerts_capped = 0  # flagged subjects not raised: over max_alerts_per_window
        self.learning = False  # True while warming up (no model yet)
        self.reply_timeout = REPLY_TIMEOUT_SECONDS
        self.worker: WorkerProcess | None = None
        self._worker_since = 0.0  # when the running worker started (our clock)
        self._window_start = 0.0  # when the current window began (our clock)
        self._recent: dict[tuple[str, str], tuple[str, float, str]] = {}  # subject -> alert
        self._pending: list[TrafficEvent] = []
        self._banned: weakref.WeakSet[Subscriber] = weakref.WeakSet()  # closed with 4403
        self._tasks: list[asyncio.Task[None]] = []
        self._worker_ready = asyncio.Event()
        self._stopping = False
        self._started = False
        node = self.node
        node.restrictions.throttle_per_second = s.throttle_per_second
        # The sink: a list's own append, no wrapper on the hot path.
        node.events.subscribe(self._pending.append)

    # --- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the store, start the worker (it loads, trains or learns the model), run."""
        s = self.settings
        self.store = await asyncio.to_thread(AlertStore, s.data_dir / STORE_FILE)
        self.outbox = AlertOutbox(self.store, self.publisher)
        self._window_start = self._clock()
        self._pending.clear()  # events before the start: not part of any window
        try:
            await self._start_worker()
        except WorkerGone:
            log.error("anomaly worker process ended while starting; trying again")
        if self.learning:
            log.info(
                "anomaly detection: no model yet, learning from %d windows of %gs",
                s.warmup_windows,
                s.window_seconds,
            )
        await self.sync_restrictions()
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._windows()),
            loop.create_task(self._flushing()),
            loop.create_task(self._supervise()),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._started = False
        if self.worker is not None:
            self._flush()  # the recording gets the last events
            await self.worker.stop()
        if self.outbox is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.outbox.flush(), 10)
        await self.publisher.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def _log_setup(self) -> tuple[str, str]:
        settings = self.gateway.settings
        return getattr(settings, "log_level", "INFO"), getattr(settings, "log_format", "text")

    async def _start_worker(self) -> None:
        """Start a worker; raises WorkerGone when it died while loading the model
        (``self.worker`` is that dead one then: the supervisor starts another)."""
        worker = WorkerProcess(self.settings, self._log_setup())
        self.worker = worker
        self.model = await worker.start()
        self.learning = self.model is None
        self._worker_since = self._clock()
        self._worker_ready.set()

    async def _supervise(self) -> None:
        """Restart the worker whenever it ends (with a growing delay if it keeps ending)."""
        delay = 0.0
        last = -math.inf
        while True:
            worker = self.worker
            assert worker is not None
            await worker.gone.wait()
            self._worker_ready.clear()
            await asyncio.to_thread(worker.process.join, 5)
            code = worker.process.exitcode
            await worker.close()
            self.worker_restarts += 1
            if self.metrics is not None:
                self.metrics.anomaly_worker_restarts.inc()
            now = time.monotonic()
            delay = (
                min(max(1.0, 2 * delay), MAX_RESTART_DELAY)
                if now - last < RESTART_CALM_SECONDS
                else 0.0
            )
            last = now
            log.error(
                "anomaly worker process %s ended (exit code %s); starting a new one%s,"
                " with the model from %s",
                worker.pid,
                code,
                f" in {delay:g} s" if delay else "",
                self.model_path,
            )
            await asyncio.sleep(delay)
            with contextlib.suppress(WorkerGone):  # it says why; gone is set: around again
                await self._start_worker()
                log.info("anomaly worker process %s started", self._pid())

    def _pid(self) -> int | None:
        return None if self.worker is None else self.worker.pid

    async def _ready(self) -> WorkerProcess:
        """The running worker (waits while one is being started)."""
        while True:
            await self._worker_ready.wait()
            worker = self.worker
            if worker is not None and worker.alive:
                return worker
            await asyncio.sleep(0.05)  # the supervisor has not noticed yet

    # --- events to the worker ---------------------------------------------------

    async def _flushing(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self._flush()

    def _flush(self) -> None:
        """Send the events so far to the worker (dropped, and counted, if none runs)."""
        pending = self._pending
        if not pending:
            return
        worker = self.worker
        for start in range(0, len(pending), FLUSH_BATCH):
            batch = list(map(event_tuple, pending[start : start + FLUSH_BATCH]))
            if worker is None or not worker.send(("events", batch)):
                self.events_dropped += len(batch)
        pending.clear()

    def _close_window(self, now: float, drop: bool, keep_all: bool) -> asyncio.Future[Any] | None:
        """End the window at ``now``: its events, then the boundary, go to the worker.
        Returns the future of its outcome (None when dropped or no worker runs)."""
        self._flush()
        self._window_start = now
        worker = self.worker
        if worker is None or not worker.alive:
            return None
        if not worker.send(("window", now, drop, keep_all or bool(self.listeners))):
            return None
        return None if drop else worker.expect()

    # --- windows ------------------------------------------------------------

    async def _windows(self) -> None:
        """Close the window at each boundary, on time; a second task acts on it.

        Closing is all that runs at the boundary, so alert I/O or a slow
        window never stretches the next one (a late window would distort its
        counts and gaps). The first window, and the first of a new worker, are
        partial: dropped.
        """
        seconds = self.settings.window_seconds
        queue: asyncio.Queue[tuple[asyncio.Future[Any], float]] = asyncio.Queue()
        actor = asyncio.get_running_loop().create_task(self._act_on_windows(queue))
        try:
            boundary = (math.floor(self._clock() / seconds) + 1) * seconds
            while True:
                await asyncio.sleep(max(0.0, boundary - self._clock()))
                now = max(boundary, self._clock())
                drop = self._worker_since > self._window_start
                future = self._close_window(now, drop, False)
                if future is not None:
                    queue.put_nowait((future, now))
                elif not drop:
                    self.windows_lost += 1
                boundary += seconds
                while boundary <= self._clock():  # the loop was blocked a whole window
                    boundary += seconds
        finally:
            actor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await actor

    async def _act_on_windows(
        self, queue: asyncio.Queue[tuple[asyncio.Future[Any], float]]
    ) -> None:
        while True:
            future, end = await queue.get()
            try:
                await self._act(await self._outcome(future, end))
            except WorkerGone:
                self.windows_lost += 1
                log.warning("anomaly window ending at %s lost: the worker process ended", end)
            except Exception:
                log.exception("anomaly window ending at %s failed", end)

    async def _outcome(self, future: asyncio.Future[Any], end: float) -> Outcome:
        try:
            kind, value = await asyncio.wait_for(asyncio.shield(future), self.reply_timeout)
        except TimeoutError:
            worker = self.worker
            log.error(
                "anomaly worker process %s answered no window for %g s: killing it",
                self._pid(),
                self.reply_timeout,
            )
            if worker is not None:
                worker.kill()
            raise WorkerGone("the anomaly worker process hung") from None
        if kind != "window":
            raise RuntimeError(f"the anomaly worker failed on the window: {value}")
        assert isinstance(value, Outcome)
        return value

    async def tick(self, now: float | None = None) -> list[Scored]:
        """Close the current window at ``now`` and act on it; returns all its decisions."""
        await self._ready()
        now = self._clock() if now is None else now
        future = self._close_window(now, False, True)
        if future is None:
            raise WorkerGone("the anomaly worker process is not running")
        return await self._act(await self._outcome(future, now))

    async def _act(self, outcome: Outcome) -> list[Scored]:
        """Take the worker's outcome of a window: model, listeners, alerts, outbox."""
        if outcome.model is not None:
            self.model = outcome.model
        self.learning = outcome.learning
        self.windows_closed += 1
        if outcome.long_window:
            self.long_windows_closed += 1
        scored = outcome.scored
        for listener in self.listeners:
            listener(scored)
        await self._alerts(scored)
        if self.outbox is not None:
            await self.outbox.flush()
        if self.windows_closed % 5 == 0:
            await self.sync_restrictions()
        return scored

    # --- alerts and responses ----------------------------------------------

    async def _alerts(self, scored: list[Scored]) -> None:
        """Alerts for a window's flagged subjects, highest scores first, at most
        ``max_alerts_per_window`` (an alert storm must not take the gateway down
        with it: each alert is a database write, a confirmed publish, a log line)."""
        assert self.store is not None
        flagged = sorted((d for d in scored if d.flagged), key=lambda d: -d.score)
        raised: list[dict[str, Any]] = []
        skipped = 0
        for decision in flagged:
            if len(raised) >= self.settings.max_alerts_per_window:
                skipped += 1
                continue
            alert = await self._alert(decision)
            if alert is not None:
                raised.append(alert)
        if raised:
            await asyncio.to_thread(self.store.add_many, raised)
        if skipped:
            self.alerts_capped += skipped
            log.warning(
                "anomaly: %d more flagged subjects in this window were not raised as alerts"
                " (anomaly.max_alerts_per_window = %d)",
                skipped,
                self.settings.max_alerts_per_window,
            )

    async def _alert(self, decision: Scored) -> dict[str, Any] | None:
        """The alert for one flagged window (None when its subject was alerted recently)."""
        assert self.store is not None and decision.severity is not None
        window = decision.window
        subject = (window.subject_kind, window.key)
        now = self._clock()
        recent = self._recent.get(subject)
        realert = REALERT_WINDOWS * self.settings.window_seconds
        if recent is not None:
            severity, raised, _ = recent
            higher = _SEVERITY_RANK[decision.severity] > _SEVERITY_RANK[severity]
            if now - raised < realert and not higher:
                return None
        alert = make_alert(window, decision.score, decision.severity, decision.reasons, now)
        alert["actions"] = await self._respond(alert, window, decision.severity, now)
        self._recent[subject] = (decision.severity, now, alert["id"])
        if len(self._recent) > 10 * self.settings.max_subjects:
            self._recent = {k: v for k, v in self._recent.items() if now - v[1] < realert}
        metrics = getattr(self.node, "metrics", None)
        if metrics is not None and hasattr(metrics, "alerts_total"):
            metrics.alerts_total.labels(decision.severity).inc()
        log.warning(
            "anomaly alert %s (%s, score %.2f) on %s %s: %s",
            alert["id"],
            decision.severity,
            decision.score,
            window.subject_kind,
            window.key,
            "; ".join(reason.text for reason in decision.reasons),
        )
        return alert

    async def _respond(
        self, alert: dict[str, Any], window: SubjectWindow, severity: str, now: float
    ) -> list[str]:
        """Apply the configured response of ``severity``; returns the actions taken."""
        actions = ["recorded"]
        response = self.settings.response(severity)
        kind, key = window.subject_kind, window.key
        if response == "record":
            return actions
        if key in ("", OVERFLOW):
            return [*actions, f"{response} skipped: the subject has no single {kind}"]
        s = self.settings
        seconds = s.ban_seconds if response == "ban" else s.throttle_seconds
        restriction = Restriction(alert["id"], kind, key, response, now + seconds)
        assert self.store is not None
        await asyncio.to_thread(self.store.restrict, restriction)
        self.node.restrictions.add(Rule(kind, key, response, now + seconds))
        if response == "throttle":
            actions.append(
                f"throttled {kind} {key} to {s.throttle_per_second:g} requests/s for {seconds:g} s"
            )
            return actions
        actions.append(f"banned {kind} {key} for {seconds:g} s")
        closed = self.disconnect(kind, key)
        actions.append(f"closed {closed} connection{'s' if closed != 1 else ''} with 4403")
        return actions

    def disconnect(self, kind: str, key: str) -> int:
        """Close every live connection of the subject with 4403; returns how many.

        SSE streams are sessions too (``node.sessions``): each is closed, and
        counted, once. A connection an earlier ban closed (it may still be in
        ``node.sessions`` while its close completes) is not counted again."""
        closed = 0
        for session in list(self.node.sessions):
            who = session.principal.sub if kind == "user" else session.address
            if who == key and session not in self._banned:
                self._banned.add(session)
                self.node.events.emit(
                    TrafficEvent(
                        "banned", session.address, session.principal.sub, session.id, detail="4403"
                    )
                )
                session.close(CLOSE_BANNED, "banned")
                closed += 1
        return closed

    async def sync_restrictions(self) -> None:
        """Put the store's bans and throttles in force here (reviews may have lifted some)."""
        if self.store is None:
            return
        found = await asyncio.to_thread(self.store.restrictions)
        self.node.restrictions.replace(Rule(r.kind, r.key, r.mode, r.until) for r in found)

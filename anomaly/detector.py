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
  want them) comes back in order, and on the loop the incident book
  (``anomaly/incidents.py``) turns them into new alerts (with the response of
  their severity), updates of open ones, suppressions and ended episodes; then
  the store's outbox is flushed.

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
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from anomaly.alerts import (
    STORE_FILE,
    AlertStore,
    Restriction,
    UnknownAlert,
    from_iso,
    incident_update,
    make_alert,
    new_alert_id,
)
from anomaly.child import WorkerGone, WorkerProcess
from anomaly.exchange import AlertOutbox, AlertPublisher
from anomaly.features import OVERFLOW, SubjectWindow
from anomaly.incidents import Change, Incident, IncidentBook, IncidentPolicy
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
        # The fleet detector (anomaly/fleet.py) passes responses on to every gateway.
        self.on_restrict: Callable[[Rule], Awaitable[None]] | None = None
        self.on_restrictions: Callable[[list[Rule]], Awaitable[None]] | None = None
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
        self.book = IncidentBook(
            IncidentPolicy(
                s.window_seconds,
                s.incident_quiet_windows * s.window_seconds,
                s.suppress_seconds,
                s.persist_min,
                s.persist_windows,
            ),
            new_alert_id,
        )
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
        await self._restore_incidents()
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

    async def _restore_incidents(self) -> None:
        """Open incidents and recent benign closes come back from the store: a
        restart neither raises an open incident again nor forgets a suppression."""
        assert self.store is not None
        now = self._clock()
        bodies = await asyncio.to_thread(
            self.store.running_incidents, now - self.settings.suppress_seconds
        )
        running = []
        for body in bodies:
            incident = incident_of(body)
            if incident is None:
                continue
            if body["status"] == "closed":
                self.book.remember_closed(incident.subject, incident, from_iso(body["updated_at"]))
            else:
                running.append(incident)
        self.book.restore(running)

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
        if self.windows_closed % 5 == 0 or self.on_restrictions is not None:
            await self.sync_restrictions()
        return scored

    # --- alerts and responses ----------------------------------------------

    async def _alerts(self, scored: list[Scored]) -> None:
        """A window's anomalous subjects -> incidents: new alerts, updates of open
        ones, suppressions, episodes that ended (``anomaly/incidents.py``).

        New alerts are capped at ``max_alerts_per_window``, highest scores first
        (an alert storm must not take the gateway down with it: each alert is a
        database write, a confirmed publish, a log line); the rest are counted."""
        assert self.store is not None
        now = self._clock()
        await self._sync_reviews(now)
        findings = sorted((d.finding() for d in scored if d.flagged), key=lambda f: -f.score)
        changes = self.book.observe(findings) + self.book.expire(now)
        raised: list[dict[str, Any]] = []
        changed: dict[str, dict[str, Any]] = {}
        skipped = 0
        for change in changes:
            if change.kind == "new":
                if len(raised) >= self.settings.max_alerts_per_window:
                    self.book.open.pop(change.incident.subject, None)
                    skipped += 1
                    continue
                raised.append(await self._alert(change, now))
            else:
                alert_id = change.incident.alert_id
                if alert_id in changed:
                    body = changed[alert_id]
                else:
                    try:
                        body = await asyncio.to_thread(self.store.get, alert_id)
                    except UnknownAlert:
                        continue
                changed[alert_id] = await self._moved_on(body, change, now)
        if raised:
            await asyncio.to_thread(self.store.add_many, raised)
        if changed:
            await asyncio.to_thread(self.store.update, list(changed.values()))
        if skipped:
            self.alerts_capped += skipped
            log.warning(
                "anomaly: %d more anomalous subjects in this window were not raised as alerts"
                " (anomaly.max_alerts_per_window = %d)",
                skipped,
                self.settings.max_alerts_per_window,
            )

    async def _sync_reviews(self, now: float) -> None:
        """Tell the book what reviewers closed since (page, CLI, another process)."""
        assert self.store is not None
        running = {i.alert_id: i for i in self.book.open.values()}
        if not running:
            return
        found = await asyncio.to_thread(self.store.reviews, list(running))
        for alert_id, (status, resolution) in found.items():
            if status == "closed":
                self.book.reviewed(running[alert_id].subject, alert_id, resolution, now)

    async def _alert(self, change: Change, now: float) -> dict[str, Any]:
        """The new alert of an incident, with the response of its severity."""
        decision = change.finding.ref if change.finding is not None else None
        assert isinstance(decision, Scored) and decision.severity is not None
        incident = change.incident
        window = decision.window
        alert = make_alert(
            window,
            decision.score,
            decision.severity,
            decision.reasons,
            now,
            alert_id=incident.alert_id,
            windows=incident.windows,
            first_seen=incident.first_seen,
        )
        alert["actions"] = await self._respond(alert, window, decision.severity, now)
        metrics = getattr(self.node, "metrics", None)
        if metrics is not None and hasattr(metrics, "alerts_total"):
            metrics.alerts_total.labels(decision.severity).inc()
        log.warning(
            "anomaly alert %s (%s, score %.2f) on %s %s: %s",
            alert["id"],
            decision.severity,
            decision.score,
            window.subject_kind,
            _printable(window.key),
            _printable("; ".join(reason.text for reason in decision.reasons)),
        )
        return alert

    async def _moved_on(self, body: dict[str, Any], change: Change, now: float) -> dict[str, Any]:
        """An alert after an update, a suppression or the end of its episode."""
        incident = change.incident
        if change.kind == "ended":
            return incident_update(
                body,
                windows=incident.windows,
                last_seen=incident.last_seen,
                suppressed=incident.suppressed,
                ended_at=now,
            )
        decision = change.finding.ref if change.finding is not None else None
        assert isinstance(decision, Scored)
        if change.kind == "suppressed":
            return incident_update(
                body,
                windows=incident.windows,
                last_seen=incident.last_seen,
                suppressed=incident.suppressed,
            )
        before = body["severity"]
        added = [r for r in decision.reasons if r.feature in change.new_reasons]
        changed = incident_update(
            body,
            windows=incident.windows,
            last_seen=incident.last_seen,
            suppressed=incident.suppressed,
            window=decision.window,
            score=decision.score,
            severity=decision.severity,
            new_reasons=added,
        )
        if _SEVERITY_RANK[changed["severity"]] > _SEVERITY_RANK[before]:
            # A worse window of the same incident gets the response of its severity.
            actions = await self._respond(changed, decision.window, changed["severity"], now)
            changed["actions"] = [*changed["actions"], *actions[1:]]
        return changed

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
        rule = Rule(kind, key, response, now + seconds)
        self.node.restrictions.add(rule)
        if self.on_restrict is not None:
            await self.on_restrict(rule)
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
        rules = [Rule(r.kind, r.key, r.mode, r.until) for r in found]
        self.node.restrictions.replace(rules)
        if self.on_restrictions is not None:
            await self.on_restrictions(rules)


def incident_of(body: dict[str, Any]) -> Incident | None:
    """The incident of a stored alert (None for an alert of before incidents)."""
    try:
        subject = body["subject"]
        kind = subject["kind"]
        return Incident(
            body["id"],
            (kind, str(subject.get(kind) or "")),
            from_iso(body["first_seen"]),
            from_iso(body["last_seen"]),
            int(body["windows"]),
            float(body["score"]),
            str(body["severity"]),
            [str(r["feature"]) for r in body["reasons"]],
            int(body.get("suppressed", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _printable(text: str) -> str:
    """Log lines carry names from tokens: no control characters (log injection)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))

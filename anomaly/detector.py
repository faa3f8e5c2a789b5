"""The live detector: windows of traffic events, scored off the event loop.

On the event loop only three cheap things happen: the event-bus sink
(``WindowAggregator.add``, O(1) per event), the swap of the finished window's
state at each window boundary (O(1)), and storing/publishing the few alerts.
Everything that grows with traffic — turning states into vectors, merging the
long window, scoring, explaining, training — runs in one worker thread, which
alone owns the model and the long-window state.

Life of a window (every ``anomaly.window_seconds``, aligned to the clock):

1. swap the aggregator's state (the first, partial window is dropped);
2. in the worker: vectors per subject; every ``long_window_windows`` windows
   also the long window; score each vector with its model key's forest;
   flagged = score above the key's threshold; explain the flagged ones;
   while there is no model, keep the vectors for the warm-up instead, and fit
   once ``warmup_windows`` windows were seen (then save the model);
3. on the loop: one alert per flagged subject (not again for the same subject
   while its alert is open and younger than ``realert_windows`` windows,
   unless the severity rises), the response of its severity, the outbox flush.

Unflagged vectors are kept (bounded) as the baseline of the next scheduled
retraining. Poisoning risk: an attacker who stays just below the threshold
for a whole retrain interval shifts the baseline; retraining keeps the
previous baseline rows in the mix for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomaly.alerts import STORE_FILE, AlertStore, Restriction, make_alert
from anomaly.exchange import AlertOutbox, AlertPublisher
from anomaly.features import (
    OVERFLOW,
    SubjectWindow,
    WindowAggregator,
    WindowState,
    iter_subject_windows,
    merge_states,
)
from anomaly.model import MAX_KEPT_ROWS, MIN_ROWS, MODEL_FILE, AnomalyModel, ModelError, Reason
from anomaly.settings import AnomalySettings
from anomaly.traffic import baseline_rows, model_key, read_events, write_events
from gateway.events import TrafficEvent
from gateway.restrictions import CLOSE_BANNED, Rule

log = logging.getLogger("rabbitgate.anomaly")

# Alert once per subject while its alert is open and younger than this many windows.
REALERT_WINDOWS = 10
# The worker steps aside for the event loop after this many subjects (vectors,
# merges, frees) or rows (scores): its work per window grows with the subjects,
# and run in one stretch it would hold the GIL, so the loop, for as long.
# ``time.sleep(0)`` is not enough: the releasing thread usually takes the GIL
# straight back; a real sleep lets the loop's thread run.
BLOCK = 64
STEP_ASIDE_SECONDS = 0.001
# Events buffered for the recording between two window boundaries.
MAX_RECORDED_EVENTS = 1_000_000
_SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


@dataclass(frozen=True)
class Scored:
    """The detector's decision about one subject-window."""

    window: SubjectWindow
    key: str
    score: float
    threshold: float
    flagged: bool
    severity: str | None = None
    reasons: list[Reason] = field(default_factory=list)


Listener = Callable[[list[Scored]], None]


class Detector:
    """Attach to a gateway with ``Detector(gateway)``; ``start``/``stop`` with it."""

    def __init__(self, gateway: Any, clock: Callable[[], float] = time.time) -> None:
        self.gateway = gateway
        self.node = gateway.node
        self.settings: AnomalySettings = gateway.settings.anomaly
        self._clock = clock
        s = self.settings
        self.aggregator = WindowAggregator(s.max_subjects, start=clock())
        self.model_path = s.data_dir / MODEL_FILE
        self.store: AlertStore | None = None
        self.outbox: AlertOutbox | None = None
        self.publisher = AlertPublisher(gateway.settings.amqp_url, s.exchange)
        self.model: AnomalyModel | None = None
        self.listeners: list[Listener] = []  # told every window's decisions (evaluation)
        self.windows_closed = 0
        self.long_windows_closed = 0
        self.alerts_capped = 0  # flagged subjects not raised: over max_alerts_per_window
        self.learning = False  # True while warming up (no model yet)
        self._warmup_windows = 0
        self._baseline: dict[str, deque[list[float]]] = {}
        self._long: WindowState | None = None
        self._long_count = 0
        self._recorded: list[TrafficEvent] = []
        self._record_dropped = 0
        self._recent: dict[tuple[str, str], tuple[str, float, str]] = {}  # subject -> alert
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rabbitgate-anomaly")
        self._task: asyncio.Task[None] | None = None
        self._started = False
        node = self.node
        node.restrictions.throttle_per_second = s.throttle_per_second
        # The sink: the aggregator's own bound method, no wrapper on the hot path.
        node.events.subscribe(self.aggregator.add)
        if s.record_file is not None:
            node.events.subscribe(self._record)

    @property
    def short_key_seconds(self) -> float:
        return self.settings.window_seconds

    @property
    def long_key_seconds(self) -> float:
        return self.settings.window_seconds * self.settings.long_window_windows

    # --- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load (or train, or start learning) the model, run the windows."""
        s = self.settings
        self.store = await asyncio.to_thread(AlertStore, s.data_dir / STORE_FILE)
        self.outbox = AlertOutbox(self.store, self.publisher)
        self.model = await self._run(self._initial_model)
        self.learning = self.model is None
        if self.learning:
            log.info(
                "anomaly detection: no model yet, learning from %d windows of %gs",
                s.warmup_windows,
                s.window_seconds,
            )
        await self.sync_restrictions()
        self._started = True
        self._task = asyncio.get_running_loop().create_task(self._windows())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._started = False
        if self._recorded:
            await self._flush_recording()
        if self.outbox is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.outbox.flush(), 10)
        await self.publisher.close()
        # A fit may still be running: wait for it without blocking the loop.
        await asyncio.to_thread(self._worker.shutdown, True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def _initial_model(self) -> AnomalyModel | None:
        s = self.settings
        try:
            model = AnomalyModel.load(self.model_path)
        except FileNotFoundError:
            model = None
        except ModelError as exc:
            log.error("anomaly model not loaded: %s", exc)
            model = None
        if model is not None:
            missing = {self._key("user"), self._key("address")} - set(model.keys)
            if missing:
                log.warning(
                    "anomaly model %s has no forest for %s (window length changed?): retraining",
                    self.model_path,
                    ", ".join(sorted(missing)),
                )
                model = None
            else:
                log.info("anomaly model loaded from %s", self.model_path)
                for key, keyed in model.keys.items():
                    self._baseline[key] = deque(keyed.rows.tolist(), maxlen=MAX_KEPT_ROWS)
                return model
        if s.traffic_file is not None:
            rows = baseline_rows(
                read_events(s.traffic_file), s.window_seconds, s.long_window_windows, s.max_subjects
            )
            model = AnomalyModel.fit(rows, s.contamination)
            if model.keys:
                model.save(self.model_path)
                log.info("anomaly model trained from %s", s.traffic_file)
                return model
            log.warning("recorded traffic %s holds too few windows to train on", s.traffic_file)
        return None

    def _key(self, kind: str, long: bool = False) -> str:
        return model_key(kind, self.long_key_seconds if long else self.short_key_seconds)

    # --- the sink -----------------------------------------------------------

    def _record(self, event: TrafficEvent) -> None:
        if len(self._recorded) < MAX_RECORDED_EVENTS:
            self._recorded.append(event)
        else:
            self._record_dropped += 1

    async def _flush_recording(self) -> None:
        events, self._recorded = self._recorded, []
        path = self.settings.record_file
        if path is not None and events:
            await asyncio.to_thread(write_events, path, events)

    # --- windows ------------------------------------------------------------

    async def _windows(self) -> None:
        """Swap the window at each boundary, on time; a second task acts on it.

        The swap is all that runs at the boundary, so alert I/O or a slow
        scoring never stretches the next window (a late window would distort
        its counts and gaps).
        """
        seconds = self.settings.window_seconds
        queue: asyncio.Queue[WindowState] = asyncio.Queue()
        worker = asyncio.get_running_loop().create_task(self._act_on_windows(queue))
        try:
            boundary = (math.floor(self._clock() / seconds) + 1) * seconds
            await asyncio.sleep(max(0.0, boundary - self._clock()))
            self.aggregator.swap(max(boundary, self._clock()))  # the partial first window: dropped
            boundary += seconds
            while True:
                await asyncio.sleep(max(0.0, boundary - self._clock()))
                queue.put_nowait(self.aggregator.swap(max(boundary, self._clock())))
                boundary += seconds
                while boundary <= self._clock():  # the loop was blocked a whole window
                    boundary += seconds
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _act_on_windows(self, queue: asyncio.Queue[WindowState]) -> None:
        while True:
            box = [await queue.get()]
            end = box[0].end
            try:
                await self._act(box)
            except Exception:
                log.exception("anomaly window ending at %s failed", end)

    async def tick(self, now: float | None = None) -> list[Scored]:
        """Close the current window at ``now`` and act on it; returns its decisions."""
        now = self._clock() if now is None else now
        return await self._act([self.aggregator.swap(now)], keep_all=True)

    async def _act(self, box: list[WindowState], keep_all: bool = False) -> list[Scored]:
        """Act on the window in ``box`` (the worker takes it out and frees it a
        block at a time). Returns the flagged decisions, or all with ``keep_all``
        or when listeners want them."""
        keep_all = keep_all or bool(self.listeners)
        scored: list[Scored] = await self._run(self._process, box, keep_all)
        self.windows_closed += 1
        for listener in self.listeners:
            listener(scored)
        if self._recorded:
            await self._flush_recording()
        await self._alerts(scored)
        if self.outbox is not None:
            await self.outbox.flush()
        if self.windows_closed % 5 == 0:
            await self.sync_restrictions()
        return scored

    def _process(self, box: list[WindowState], keep_all: bool) -> list[Scored]:
        """In the worker thread: vectors, long window, scores, warm-up, retraining."""
        state = box.pop()
        s = self.settings
        groups = [(self.short_key_seconds, _yielding(state, self.short_key_seconds))]
        if s.long_window_windows:
            if self._long is None:
                self._long = WindowState(state.start)
            merge_states(self._long, state, s.max_subjects, _yield_gil, BLOCK)
            self._long_count += 1
            if self._long_count >= s.long_window_windows:
                long_windows = _yielding(self._long, self.long_key_seconds)
                groups.append((self.long_key_seconds, long_windows))
                _free(self._long)
                self._long, self._long_count = None, 0
                self.long_windows_closed += 1
        _free(state)
        scored: list[Scored] = []
        for seconds, windows in groups:
            by_key: dict[str, list[SubjectWindow]] = {}
            for window in windows:
                if window.overflow:
                    scored.append(self._overflowed(window, model_key(window.subject_kind, seconds)))
                    continue
                by_key.setdefault(model_key(window.subject_kind, seconds), []).append(window)
            for key, members in by_key.items():
                scored.extend(self._score(key, members, keep_all))
        if self.model is None:
            self._warmup_windows += 1
            if self._warmup_windows >= s.warmup_windows:
                self._fit(self._baseline_rows(), "warm-up")
        else:
            # A key without a forest yet (the long window after a warm-up shorter
            # than it) gets one as soon as it has enough windows.
            missing = [
                k
                for k, v in self._baseline.items()
                if k not in self.model.keys and len(v) >= MIN_ROWS
            ]
            if missing:
                self._fit(self._baseline_rows(missing), "first windows of " + ", ".join(missing))
            elif s.retrain_interval_seconds and self._due_for_retraining():
                self._fit(self._baseline_rows(), "scheduled retraining")
        return scored

    def _score(self, key: str, windows: list[SubjectWindow], keep_all: bool = True) -> list[Scored]:
        rows = np.array([w.vector() for w in windows], dtype=np.float64)
        baseline = self._baseline.setdefault(key, deque(maxlen=MAX_KEPT_ROWS))
        keyed = self.model.keys.get(key) if self.model is not None else None
        if keyed is None:  # warming up, or this key's first windows: learn only
            baseline.extend(rows.tolist())
            return [Scored(w, key, 0.0, 1.0, False) for w in windows] if keep_all else []
        scores = np.concatenate(
            [_pause(keyed.score(rows[i : i + BLOCK])) for i in range(0, len(rows), BLOCK)]
        )
        found = []
        for n, (window, row, score) in enumerate(zip(windows, rows, scores, strict=True)):
            if n % BLOCK == BLOCK - 1:
                _yield_gil()
            score = float(score)
            if score > keyed.threshold:
                severity = self.settings.severity(score)
                reasons = keyed.explain(window.features)
                found.append(Scored(window, key, score, keyed.threshold, True, severity, reasons))
            else:
                baseline.append(row.tolist())
                if keep_all:
                    found.append(Scored(window, key, score, keyed.threshold, False))
        return found

    def _overflowed(self, window: SubjectWindow, key: str) -> Scored:
        limit = self.settings.max_subjects
        plural = "users" if window.subject_kind == "user" else "addresses"
        text = (
            f"more than {limit} distinct {plural} in one window: the rest were"
            " counted together (address cycling?)"
        )
        reason = Reason(f"distinct_{plural}", float(limit), 0.0, text, 100.0)
        return Scored(window, key, 1.0, 0.0, True, "high", [reason])

    def _baseline_rows(self, keys: list[str] | None = None) -> dict[str, list[list[float]]]:
        return {k: list(v) for k, v in self._baseline.items() if keys is None or k in keys}

    def _due_for_retraining(self) -> bool:
        assert self.model is not None
        trained = min(k.trained_at for k in self.model.keys.values())
        return time.time() - trained >= self.settings.retrain_interval_seconds

    def _fit(self, rows: dict[str, list[list[float]]], why: str) -> None:
        model = AnomalyModel.fit(rows, self.settings.contamination)
        if not model.keys:
            log.warning("anomaly %s: too few windows to train on yet", why)
            return
        if self.model is not None:  # keep forests of keys that had too few new rows
            for key, keyed in self.model.keys.items():
                model.keys.setdefault(key, keyed)
        model.save(self.model_path)
        self.model = model
        self.learning = False
        for key, keyed in model.keys.items():
            self._baseline[key] = deque(keyed.rows.tolist(), maxlen=MAX_KEPT_ROWS)
        counts = ", ".join(f"{k}: {len(v.rows)}" for k, v in sorted(model.keys.items()))
        log.info(
            "anomaly model trained (%s) on %s windows; saved to %s", why, counts, self.model_path
        )

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
        """Close every live connection of the subject with 4403; returns how many."""
        closed = 0
        for session in list(self.node.sessions):
            who = session.principal.sub if kind == "user" else session.address
            if who == key:
                self.node.events.emit(
                    TrafficEvent(
                        "banned", session.address, session.principal.sub, session.id, detail="4403"
                    )
                )
                session.close(CLOSE_BANNED, "banned")
                closed += 1
        sse = getattr(getattr(self.gateway, "ops", None), "sse", None)
        for stream in list(getattr(sse, "streams", ())):
            who = stream.principal.sub if kind == "user" else stream.address
            if who == key:
                stream.close(CLOSE_BANNED, "banned")
                closed += 1
        return closed

    async def sync_restrictions(self) -> None:
        """Put the store's bans and throttles in force here (reviews may have lifted some)."""
        if self.store is None:
            return
        found = await asyncio.to_thread(self.store.restrictions)
        self.node.restrictions.replace(Rule(r.kind, r.key, r.mode, r.until) for r in found)


def _yield_gil() -> None:
    time.sleep(STEP_ASIDE_SECONDS)


def _pause(value: Any) -> Any:
    """Let the event loop's thread take the GIL now (the worker is not in a hurry)."""
    time.sleep(STEP_ASIDE_SECONDS)
    return value


def _yielding(state: WindowState, nominal: float) -> list[SubjectWindow]:
    windows = []
    for n, window in enumerate(iter_subject_windows(state, nominal), 1):
        windows.append(window)
        if n % BLOCK == 0:
            _yield_gil()
    return windows


def _free(state: WindowState) -> None:
    """Drop a window's subjects a block at a time: freeing thousands of objects at
    once would hold the GIL, and so the event loop, for as long."""
    for table in (state.users, state.addresses):
        while table:
            for _ in range(min(BLOCK, len(table))):
                table.popitem()
            _yield_gil()

"""Everything of the detector that grows with traffic, in a process of its own.

The gateway's event loop must never wait on this work, and a thread would not
do: it shares the GIL with the loop, and a window's thousands of objects
trigger full garbage collections there. So one child process
(``anomaly/child.py`` starts it) owns the window aggregation, the long window,
the model, the baseline rows, scoring, explanations, warm-up fitting,
retraining and the recording; the gateway only ships it the traffic events
and acts on the decisions it sends back.

``Worker`` is that work as a plain object (no I/O but the model file and the
recording), used in the child by ``serve`` and directly by unit tests.

Messages (pickled tuples; the child reads them in order, one thread):

* parent -> child ``("events", [event tuples])``: fed to the aggregator;
* ``("window", now, drop, keep_all)``: close the current window at ``now``
  (the boundary's time on the gateway's clock); ``drop`` it (a partial first
  window), or process it and answer ``("window", Outcome)`` (or
  ``("failed", text)`` when processing raised: the next window is tried);
* ``("stop",)``: finish the window at hand, write the recording, exit;
* child -> parent, once at start: ``("ready", model or None)``.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import queue
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from anomaly.features import (
    OVERFLOW,
    SubjectWindow,
    WindowAggregator,
    WindowState,
    merge_states,
    subject_windows,
)
from anomaly.incidents import Finding
from anomaly.model import MAX_KEPT_ROWS, MIN_ROWS, MODEL_FILE, AnomalyModel, ModelError, Reason
from anomaly.population import MassReconnect, clip_session_start
from anomaly.settings import AnomalySettings
from anomaly.spread import AddressSpread
from anomaly.traffic import baseline_rows, model_key, read_events, write_events
from gateway.telemetry.events import TrafficEvent
from gateway.telemetry.logs import configure_logging

log = logging.getLogger("rabbitgate.anomaly")

# An event as shipped to the child: its fields in this order (a tuple pickles
# several times faster than the dataclass).
EVENT_FIELDS = ("kind", "address", "user", "session", "channel", "size", "detail", "rule", "at")
event_tuple = operator.attrgetter(*EVENT_FIELDS)
# Events buffered for the recording between two window boundaries.
MAX_RECORDED_EVENTS = 1_000_000
# A user's addresses are counted over this many short windows (anomaly/spread.py).
SPREAD_WINDOWS = 3


class Reservoir:
    """A uniform sample of at most MAX_KEPT_ROWS baseline rows (Vitter's algorithm R).

    Not the last rows: a baseline of 10,000 users' windows holds that many rows
    in two windows, and the thresholds and the range guard need the rare
    windows of the whole baseline, not of its last minutes."""

    def __init__(self, rows: list[list[float]] | None = None, seed: int = 0) -> None:
        self.rows: list[list[float]] = list(rows or [])[-MAX_KEPT_ROWS:]
        self.seen = len(self.rows)
        self._random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: list[float]) -> None:
        self.seen += 1
        if len(self.rows) < MAX_KEPT_ROWS:
            self.rows.append(row)
            return
        slot = self._random.randrange(self.seen)
        if slot < MAX_KEPT_ROWS:
            self.rows[slot] = row

    def extend(self, rows: list[list[float]]) -> None:
        for row in rows:
            self.append(row)


@dataclass(frozen=True)
class Scored:
    """The detector's decision about one subject-window."""

    window: SubjectWindow
    key: str
    score: float
    threshold: float  # the single-window threshold
    flagged: bool  # above the persistence threshold: anomalous (an incident may follow)
    severity: str | None = None
    reasons: list[Reason] = field(default_factory=list)
    strong: bool = False  # above the single-window threshold: an alert by itself

    def finding(self) -> Finding:
        """This decision as the incident book sees it."""
        w = self.window
        key = OVERFLOW if w.overflow else w.key
        reasons = tuple(reason.feature for reason in self.reasons)
        return Finding(
            (w.subject_kind, key),
            w.end,
            self.score,
            self.strong,
            reasons,
            self.severity or "low",
            self,
            w.start,
        )


@dataclass
class Outcome:
    """What one window came to: decisions (flagged ones, or all with ``keep_all``),
    and the model when this window's work trained a new one."""

    scored: list[Scored]
    model: AnomalyModel | None = None  # only when it changed
    learning: bool = False
    long_window: bool = False  # this window also closed a long window


class Worker:
    """Windows -> decisions. Not thread-safe: one thread calls ``process``."""

    def __init__(self, settings: AnomalySettings) -> None:
        self.settings = settings
        self.model_path = settings.data_dir / MODEL_FILE
        self.model: AnomalyModel | None = None
        self._warmup_windows = 0
        # Why a fit found too few windows, already said at WARNING: a quiet
        # gateway retries every window and must not warn every window.
        self._too_few_warned: set[str] = set()
        self._baseline: dict[str, Reservoir] = {}
        self._long: WindowState | None = None
        self._long_count = 0
        self._model_changed = False
        self._mass = MassReconnect()
        self._spread = AddressSpread(SPREAD_WINDOWS)
        self._spread_now: dict[str, int] = {}
        self._long_mass = False

    @property
    def short_key_seconds(self) -> float:
        return self.settings.window_seconds

    @property
    def long_key_seconds(self) -> float:
        return self.settings.window_seconds * self.settings.long_window_windows

    def _key(self, kind: str, long: bool = False) -> str:
        return model_key(kind, self.long_key_seconds if long else self.short_key_seconds)

    def load(self) -> AnomalyModel | None:
        """The model on disk, or one trained from ``traffic_file``, or None (learn)."""
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
                    self._baseline[key] = Reservoir(keyed.rows.tolist())
        if model is None and s.traffic_file is not None:
            rows = baseline_rows(
                read_events(s.traffic_file), s.window_seconds, s.long_window_windows, s.max_subjects
            )
            fitted = AnomalyModel.fit(rows, s.budget(), s.lengths)
            if fitted.keys:
                fitted.save(self.model_path)
                log.info("anomaly model trained from %s", s.traffic_file)
                model = fitted
            else:
                log.warning("recorded traffic %s holds too few windows to train on", s.traffic_file)
        self.model = model
        return model

    def process(self, state: WindowState, keep_all: bool) -> Outcome:
        """Vectors, long window, scores, explanations, warm-up, retraining."""
        s = self.settings
        short = subject_windows(state, self.short_key_seconds)
        mass = self._mass.observe(short)
        self._spread_now = self._spread.observe(state.users)
        self._long_mass = self._long_mass or mass
        groups = [(self.short_key_seconds, short, mass)]
        long_window = False
        if s.long_window_windows:
            if self._long is None:
                self._long = WindowState(state.start)
            merge_states(self._long, state, s.max_subjects)
            self._long_count += 1
            if self._long_count >= s.long_window_windows:
                long = subject_windows(self._long, self.long_key_seconds)
                groups.append((self.long_key_seconds, long, self._long_mass))
                self._long, self._long_count, self._long_mass = None, 0, False
                long_window = True
        scored: list[Scored] = []
        for seconds, windows, fleet_event in groups:
            by_key: dict[str, list[SubjectWindow]] = {}
            for window in windows:
                if window.overflow:
                    scored.append(self._overflowed(window, model_key(window.subject_kind, seconds)))
                    continue
                by_key.setdefault(model_key(window.subject_kind, seconds), []).append(window)
            for key, members in by_key.items():
                scored.extend(self._score(key, members, keep_all, fleet_event))
        self._train_if_due()
        changed, self._model_changed = self._model_changed, False
        return Outcome(scored, self.model if changed else None, self.model is None, long_window)

    def _train_if_due(self) -> None:
        s = self.settings
        if self.model is None:
            self._warmup_windows += 1
            if self._warmup_windows >= s.warmup_windows:
                self._fit(self._baseline_rows(), "warm-up")
            return
        # A key without a forest yet (the long window after a warm-up shorter
        # than it) gets one as soon as it has enough windows.
        missing = [
            k for k, v in self._baseline.items() if k not in self.model.keys and len(v) >= MIN_ROWS
        ]
        if missing:
            self._fit(self._baseline_rows(missing), "first windows of " + ", ".join(missing))
        elif s.retrain_interval_seconds and self._due_for_retraining():
            self._fit(self._baseline_rows(), "scheduled retraining")

    def _score(
        self,
        key: str,
        windows: list[SubjectWindow],
        keep_all: bool = True,
        fleet_event: bool = False,
    ) -> list[Scored]:
        rows = np.array([w.vector() for w in windows], dtype=np.float64)
        baseline = self._baseline.get(key)
        if baseline is None:
            baseline = self._baseline[key] = Reservoir()
        keyed = self.model.keys.get(key) if self.model is not None else None
        if keyed is None:  # warming up, or this key's first windows: learn only
            baseline.extend(rows.tolist())
            return [Scored(w, key, 0.0, 1.0, False) for w in windows] if keep_all else []
        if fleet_event:  # most subjects reconnected at once (anomaly/population.py)
            scores = keyed.score(clip_session_start(rows, keyed.quantiles[100]))
        else:
            scores = keyed.score(rows)
        spread: dict[str, int] = {}
        if key == self._key("user"):
            spread = self._spread_now
        found = []
        limit = keyed.spread_limit()
        for window, row, score in zip(windows, rows, scores, strict=True):
            score = float(score)
            many = spread.get(window.key, 0)
            if many >= limit and score <= keyed.threshold:
                # One token in several hands over the last windows (anomaly/spread.py).
                score = keyed.threshold + (1.0 - keyed.threshold) * (
                    1.0 - 2.0 ** -(many - limit + 1)
                )
            if score > keyed.persist_threshold:
                severity = self.settings.severity(score)
                reasons = keyed.explain(window.features)
                if many >= limit:
                    reasons = [keyed.spread_reason(many, SPREAD_WINDOWS), *reasons]
                strong = score > keyed.threshold
                found.append(
                    Scored(window, key, score, keyed.threshold, True, severity, reasons, strong)
                )
            else:
                if not fleet_event:  # a restart's windows are not what normal looks like
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
        return Scored(window, key, 1.0, 0.0, True, "high", [reason], True)

    def _baseline_rows(self, keys: list[str] | None = None) -> dict[str, list[list[float]]]:
        return {k: v.rows for k, v in self._baseline.items() if keys is None or k in keys}

    def _due_for_retraining(self) -> bool:
        assert self.model is not None
        trained = min(k.trained_at for k in self.model.keys.values())
        return time.time() - trained >= self.settings.retrain_interval_seconds

    def _fit(self, rows: dict[str, list[list[float]]], why: str) -> None:
        model = AnomalyModel.fit(rows, self.settings.budget(), self.settings.lengths)
        if not model.keys:
            level = logging.DEBUG if why in self._too_few_warned else logging.WARNING
            self._too_few_warned.add(why)
            log.log(
                level,
                "anomaly %s: too few windows to train on yet; trying again each window",
                why,
            )
            return
        self._too_few_warned.discard(why)
        if self.model is not None:  # keep forests of keys that had too few new rows
            for key, keyed in self.model.keys.items():
                model.keys.setdefault(key, keyed)
        model.save(self.model_path)
        self.model = model
        self._model_changed = True
        for key, keyed in model.keys.items():
            self._baseline[key] = Reservoir(keyed.rows.tolist())
        counts = ", ".join(f"{k}: {len(v.rows)}" for k, v in sorted(model.keys.items()))
        log.info(
            "anomaly model trained (%s) on %s windows; saved to %s", why, counts, self.model_path
        )


# --- the child process --------------------------------------------------------


def serve(
    settings: AnomalySettings, inbox: Connection, outbox: Connection, logging_: tuple[str, str]
) -> None:
    """The child's main: read messages until ``stop`` or until the gateway is gone.

    The main thread reads (and aggregates: O(1) an event); a second thread
    processes finished windows, so a long fit never holds up the reading.
    Reading end-of-file means the gateway process has gone (killed, crashed):
    exit at once, whatever is in hand — nothing would read the answer.
    """
    # Ctrl-C reaches the whole process group: the gateway stops the child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    background_priority()
    configure_logging(*logging_)  # the gateway's level and format, on the same stderr
    worker = Worker(settings)
    outbox.send(("ready", worker.load()))
    aggregator = WindowAggregator(settings.max_subjects, start=time.time())
    jobs: queue.SimpleQueue[tuple[WindowState, bool, bool, list[TrafficEvent]] | None] = (
        queue.SimpleQueue()
    )
    thread = threading.Thread(
        target=_process_windows, args=(worker, jobs, outbox, settings.record_file), daemon=True
    )
    thread.start()
    record = settings.record_file is not None
    recorded: list[TrafficEvent] = []
    dropped = 0
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            os._exit(0)  # the gateway is gone
        what = message[0]
        if what == "events":
            add = aggregator.add
            for values in message[1]:
                event = TrafficEvent(*values)
                add(event)
                if record:
                    if len(recorded) < MAX_RECORDED_EVENTS:
                        recorded.append(event)
                    else:
                        dropped += 1
        elif what == "window":
            _, now, drop, keep_all = message
            if dropped:
                log.warning("anomaly recording: %d events not recorded (buffer full)", dropped)
                dropped = 0
            jobs.put((aggregator.swap(now), drop, keep_all, recorded))
            recorded = []
        elif what == "stop":
            jobs.put((WindowState(0.0), True, False, recorded))
            jobs.put(None)
            thread.join()
            return


def background_priority() -> None:
    """Run only when the gateway does not need the CPU (Linux ``SCHED_IDLE``,
    else nice 19). Measured: with the worker at normal priority its window
    work (a few hundred ms of CPU every window) still raised delivery p99 by
    10-20 ms on a 2-core machine, competing for the cores, not the GIL. The
    price: on a machine whose CPUs are saturated, windows are processed late
    (and a worker that answers nothing for ``REPLY_TIMEOUT_SECONDS`` is
    replaced)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def _process_windows(
    worker: Worker,
    jobs: queue.SimpleQueue[tuple[WindowState, bool, bool, list[TrafficEvent]] | None],
    outbox: Connection,
    record_file: Path | None,
) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        state, drop, keep_all, recorded = job
        if record_file is not None and recorded:
            write_events(record_file, recorded)
        if drop:
            continue
        try:
            outcome = worker.process(state, keep_all)
        except Exception as exc:
            log.exception("anomaly window ending at %s failed", state.end)
            outbox.send(("failed", f"{type(exc).__name__}: {exc}"))
        else:
            outbox.send(("window", outcome))
        del state

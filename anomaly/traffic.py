"""Recorded traffic: traffic events as JSON lines, and replaying them into windows.

A recording is what ``anomaly.record_file`` writes while the gateway runs (or
what the scenario generator writes): one ``TrafficEvent`` per line, its
fields by name. No token and no message body is ever in it, only sizes, but
it names users and addresses: keep it as private as the alert store.
``baseline_rows`` replays a recording through the same aggregator the live
detector uses, so a model trained from a file sees exactly the vectors the
gateway will compute.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, fields
from pathlib import Path

from anomaly.features import WindowAggregator, merge_states, subject_windows
from gateway.telemetry.events import TrafficEvent

_FIELDS = {f.name for f in fields(TrafficEvent)}


def model_key(kind: str, seconds: float) -> str:
    """The model key of a subject kind and a window length: ``"user@60s"``."""
    return f"{kind}@{seconds:g}s"


def event_line(event: TrafficEvent) -> str:
    return json.dumps(asdict(event), separators=(",", ":"))


def write_events(path: Path, events: Iterable[TrafficEvent]) -> int:
    """Append events to a recording (created private); returns how many."""
    lines = [event_line(event) + "\n" for event in events]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.writelines(lines)
    return len(lines)


def read_events(path: Path) -> Iterator[TrafficEvent]:
    """The events of a recording; raises ValueError naming the first bad line."""
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict) or set(raw) - _FIELDS:
                    raise ValueError("not a traffic event")
                yield TrafficEvent(**raw)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None


def baseline_rows(
    events: Iterable[TrafficEvent],
    window_seconds: float,
    long_window_windows: int = 0,
    max_subjects: int = 10_000,
) -> dict[str, list[list[float]]]:
    """Feature rows per model key from events in time order (windows of event time).

    Windows start at the first event's time; the last, partial window is dropped.
    """
    aggregator: WindowAggregator | None = None
    rows: dict[str, list[list[float]]] = {}
    boundary = 0.0
    long_state = None
    long_count = 0
    long_seconds = window_seconds * long_window_windows

    def close(now: float) -> None:
        nonlocal long_state, long_count
        assert aggregator is not None
        state = aggregator.swap(now)
        for window in subject_windows(state, window_seconds):
            rows.setdefault(model_key(window.subject_kind, window_seconds), []).append(
                window.vector()
            )
        if long_window_windows:
            long_state = (
                state if long_state is None else merge_states(long_state, state, max_subjects)
            )
            long_count += 1
            if long_count == long_window_windows:
                for window in subject_windows(long_state, long_seconds):
                    rows.setdefault(model_key(window.subject_kind, long_seconds), []).append(
                        window.vector()
                    )
                long_state, long_count = None, 0

    for event in events:
        if aggregator is None:
            aggregator = WindowAggregator(max_subjects, start=event.at)
            boundary = event.at + window_seconds
        while event.at >= boundary:
            close(boundary)
            boundary += window_seconds
        aggregator.add(event)
    return rows

"""Incidents: one alert per subject and episode, not one per anomalous window (pure).

The worker scores windows; this module decides what a reviewer sees. Each
anomalous window of a subject is a ``Finding``. ``IncidentBook.observe`` turns
a window's findings into ``Change``s:

* ``new``: the subject has no incident going on and the finding is *strong*
  (above the key's single-window threshold), or it is the ``persist_k``-th
  *weak* finding (above the persistence threshold) within the subject's last
  ``persist_n`` windows;
* ``update``: the subject's incident goes on: its windows, last seen, highest
  score and reasons are updated (same alert id, next version). A finding whose
  reasons are all already on the alert is a re-raise: counted in ``suppressed``;
* ``suppressed``: the subject's last alert was closed by a reviewer as benign
  or false positive less than ``suppress_seconds`` ago and the finding names
  no reason that alert did not: no new alert, the closed one counts it;
* ``ended`` (from ``expire``): no anomalous window for ``quiet_seconds``: the
  episode is over; the next finding of the subject starts a new alert. Review
  status is not touched: an attack that went quiet (banned, say) still waits
  for its reviewer.

No clock, no I/O: times are passed in; the detector keeps the alerts in the
store and tells the book about reviews (``reviewed``) and restarts
(``restore``). Memory is bounded by the subjects that were anomalous lately:
candidates older than ``persist_n`` windows and suppressions that ran out are
dropped by ``expire``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Subject = tuple[str, str]  # (kind, key): ("address", "127.0.3.3")
ChangeKind = Literal["new", "update", "suppressed", "ended"]
_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


@dataclass(frozen=True)
class Finding:
    """One anomalous window of one subject, as scored."""

    subject: Subject
    at: float  # the window's end
    score: float
    strong: bool  # above the single-window threshold: enough alone
    reasons: tuple[str, ...]  # the features the explanation names, most unusual first
    severity: str = "low"
    ref: object = None  # the caller's own (the decision), handed back in the change
    start: float | None = None  # the window's start (default: one window before ``at``)


@dataclass
class Incident:
    """The state of one alert as the book sees it (the store holds the body)."""

    alert_id: str
    subject: Subject
    first_seen: float
    last_seen: float
    windows: int
    score: float
    severity: str
    reasons: list[str] = field(default_factory=list)
    suppressed: int = 0


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    incident: Incident
    finding: Finding | None = None  # None for "ended"
    new_reasons: tuple[str, ...] = ()  # reasons this change added to the alert


@dataclass(frozen=True)
class IncidentPolicy:
    window_seconds: float
    quiet_seconds: float  # an episode ends after this long without anomalous windows
    suppress_seconds: float  # after a benign / false-positive close: no re-raise this long
    persist_k: int = 2  # weak findings needed ...
    persist_n: int = 3  # ... within this many of the subject's windows


@dataclass
class _Closed:
    alert_id: str
    until: float
    reasons: set[str]
    incident: Incident


class IncidentBook:
    """Open incidents, weak candidates, recent benign closes. One thread."""

    def __init__(self, policy: IncidentPolicy, new_id: object = None) -> None:
        self.policy = policy
        self.open: dict[Subject, Incident] = {}
        self._candidates: dict[Subject, deque[float]] = {}
        self._closed: dict[Subject, _Closed] = {}
        self._ids = 0
        self._new_id = new_id  # callable(now) -> str; None: "i-<n>" (tests)

    def _next_id(self, now: float) -> str:
        if callable(self._new_id):
            return str(self._new_id(now))
        self._ids += 1
        return f"i-{self._ids}"

    def observe(self, findings: Iterable[Finding]) -> list[Change]:
        """A window's findings (any order) -> what becomes of each alert."""
        changes: list[Change] = []
        for finding in findings:
            change = self._one(finding)
            if change is not None:
                changes.append(change)
        return changes

    def _one(self, f: Finding) -> Change | None:
        incident = self.open.get(f.subject)
        if incident is not None:
            added = tuple(r for r in f.reasons if r not in incident.reasons)
            incident.windows += 1
            incident.last_seen = max(incident.last_seen, f.at)
            incident.score = max(incident.score, f.score)
            if _RANK.get(f.severity, 0) > _RANK.get(incident.severity, 0):
                incident.severity = f.severity
            incident.reasons.extend(added)
            if not added:
                incident.suppressed += 1
            return Change("update", incident, f, added)
        closed = self._closed.get(f.subject)
        if closed is not None and f.at < closed.until:
            if set(f.reasons) <= closed.reasons:
                closed.incident.suppressed += 1
                closed.incident.last_seen = max(closed.incident.last_seen, f.at)
                return Change("suppressed", closed.incident, f)
        if not f.strong:
            p = self.policy
            seen = self._candidates.setdefault(f.subject, deque())
            horizon = f.at - p.persist_n * p.window_seconds + p.window_seconds / 2
            while seen and seen[0] <= horizon:
                seen.popleft()
            seen.append(f.at)
            if len(seen) < p.persist_k:
                return None
            windows = len(seen)
            first = seen[0]
            del self._candidates[f.subject]
        else:
            windows = 1
            first = f.at - self.policy.window_seconds if f.start is None else f.start
            self._candidates.pop(f.subject, None)
        incident = Incident(
            self._next_id(f.at),
            f.subject,
            first,
            f.at,
            windows,
            f.score,
            f.severity,
            list(f.reasons),
        )
        self.open[f.subject] = incident
        self._closed.pop(f.subject, None)
        return Change("new", incident, f, f.reasons)

    def expire(self, now: float) -> list[Change]:
        """End the episodes quiet for ``quiet_seconds``; forget stale candidates."""
        p = self.policy
        ended = [i for i in self.open.values() if now - i.last_seen >= p.quiet_seconds]
        for incident in ended:
            del self.open[incident.subject]
        horizon = now - p.persist_n * p.window_seconds
        self._candidates = {s: d for s, d in self._candidates.items() if d and d[-1] > horizon}
        self._closed = {s: c for s, c in self._closed.items() if c.until > now}
        return [Change("ended", incident) for incident in ended]

    def reviewed(self, subject: Subject, alert_id: str, resolution: str | None, now: float) -> None:
        """A reviewer closed ``alert_id``. Benign or false positive: the subject's
        re-raises for the same reasons are suppressed for ``suppress_seconds``;
        true positive: the episode ends (a new window is a new alert)."""
        incident = self.open.get(subject)
        if incident is None or incident.alert_id != alert_id:
            return  # not the subject's running episode: nothing changes here
        del self.open[subject]
        if resolution in ("benign", "false_positive"):
            self.remember_closed(subject, incident, now)

    def remember_closed(self, subject: Subject, incident: Incident, closed_at: float) -> None:
        """A benign close the book did not see happen (after a restart)."""
        until = closed_at + self.policy.suppress_seconds
        self._closed[subject] = _Closed(incident.alert_id, until, set(incident.reasons), incident)

    def restore(self, incidents: Sequence[Incident]) -> None:
        """Open incidents read back from the store at start."""
        for incident in incidents:
            self.open[incident.subject] = incident

"""Alerts: the body of protocol.md section 9, their review, their durable store.

An alert is a JSON object exactly as the contract shows it (plus ``version``,
``updated_at``, ``history``, ``subject.session`` and each reason's
``percentile``). Review is a small state machine (``review``): open ->
acknowledged -> closed, or open -> closed; closing needs a resolution
(``true_positive``, ``false_positive``, ``benign``), the reviewer and a note.

``AlertStore`` keeps alerts in SQLite (WAL, synchronous FULL: an alert that was
raised survives a crash or restart) and is also the *outbox* of the alerts
exchange: each change bumps the alert's ``version``, and a version stays
"unpublished" until RabbitMQ confirmed it, so whoever publishes next (the
gateway's detector, or the CLI) sends what is missing. Delivery is
at-least-once: consumers deduplicate on (``id``, ``version``). The store also
holds the bans and throttles responses put in force, so they survive a
restart too. Its methods block: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anomaly.features import OVERFLOW, SubjectWindow
from anomaly.model import Reason

STATUSES = ("open", "acknowledged", "closed")
RESOLUTIONS = ("true_positive", "false_positive", "benign")
# (status, action) -> new status: the whole review state machine.
TRANSITIONS = {
    ("open", "acknowledge"): "acknowledged",
    ("open", "close"): "closed",
    ("acknowledged", "close"): "closed",
    # A closed alert can be opened again (a dismissal was wrong); its resolution goes.
    ("closed", "reopen"): "open",
    ("acknowledged", "reopen"): "open",
}
# How the review page may sort: name -> ORDER BY (newest first unless said).
SORTS = {
    "newest": "created_ts DESC, id DESC",
    "oldest": "created_ts ASC, id ASC",
    "score": "CAST(json_extract(body, '$.score') AS REAL) DESC, created_ts DESC",
    "last_seen": "json_extract(body, '$.last_seen') DESC, created_ts DESC",
    "windows": "CAST(json_extract(body, '$.windows') AS INTEGER) DESC, created_ts DESC",
}
MAX_REVIEWER = 100
MAX_NOTE = 4000
STORE_FILE = "alerts.sqlite3"


class ReviewError(Exception):
    """A review step that is not allowed (one-line message for the reviewer)."""


class UnknownAlert(ReviewError):
    pass


def iso(ts: float) -> str:
    """``2026-11-27T22:10:00Z``; milliseconds only when the instant has them."""
    moment = datetime.fromtimestamp(ts, UTC)
    if moment.microsecond // 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def from_iso(text: str) -> float:
    """Epoch seconds of an ``iso`` string."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def new_alert_id(now: float) -> str:
    """Sortable by creation time, unguessable: ``a-<ms hex>-<random>``."""
    return f"a-{int(now * 1000):011x}-{secrets.token_hex(4)}"


def make_alert(
    window: SubjectWindow,
    score: float,
    severity: str,
    reasons: Sequence[Reason] | Sequence[dict[str, Any]],
    now: float | None = None,
    *,
    alert_id: str | None = None,
    windows: int = 1,
    first_seen: float | None = None,
) -> dict[str, Any]:
    """A new open alert about ``window`` (its actions are filled in by the response).

    The incident fields (``windows``, ``first_seen``, ``last_seen``,
    ``suppressed``, ``ended_at``) start here; ``incident_update`` moves them on."""
    now = time.time() if now is None else now
    subject: dict[str, Any] = {"kind": window.subject_kind}
    if window.user is not None or window.subject_kind == "user":
        subject["user"] = window.user
    if window.address is not None or window.subject_kind == "address":
        subject["address"] = window.address
    if window.overflow:  # the subjects beyond the cap, counted together
        subject[window.subject_kind] = OVERFLOW
    if window.session is not None:
        subject["session"] = window.session
    return {
        "id": alert_id or new_alert_id(now),
        "created_at": iso(now),
        "severity": severity,
        "score": round(float(score), 4),
        "subject": subject,
        "window": {"start": iso(window.start), "end": iso(window.end)},
        "features": {name: _number(value) for name, value in window.features.items()},
        "reasons": [r.to_json() if isinstance(r, Reason) else dict(r) for r in reasons],
        "status": "open",
        "resolution": None,
        "reviewer": None,
        "note": None,
        "actions": [],
        "version": 1,
        "updated_at": iso(now),
        "history": [],
        "windows": windows,
        "first_seen": iso(window.start if first_seen is None else first_seen),
        "last_seen": iso(window.end),
        "suppressed": 0,
        "ended_at": None,
        "evidence": evidence_of(window),
    }


MAX_ALERT_EVIDENCE = 50


def evidence_of(window: SubjectWindow) -> list[dict[str, str]]:
    """The window's security decisions as the alert shows them: what was refused,
    on which channel, why, for whom (reasons only: events carry no token)."""
    other = "user" if window.subject_kind == "address" else "address"
    found = []
    for kind, channel, detail, who in window.evidence:
        item = {"event": str(kind)}
        if channel is not None:
            item["channel"] = str(channel)
        if detail is not None:
            item["detail"] = str(detail)
        if who is not None:
            item[other] = str(who)
        found.append(item)
    return found


def incident_update(
    alert: dict[str, Any],
    *,
    windows: int,
    last_seen: float,
    suppressed: int,
    window: SubjectWindow | None = None,
    score: float | None = None,
    severity: str | None = None,
    new_reasons: Sequence[Reason] = (),
    ended_at: float | None = None,
) -> dict[str, Any]:
    """The alert with its incident moved on (pure; the store bumps ``version``).

    ``window``/``features`` become the latest anomalous window's; ``score`` and
    ``severity`` the highest so far; reasons not yet on the alert are added."""
    changed = json.loads(json.dumps(alert))
    changed["windows"] = windows
    changed["last_seen"] = iso(last_seen)
    changed["suppressed"] = suppressed
    if window is not None:
        changed["window"] = {"start": iso(window.start), "end": iso(window.end)}
        kept = [*evidence_of(window), *changed.get("evidence", [])]  # newest first
        changed["evidence"] = kept[:MAX_ALERT_EVIDENCE]
        changed["features"] = {name: _number(value) for name, value in window.features.items()}
    if score is not None:
        changed["score"] = max(float(changed["score"]), round(float(score), 4))
    if severity is not None and _RANK.get(severity, 0) > _RANK.get(changed["severity"], 0):
        changed["severity"] = severity
    known = {r["feature"] for r in changed["reasons"]}
    changed["reasons"] += [r.to_json() for r in new_reasons if r.feature not in known]
    if ended_at is not None:
        changed["ended_at"] = iso(ended_at)
    return changed


_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


def _number(value: float) -> float | int:
    value = float(value)
    if value.is_integer():
        return int(value)
    return float(f"{value:.6g}")


def review(
    alert: dict[str, Any],
    action: str,
    reviewer: str,
    *,
    resolution: str | None = None,
    note: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The alert after ``action`` ("acknowledge" or "close") by ``reviewer``; pure.

    Raises ReviewError when the step is not allowed or a field is missing or bad.
    """
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a reviewer is required")
    if len(reviewer) > MAX_REVIEWER or not reviewer.isprintable():
        raise ReviewError(f"reviewer must be printable and at most {MAX_REVIEWER} characters")
    note = (note or "").strip() or None
    if note is not None and len(note) > MAX_NOTE:
        raise ReviewError(f"note is longer than {MAX_NOTE} characters")
    status = alert["status"]
    target = TRANSITIONS.get((status, action))
    if target is None:
        if action not in {a for _, a in TRANSITIONS}:
            raise ReviewError(f"unknown review action {action!r}")
        raise ReviewError(f"alert {alert['id']} is {status}: cannot {action} it")
    changed = json.loads(json.dumps(alert))
    now = time.time() if now is None else now
    if action == "reopen":
        if note is None:
            raise ReviewError("reopening an alert needs a note saying why")
        changed["resolution"] = None
        changed["reviewer"] = reviewer
        changed["note"] = note
    elif action == "close":
        if resolution not in RESOLUTIONS:
            raise ReviewError(f"resolution must be one of {', '.join(RESOLUTIONS)}")
        if note is None:
            raise ReviewError("closing an alert needs a note saying why")
        changed["resolution"] = resolution
        changed["reviewer"] = reviewer
        changed["note"] = note
    else:
        changed["reviewer"] = reviewer
    changed["status"] = target
    step = {"at": iso(now), "by": reviewer, "status": target}
    if note is not None:
        step["note"] = note
    if resolution is not None and action == "close":
        step["resolution"] = resolution
    changed["history"] = [*alert.get("history", []), step]
    return changed


@dataclass(frozen=True)
class Restriction:
    """A ban or throttle in force on one subject until ``until`` (epoch seconds)."""

    alert_id: str
    kind: str  # "user" or "address"
    key: str
    mode: str  # "ban" or "throttle"
    until: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    created_ts REAL NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_user TEXT,
    subject_address TEXT,
    body TEXT NOT NULL,
    version INTEGER NOT NULL,
    published_version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_by_status ON alerts (status, created_ts);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (published_version, version);
CREATE TABLE IF NOT EXISTS restrictions (
    alert_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    mode TEXT NOT NULL,
    until REAL NOT NULL,
    lifted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS restrictions_until ON restrictions (until);
"""


class AlertStore:
    """Alerts and restrictions in one SQLite file; thread-safe, blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # Created private: alerts name users and addresses.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=10, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()

    # --- alerts -------------------------------------------------------------

    def add(self, alert: dict[str, Any]) -> None:
        self.add_many([alert])

    def add_many(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Store new alerts in one transaction (one disk sync for a window's alerts)."""
        now = time.time()
        rows = [
            (
                alert["id"],
                now,
                alert["severity"],
                alert["status"],
                alert["subject"]["kind"],
                alert["subject"].get("user"),
                alert["subject"].get("address"),
                json.dumps(alert),
                alert["version"],
            )
            for alert in alerts
        ]
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO alerts (id, created_ts, severity, status, subject_kind,"
                " subject_user, subject_address, body, version) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )

    def get(self, alert_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            raise UnknownAlert(f"no alert {alert_id}")
        return dict(json.loads(row["body"]))

    def find(
        self,
        *,
        status: str | Sequence[str] | None = None,
        severity: str | None = None,
        subject: str | None = None,
        search: str | None = None,
        sort: str = "newest",
        limit: int = 200,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Newest first (or ``sort``, one of SORTS); ``status`` one or several;
        ``subject`` matches the user or the address exactly; ``search`` is a
        case-insensitive substring of the user, the address, a reason or any
        other text of the alert (a channel, an action, a note)."""
        where, params = self._where(status, severity, subject, search)
        order = SORTS.get(sort, SORTS["newest"])
        params += [max(1, min(limit, 10_000)), max(0, offset)]
        with self._lock:
            rows = self._db.execute(
                f"SELECT body FROM alerts {where} ORDER BY {order} LIMIT ? OFFSET ?", params
            ).fetchall()
        return [json.loads(row["body"]) for row in rows]

    def count(
        self,
        *,
        status: str | Sequence[str] | None = None,
        severity: str | None = None,
        subject: str | None = None,
        search: str | None = None,
    ) -> int:
        where, params = self._where(status, severity, subject, search)
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM alerts {where}", params).fetchone()
        return int(row[0])

    def created_since(self, since: float) -> list[tuple[float, str]]:
        """(created, severity) of the alerts created after ``since`` (the chart)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT created_ts, severity FROM alerts WHERE created_ts >= ?"
                " ORDER BY created_ts LIMIT 200000",
                (since,),
            ).fetchall()
        return [(float(row[0]), str(row[1])) for row in rows]

    @staticmethod
    def _where(
        status: str | Sequence[str] | None,
        severity: str | None,
        subject: str | None,
        search: str | None,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if status:
            statuses = [status] if isinstance(status, str) else list(status)
            clauses.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        if severity:
            clauses.append("severity = ?")
            params.append(severity)
        if subject:
            clauses.append("(subject_user = ? OR subject_address = ?)")
            params.extend([subject, subject])
        if search:
            # The body is JSON: non-ASCII is escaped there, so search the columns too.
            pattern = (
                "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            clauses.append(
                "(subject_user LIKE ? ESCAPE '\\' OR subject_address LIKE ? ESCAPE '\\'"
                " OR body LIKE ? ESCAPE '\\')"
            )
            params.extend([pattern, pattern, pattern])
        return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params

    def review(
        self,
        alert_id: str,
        action: str,
        reviewer: str,
        *,
        resolution: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Apply one review step atomically; returns the changed alert."""
        with self._transaction() as db:
            alert = self._read(db, alert_id)
            changed = review(alert, action, reviewer, resolution=resolution, note=note)
            self._write(db, changed)
            if changed["status"] == "closed" and resolution in ("false_positive", "benign"):
                # A wrong or harmless alert must not keep its subject out.
                lifted = db.execute(
                    "UPDATE restrictions SET lifted = 1 WHERE alert_id = ? AND lifted = 0"
                    " AND until > ?",
                    (alert_id, time.time()),
                ).rowcount
                if lifted:
                    changed["actions"].append(f"restrictions lifted by {changed['reviewer']}")
                    self._write(db, changed)
        return changed

    def update(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Write changed alerts (incident updates) in one transaction; each gets
        the next ``version`` and so goes out again through the outbox. The
        review fields are the stored ones: a review since the read wins."""
        with self._transaction() as db:
            for alert in alerts:
                stored = self._read(db, alert["id"])
                for name in ("status", "resolution", "reviewer", "note", "history", "actions"):
                    alert[name] = stored.get(name, alert.get(name))
                alert["version"] = stored.get("version", 1)
                self._write(db, alert)

    def reviews(self, alert_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """(status, resolution) of these alerts."""
        found: dict[str, tuple[str, str | None]] = {}
        ids = list(alert_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, status, json_extract(body, '$.resolution') FROM alerts"
                    f" WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            found.update({row[0]: (row[1], row[2]) for row in rows})
        return found

    def running_incidents(self, closed_since: float) -> list[dict[str, Any]]:
        """Alerts whose episode has not ended, and those closed as benign or false
        positive after ``closed_since`` (the incident book is rebuilt from them)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM alerts WHERE (json_extract(body, '$.ended_at') IS NULL"
                " AND json_extract(body, '$.windows') IS NOT NULL AND status != 'closed')"
                " OR (status = 'closed' AND json_extract(body, '$.resolution')"
                " IN ('benign', 'false_positive') AND created_ts >= ?)",
                (closed_since,),
            ).fetchall()
        return [json.loads(row["body"]) for row in rows]

    def add_actions(self, alert_id: str, actions: Sequence[str]) -> dict[str, Any]:
        with self._transaction() as db:
            alert = self._read(db, alert_id)
            alert["actions"] = [*alert["actions"], *actions]
            self._write(db, alert)
        return alert

    def unpublished(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM alerts WHERE published_version < version"
                " ORDER BY created_ts LIMIT ?",
                (limit,),
            ).fetchall()
        return [json.loads(row["body"]) for row in rows]

    def mark_published(self, alert_id: str, version: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE alerts SET published_version = MAX(published_version, ?) WHERE id = ?",
                (version, alert_id),
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM alerts GROUP BY status")
            return {status: count for status, count in rows.fetchall()}

    def _read(self, db: sqlite3.Connection, alert_id: str) -> dict[str, Any]:
        row = db.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        if row is None:
            raise UnknownAlert(f"no alert {alert_id}")
        return dict(json.loads(row["body"]))

    def _write(self, db: sqlite3.Connection, alert: dict[str, Any]) -> None:
        alert["version"] = int(alert.get("version", 1)) + 1
        alert["updated_at"] = iso(time.time())
        db.execute(
            "UPDATE alerts SET status = ?, body = ?, version = ? WHERE id = ?",
            (alert["status"], json.dumps(alert), alert["version"], alert["id"]),
        )

    # --- restrictions -------------------------------------------------------

    def restrict(self, restriction: Restriction) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO restrictions (alert_id, kind, key, mode, until) VALUES (?,?,?,?,?)",
                (
                    restriction.alert_id,
                    restriction.kind,
                    restriction.key,
                    restriction.mode,
                    restriction.until,
                ),
            )

    def lift(self, kind: str, key: str, now: float | None = None) -> int:
        """Lift every ban and throttle in force on the subject; returns how many."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return int(
                db.execute(
                    "UPDATE restrictions SET lifted = 1 WHERE kind = ? AND key = ? AND lifted = 0"
                    " AND until > ?",
                    (kind, key, now),
                ).rowcount
            )

    def note_step(self, alert_id: str, by: str, action: str, note: str) -> dict[str, Any]:
        """Record a reviewer's action (a manual ban, an unban) on the alert."""
        with self._transaction() as db:
            alert = self._read(db, alert_id)
            alert["actions"] = [*alert["actions"], action]
            step = {"at": iso(time.time()), "by": by, "status": alert["status"], "note": note}
            alert["history"] = [*alert.get("history", []), {**step, "action": action}]
            self._write(db, alert)
        return alert

    def restrictions(self, now: float | None = None) -> list[Restriction]:
        """Bans and throttles in force at ``now`` (not expired, not lifted)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT alert_id, kind, key, mode, until FROM restrictions"
                " WHERE lifted = 0 AND until > ?",
                (now,),
            ).fetchall()
        return [Restriction(*row) for row in rows]

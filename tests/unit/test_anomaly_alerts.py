"""Alerts: the contract's body, the review state machine, the durable store
and its outbox, restrictions (anomaly/alerts.py, gateway/limits/restrictions.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from anomaly.alerts import (
    RESOLUTIONS,
    AlertStore,
    Restriction,
    ReviewError,
    UnknownAlert,
    iso,
    make_alert,
    review,
)
from anomaly.features import FEATURES, SubjectWindow
from anomaly.model import Reason
from gateway.limits.restrictions import Restrictions, Rule

SPEC_KEYS = {
    "id",
    "created_at",
    "severity",
    "score",
    "subject",
    "window",
    "features",
    "reasons",
    "status",
    "resolution",
    "reviewer",
    "note",
    "actions",
}


def window(kind: str = "user", user: str | None = "alice", address: str | None = "203.0.113.9"):
    features = dict.fromkeys(FEATURES, 0.0)
    features["publish_rate"] = 41.0
    return SubjectWindow(kind, user, address, "sess1", 1795000000.0, 1795000060.0, features)  # type: ignore[arg-type]


def alert(**kw):
    reason = Reason(
        "publish_rate", 41.0, 3.2, "publish rate 41/s, above 99% of normal windows (3.2/s)", 100.0
    )
    return make_alert(window(**kw), 0.7123456, "high", [reason], now=1795000061.0)


def test_a_new_alert_has_every_field_of_the_contract() -> None:
    body = alert()
    assert set(body) >= SPEC_KEYS
    assert body["id"].startswith("a-")
    assert body["created_at"] == "2026-11-18T11:07:41Z"
    assert body["score"] == 0.7123
    assert body["subject"] == {
        "kind": "user",
        "user": "alice",
        "address": "203.0.113.9",
        "session": "sess1",
    }
    assert body["window"] == {"start": iso(1795000000.0), "end": iso(1795000060.0)}
    assert body["features"]["publish_rate"] == 41 and body["features"]["auth_failures"] == 0
    assert body["reasons"][0] == {
        "feature": "publish_rate",
        "value": 41.0,
        "baseline_p99": 3.2,
        "percentile": 100.0,
        "text": "publish rate 41/s, above 99% of normal windows (3.2/s)",
    }
    assert (body["status"], body["resolution"], body["reviewer"], body["note"]) == (
        "open",
        None,
        None,
        None,
    )


def test_address_subject_without_a_known_user() -> None:
    body = make_alert(window("address", None, "198.51.100.7"), 0.9, "critical", [])
    assert body["subject"]["kind"] == "address" and body["subject"]["address"] == "198.51.100.7"
    assert "user" not in body["subject"]


def test_ids_are_unique_and_sort_by_time() -> None:
    ids = [make_alert(window(), 0.8, "high", [], now=1795000000.0 + n)["id"] for n in range(50)]
    assert len(set(ids)) == 50 and ids == sorted(ids)


# --- the review state machine (a table, as h11 writes its own) ---------------

CASES = [
    # status, action, resolution, note, new status or error text
    ("open", "acknowledge", None, None, "acknowledged"),
    ("open", "close", "true_positive", "credential stuffing, blocked upstream", "closed"),
    ("acknowledged", "close", "false_positive", "load test", "closed"),
    ("acknowledged", "close", "benign", "new mobile release retries", "closed"),
    ("acknowledged", "acknowledge", None, None, "cannot acknowledge"),
    ("closed", "close", "benign", "again", "cannot close"),
    ("closed", "acknowledge", None, None, "cannot acknowledge"),
    ("open", "close", None, "no resolution", "resolution must be one of"),
    ("open", "close", "fixed", "bad resolution", "resolution must be one of"),
    ("open", "close", "benign", None, "needs a note"),
    ("open", "close", "benign", "   ", "needs a note"),
    ("open", "reopen", None, None, "is open: cannot reopen"),
    ("closed", "reopen", None, None, "needs a note"),
    ("open", "escalate", None, None, "unknown review action"),
]


@pytest.mark.parametrize(("status", "action", "resolution", "note", "outcome"), CASES)
def test_review_transitions(status, action, resolution, note, outcome) -> None:
    body = alert()
    body["status"] = status
    if outcome in ("acknowledged", "closed"):
        changed = review(body, action, "sam", resolution=resolution, note=note, now=1795000100.0)
        assert changed["status"] == outcome
        assert changed["reviewer"] == "sam"
        assert changed["history"][-1]["status"] == outcome
        assert body["status"] == status  # pure: the input is untouched
        if outcome == "closed":
            assert changed["resolution"] == resolution and changed["note"] == note.strip()
    else:
        with pytest.raises(ReviewError, match=outcome):
            review(body, action, "sam", resolution=resolution, note=note)


@pytest.mark.parametrize("reviewer", ["", "  ", "x" * 101, "sam\x1b[2J"])
def test_reviewer_is_required_and_printable(reviewer: str) -> None:
    with pytest.raises(ReviewError):
        review(alert(), "acknowledge", reviewer)


def test_resolutions_are_the_contracts() -> None:
    assert RESOLUTIONS == ("true_positive", "false_positive", "benign")


# --- the store ---------------------------------------------------------------


def test_alerts_survive_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    store = AlertStore(path)
    body = alert()
    store.add(body)
    store.review(body["id"], "acknowledge", "sam")
    store.close()
    again = AlertStore(path)
    kept = again.get(body["id"])
    assert kept["status"] == "acknowledged" and kept["reviewer"] == "sam"
    assert kept["version"] == 2
    assert path.stat().st_mode & 0o077 == 0
    again.close()


def test_find_filters_and_orders_newest_first(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    first = alert()
    store.add(first)
    time.sleep(0.01)
    second = make_alert(window("address", None, "198.51.100.7"), 0.95, "critical", [])
    store.add(second)
    assert [a["id"] for a in store.find()] == [second["id"], first["id"]]
    assert [a["id"] for a in store.find(severity="critical")] == [second["id"]]
    assert [a["id"] for a in store.find(subject="alice")] == [first["id"]]
    assert [a["id"] for a in store.find(subject="198.51.100.7")] == [second["id"]]
    store.review(first["id"], "close", "sam", resolution="benign", note="ok")
    assert [a["id"] for a in store.find(status="open")] == [second["id"]]
    assert store.counts() == {"open": 1, "closed": 1}


def test_unknown_alert(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    with pytest.raises(UnknownAlert):
        store.get("a-nope")
    with pytest.raises(UnknownAlert):
        store.review("a-nope", "acknowledge", "sam")


def test_every_change_is_pending_for_the_exchange_until_marked(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    body = alert()
    store.add(body)
    assert [(a["id"], a["version"]) for a in store.unpublished()] == [(body["id"], 1)]
    store.mark_published(body["id"], 1)
    assert store.unpublished() == []
    store.add_actions(body["id"], ["banned user alice for 3600 s"])
    store.review(body["id"], "acknowledge", "sam")
    pending = store.unpublished()
    assert [(a["id"], a["version"], a["status"]) for a in pending] == [
        (body["id"], 3, "acknowledged")
    ]
    store.mark_published(body["id"], 2)  # an older version confirmed late: still pending
    assert len(store.unpublished()) == 1


def test_a_failed_review_changes_nothing(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    body = alert()
    store.add(body)
    with pytest.raises(ReviewError):
        store.review(body["id"], "close", "sam", resolution="benign")  # no note
    assert store.get(body["id"])["version"] == 1


def test_closing_as_false_positive_lifts_the_alerts_restrictions(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    body = alert()
    store.add(body)
    store.restrict(Restriction(body["id"], "user", "alice", "ban", time.time() + 3600))
    assert [r.key for r in store.restrictions()] == ["alice"]
    closed = store.review(body["id"], "close", "sam", resolution="false_positive", note="QA")
    assert store.restrictions() == []
    assert closed["actions"][-1] == "restrictions lifted by sam"


def test_closing_as_true_positive_keeps_them(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    body = alert()
    store.add(body)
    store.restrict(Restriction(body["id"], "address", "198.51.100.7", "ban", time.time() + 3600))
    store.review(body["id"], "close", "sam", resolution="true_positive", note="blocked")
    assert len(store.restrictions()) == 1


def test_expired_restrictions_are_not_in_force(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "a.sqlite3")
    store.restrict(Restriction("a-1", "user", "alice", "throttle", time.time() - 1))
    assert store.restrictions() == []


# --- restrictions in the gateway ---------------------------------------------


def test_ban_until_expiry() -> None:
    r = Restrictions()
    assert not r and not r.banned("user", "alice", now=0)
    r.add(Rule("user", "alice", "ban", until=100))
    assert r.banned("user", "alice", now=99)
    assert not r.banned("user", "alice", now=100)
    assert not r.banned("address", "alice", now=50)
    assert not r.banned("user", None, now=50)


def test_throttle_admits_its_rate_then_refuses() -> None:
    r = Restrictions(throttle_per_second=2)
    r.add(Rule("address", "10.0.0.9", "throttle", until=100))
    assert r.throttle("bob", "10.0.0.1", now=1.0) is None  # not throttled at all
    admitted = [r.throttle("alice", "10.0.0.9", now=1.0) is None for _ in range(5)]
    assert admitted == [True, True, False, False, False]
    refusal = r.throttle("alice", "10.0.0.9", now=1.0)
    assert refusal is not None and refusal.limit == "anomaly_throttle"
    assert r.throttle("alice", "10.0.0.9", now=1.6) is None  # refilled
    assert r.throttle("alice", "10.0.0.9", now=200) is None  # expired


def test_replace_puts_exactly_the_given_rules_in_force() -> None:
    r = Restrictions()
    r.add(Rule("user", "alice", "ban", until=100))
    r.replace([Rule("address", "10.0.0.9", "ban", until=100)])
    assert not r.banned("user", "alice", now=1)
    assert r.banned("address", "10.0.0.9", now=1)
    r.replace([])
    assert not r


def test_a_closed_alert_is_reopened_without_its_resolution() -> None:
    closed = review(alert(), "close", "sam", resolution="benign", note="ours", now=1.0)
    again = review(closed, "reopen", "kim", note="it was not ours", now=2.0)
    assert (again["status"], again["resolution"], again["reviewer"]) == ("open", None, "kim")
    assert [h["status"] for h in again["history"]] == ["closed", "open"]


def test_the_store_searches_sorts_and_pages(tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "alerts.sqlite3")
    bodies = []
    for n in range(30):
        body = alert(user=f"user{n}", address=f"10.0.0.{n}")
        body["score"] = n / 100
        bodies.append(body)
    store.add_many(bodies)
    assert store.count() == 30
    assert {a["subject"]["user"] for a in store.find(search="user2")} == {
        "user2",
        *(f"user2{n}" for n in range(10)),
    }
    assert store.count(search="10.0.0.7") == 1
    assert store.count(search="publish rate 41") == 30  # a reason's text
    # LIKE's wildcards are plain characters here: "99%" is in every reason, "9%z" in none.
    assert store.count(search="99%") == 30 and store.count(search="9%z") == 0
    assert store.count(search="user_") == 0
    top = store.find(sort="score", limit=5)
    assert [a["score"] for a in top] == [0.29, 0.28, 0.27, 0.26, 0.25]
    page2 = store.find(sort="score", limit=5, offset=5)
    assert [a["score"] for a in page2] == [0.24, 0.23, 0.22, 0.21, 0.2]

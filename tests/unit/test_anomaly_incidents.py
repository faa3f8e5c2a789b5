"""Incidents (anomaly/incidents.py): one alert per subject and episode, updates,
persistence, suppression after a benign close, quiet end, restore. Pure."""

from __future__ import annotations

import pytest

from anomaly.incidents import Finding, Incident, IncidentBook, IncidentPolicy

W = 60.0
POLICY = IncidentPolicy(W, quiet_seconds=5 * W, suppress_seconds=3600.0, persist_k=2, persist_n=3)
ALICE = ("user", "alice")
ADDR = ("address", "127.0.3.3")


def f(
    subject: tuple[str, str],
    window: int,
    strong: bool = True,
    reasons: tuple[str, ...] = ("denials",),
) -> Finding:
    return Finding(subject, window * W, 0.9 if strong else 0.7, strong, reasons, "high")


def kinds(changes: list) -> list[str]:
    return [c.kind for c in changes]


# Each case: the windows (index, strong?, reasons) of one subject -> the change kinds.
CASES = [
    ("one strong window is an alert", [(1, True, ("denials",))], ["new"]),
    ("one weak window is not", [(1, False, ("denials",))], []),
    (
        "two weak windows in three are",
        [(1, False, ("denials",)), (3, False, ("denials",))],
        ["new"],
    ),
    (
        "two weak windows further apart are not",
        [(1, False, ("denials",)), (4, False, ("denials",))],
        [],
    ),
    (
        "further windows update the same alert",
        [(1, True, ("denials",)), (2, True, ("denials",)), (3, False, ("denials",))],
        ["new", "update", "update"],
    ),
]


@pytest.mark.parametrize(("name", "windows", "expected"), CASES, ids=[c[0] for c in CASES])
def test_windows_of_one_subject(name: str, windows: list, expected: list[str]) -> None:
    book = IncidentBook(POLICY)
    changes = []
    for index, strong, reasons in windows:
        changes += book.observe([f(ALICE, index, strong, reasons)])
    assert kinds(changes) == expected


def test_an_update_counts_windows_and_re_raises_and_adds_new_reasons() -> None:
    book = IncidentBook(POLICY)
    (new,) = book.observe([f(ALICE, 1)])
    (same,) = book.observe([f(ALICE, 2)])
    (more,) = book.observe([f(ALICE, 3, reasons=("denials", "reconnects"))])
    incident = more.incident
    assert same.incident is new.incident is incident
    assert incident.alert_id == new.incident.alert_id
    assert incident.windows == 3 and incident.last_seen == 3 * W
    assert incident.suppressed == 1  # window 2 named nothing new
    assert more.new_reasons == ("reconnects",)
    assert incident.reasons == ["denials", "reconnects"]


def test_subjects_are_apart() -> None:
    book = IncidentBook(POLICY)
    changes = book.observe([f(ALICE, 1), f(ADDR, 1)])
    assert kinds(changes) == ["new", "new"]
    assert changes[0].incident.alert_id != changes[1].incident.alert_id


def test_a_quiet_episode_ends_and_the_next_window_is_a_new_alert() -> None:
    book = IncidentBook(POLICY)
    (first,) = book.observe([f(ALICE, 1)])
    assert book.expire(5 * W) == []  # 4 windows quiet
    (ended,) = book.expire(6 * W)
    assert ended.kind == "ended" and ended.incident is first.incident
    (again,) = book.observe([f(ALICE, 7)])
    assert again.kind == "new" and again.incident.alert_id != first.incident.alert_id


@pytest.mark.parametrize("resolution", ["benign", "false_positive"])
def test_after_a_benign_close_the_same_reason_is_suppressed_and_counted(resolution: str) -> None:
    book = IncidentBook(POLICY)
    (first,) = book.observe([f(ALICE, 1)])
    book.reviewed(ALICE, first.incident.alert_id, resolution, 2 * W)
    (suppressed,) = book.observe([f(ALICE, 3)])
    assert (
        suppressed.kind == "suppressed" and suppressed.incident.alert_id == first.incident.alert_id
    )
    assert suppressed.incident.suppressed == 1
    # A reason the closed alert did not name is news.
    (other,) = book.observe([f(ALICE, 4, reasons=("auth_failures",))])
    assert other.kind == "new"


def test_a_suppression_runs_out() -> None:
    book = IncidentBook(POLICY)
    (first,) = book.observe([f(ALICE, 1)])
    book.reviewed(ALICE, first.incident.alert_id, "benign", 2 * W)
    later = 2 + int(POLICY.suppress_seconds / W) + 1
    book.expire(later * W)
    assert kinds(book.observe([f(ALICE, later)])) == ["new"]


def test_a_true_positive_close_ends_the_episode_without_suppression() -> None:
    book = IncidentBook(POLICY)
    (first,) = book.observe([f(ALICE, 1)])
    book.reviewed(ALICE, first.incident.alert_id, "true_positive", 2 * W)
    (again,) = book.observe([f(ALICE, 3)])
    assert again.kind == "new" and again.incident.alert_id != first.incident.alert_id


def test_a_review_of_another_alert_changes_nothing() -> None:
    book = IncidentBook(POLICY)
    book.observe([f(ALICE, 1)])
    book.reviewed(ALICE, "a-someone-else", "benign", 2 * W)
    assert kinds(book.observe([f(ALICE, 2)])) == ["update"]


def test_restored_incidents_go_on_after_a_restart() -> None:
    book = IncidentBook(POLICY)
    book.restore([Incident("a-1", ALICE, 0.0, W, 1, 0.9, "high", ["denials"])])
    (change,) = book.observe([f(ALICE, 2)])
    assert change.kind == "update" and change.incident.alert_id == "a-1"
    assert change.incident.windows == 2


def test_memory_is_bounded_by_recent_findings() -> None:
    book = IncidentBook(POLICY)
    for n in range(1000):
        book.observe([f(("address", f"10.0.0.{n}"), 1, strong=False)])
    assert len(book._candidates) == 1000
    book.expire(10 * W)
    assert book._candidates == {} and book.open == {}

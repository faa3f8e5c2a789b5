"""Traffic events -> per-subject window features (anomaly/features.py)."""

from __future__ import annotations

import math

import pytest

from anomaly.features import (
    FEATURES,
    MAX_CHANNELS,
    OVERFLOW,
    WindowAggregator,
    entropy_bits,
    merge_states,
    subject_windows,
    trimmed,
)
from gateway.telemetry.events import TrafficEvent


def ev(kind: str, at: float, *, user: str | None = "alice", address: str | None = "10.0.0.1", **kw):
    return TrafficEvent(kind, address, user, kw.pop("session", "s1"), at=at, **kw)  # type: ignore[arg-type]


def windows_by_subject(aggregator: WindowAggregator, now: float) -> dict[tuple[str, str], dict]:
    return {(w.subject_kind, w.key): w.features for w in aggregator.close_window(now)}


def test_every_named_feature_is_computed_for_both_subject_kinds() -> None:
    agg = WindowAggregator(start=0.0)
    agg.add(ev("publish", 1.0, channel="chat.a", size=10))
    found = windows_by_subject(agg, 10.0)
    assert set(found) == {("user", "alice"), ("address", "10.0.0.1")}
    for features in found.values():
        assert tuple(features) == FEATURES


def test_rates_sizes_and_channel_mix() -> None:
    agg = WindowAggregator(start=0.0)
    for i, size in enumerate([100, 300, 200, 400]):
        agg.add(ev("publish", 1.0 + i, channel=f"chat.r{i % 2}", size=size))
    agg.add(ev("subscribe", 0.5, channel="chat.r9"))
    f = windows_by_subject(agg, 10.0)[("user", "alice")]
    assert f["publish_rate"] == pytest.approx(0.4)
    assert f["bytes_rate"] == pytest.approx(100.0)
    assert f["mean_payload"] == 250.0
    assert f["max_payload"] == 400.0
    assert f["distinct_channels"] == 3.0
    assert f["subscribe_ratio"] == pytest.approx(1 / 5)
    assert f["payload_entropy"] == pytest.approx(2.0)  # four distinct sizes


@pytest.mark.parametrize(
    ("times", "mean", "cv"),
    [
        ([0, 1, 2, 3, 4, 5], 1.0, 0.0),  # a metronome
        ([0, 1, 3, 4, 6, 7], 1.4, math.sqrt(0.24) / 1.4),  # gaps 1,2,1,2,1
        ([0, 1, 2], 1.0, 1.0),  # too few intervals: neutral (Poisson) cv
        # A metronome with one stall (a late event, then a catch-up): trimmed away.
        ([0, 1, 2, 3, 4.8, 5, 6, 7, 8, 9], 1.0, 0.0),
        ([0, 1, 2, 3, 4.8, 5, 6], 1.0, math.sqrt(2 * 0.8**2 / 6) / 1.0),  # < 8 gaps: raw
        # Three stalls in 20 gaps: all three trimmed away.
        (
            [0, 1, 2.5, 3, 4, 5.7, 6, 7, 8, 9, 10.6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
            1.0,
            0.0,
        ),
        ([5], 10.0, 1.0),  # one publish: mean gap is the window length
    ],
)
def test_interarrival_mean_and_variation(times: list[float], mean: float, cv: float) -> None:
    agg = WindowAggregator(start=0.0)
    for t in times:
        agg.add(ev("publish", float(t), channel="chat.a", size=5))
    f = windows_by_subject(agg, 10.0)[("user", "alice")]
    assert f["interarrival_mean"] == pytest.approx(mean)
    assert f["interarrival_cv"] == pytest.approx(cv)


def test_security_counters_land_on_the_right_subjects() -> None:
    agg = WindowAggregator(start=0.0)
    # Before authentication only the address is known.
    agg.add(ev("connect", 1.0, user=None, session=None))
    agg.add(ev("auth_failed", 1.1, user=None, session=None, detail="bad_signature"))
    agg.add(ev("connect", 2.0, user=None, session=None))
    agg.add(ev("auth_ok", 2.1, detail="header"))
    agg.add(ev("auth_ok", 3.0, detail="refresh"))  # a refresh is not a reconnect
    agg.add(ev("denied", 3.1, channel="user.bob.inbox", detail="subscribe"))
    agg.add(ev("rate_limited", 3.2, detail="frames"))
    agg.add(ev("malformed", 3.3, detail="bad_request"))
    found = windows_by_subject(agg, 10.0)
    user, address = found[("user", "alice")], found[("address", "10.0.0.1")]
    assert address["auth_failures"] == 1 and user["auth_failures"] == 0
    assert address["reconnects"] == 2  # handshakes
    assert user["reconnects"] == 1  # authentications, refresh excluded
    for f in (user, address):
        assert f["denials"] == 1 and f["rate_limited"] == 1 and f["malformed"] == 1


def test_distinct_addresses_per_user_and_users_per_address() -> None:
    agg = WindowAggregator(start=0.0)
    for n in range(5):
        agg.add(ev("connect", 1.0 + n, user=None, address=f"10.0.0.{n}", session=None))
        agg.add(ev("auth_ok", 1.0 + n, address=f"10.0.0.{n}", detail="header"))
    agg.add(ev("connect", 7.0, user=None, address="10.0.0.1", session=None))
    agg.add(ev("auth_ok", 7.0, user="bob", address="10.0.0.1", detail="header"))
    found = windows_by_subject(agg, 10.0)
    assert found[("user", "alice")]["distinct_addresses"] == 5
    assert found[("address", "10.0.0.1")]["distinct_users"] == 2
    assert found[("address", "10.0.0.1")]["distinct_addresses"] == 1


def test_sets_are_capped() -> None:
    agg = WindowAggregator(start=0.0)
    for n in range(MAX_CHANNELS * 3):
        agg.add(ev("denied", 1.0, channel=f"user.u{n}.inbox", detail="subscribe"))
    f = windows_by_subject(agg, 10.0)[("user", "alice")]
    assert f["distinct_channels"] == MAX_CHANNELS
    assert f["denials"] == MAX_CHANNELS * 3


def test_subjects_beyond_the_cap_are_counted_as_one_overflow_subject() -> None:
    agg = WindowAggregator(max_subjects=3, start=0.0)
    for n in range(50):
        agg.add(ev("auth_failed", 1.0, user=None, address=f"198.51.100.{n}"))
    windows = agg.close_window(10.0)
    assert len(windows) == 4
    overflow = [w for w in windows if w.overflow]
    assert len(overflow) == 1 and overflow[0].address is None
    assert overflow[0].features["auth_failures"] == 47
    assert overflow[0].features["reconnects"] == 0


def test_swap_starts_a_fresh_window_and_keeps_the_old_state_apart() -> None:
    agg = WindowAggregator(start=0.0)
    agg.add(ev("publish", 1.0, channel="chat.a", size=5))
    done = agg.swap(10.0)
    agg.add(ev("publish", 11.0, channel="chat.a", size=5))
    assert (done.start, done.end) == (0.0, 10.0)
    assert done.users["alice"].publishes == 1
    assert windows_by_subject(agg, 20.0)[("user", "alice")]["publish_rate"] == pytest.approx(0.1)


def test_merged_windows_equal_one_long_window() -> None:
    events = [
        ev("publish", t, channel=f"chat.{int(t) % 3}", size=int(t * 7) % 50)
        for t in [0.5, 1.5, 2.0, 4.5, 5.5, 6.0, 8.5, 9.9]
    ]
    whole = WindowAggregator(start=0.0)
    for e in events:
        whole.add(e)
    expected = {(w.subject_kind, w.key): w.features for w in whole.close_window(10.0)}
    halves = WindowAggregator(start=0.0)
    for e in events[:4]:
        halves.add(e)
    first = halves.swap(5.0)
    for e in events[4:]:
        halves.add(e)
    merged = merge_states(first, halves.swap(10.0), 100)
    got = {(w.subject_kind, w.key): w.features for w in subject_windows(merged)}
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key] == pytest.approx(expected[key])


@pytest.mark.parametrize(
    ("intervals", "trim"), [(5, 0), (7, 0), (8, 1), (11, 1), (12, 2), (16, 3), (400, 3)]
)
def test_how_many_gaps_are_trimmed(intervals: int, trim: int) -> None:
    assert trimmed(intervals) == trim


@pytest.mark.parametrize(
    ("counts", "bits"),
    [([], 0.0), ([7], 0.0), ([1, 1], 1.0), ([2, 2, 2, 2], 2.0), ([3, 1], 0.8112781)],
)
def test_entropy_bits(counts: list[int], bits: float) -> None:
    assert entropy_bits(counts) == pytest.approx(bits)


def test_events_without_subject_are_ignored() -> None:
    agg = WindowAggregator(start=0.0)
    agg.add(TrafficEvent("connect", None, at=1.0))
    assert agg.close_window(10.0) == []


def test_overflow_key_is_reserved() -> None:
    assert OVERFLOW.startswith("*")  # never a valid sub-derived channel nor an address


def test_a_subject_that_only_refreshed_its_token_makes_no_window() -> None:
    agg = WindowAggregator(start=0.0)
    agg.add(ev("auth_ok", 1.0, detail="refresh"))
    agg.add(ev("closed", 2.0, detail="1000"))
    assert agg.close_window(10.0) == []

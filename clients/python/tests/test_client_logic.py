"""The Python client's pure decisions: backoff, token expiry, close codes, seq bookkeeping."""

from __future__ import annotations

import base64
import json
import random

import jwt
import pytest

from rabbitgate_client import RabbitgateClient
from rabbitgate_client.client import (
    SeqTracker,
    backoff_delay,
    check_url,
    handshake_refusal,
    not_an_endpoint,
    refresh_delay,
    should_reconnect,
    token_expiry,
)


def _upper(low: float, high: float) -> float:
    return high


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (7, 30.0), (10_000, 30.0)],
)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, 0.5, 30.0, uniform=_upper) == expected


def test_backoff_is_full_jitter_between_zero_and_the_ceiling() -> None:
    calls: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        calls.append((low, high))
        return low

    assert backoff_delay(3, 0.5, 30.0, uniform=record) == 0.0
    assert calls == [(0.0, 4.0)]
    delays = [backoff_delay(4, 0.5, 30.0) for _ in range(500)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0 and max(delays) > 7.0  # spread over the whole range


def _token(payload: object) -> str:
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2ln"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (_token({"sub": "a", "exp": 1_900_000_000}), 1_900_000_000.0),
        (_token({"exp": 1_900_000_000.5}), 1_900_000_000.5),
        (_token({"sub": "a"}), None),
        (_token({"exp": "1900000000"}), None),
        (_token({"exp": True}), None),
        (_token([1, 2]), None),
        ("not-a-jwt", None),
        ("a.%%%%.c", None),
        ("a.bm90IGpzb24.c", None),  # "not json"
        ("", None),
    ],
)
def test_token_expiry_reads_exp_without_verifying(token: str, expected: float | None) -> None:
    assert token_expiry(token) == expected


def test_token_expiry_of_a_real_signed_token() -> None:
    token = jwt.encode({"sub": "alice", "exp": 1_800_000_100}, "x" * 32, algorithm="HS256")
    assert token_expiry(token) == 1_800_000_100.0


@pytest.mark.parametrize(
    ("exp", "now", "margin", "expected"),
    [(None, 0, 30, None), (1000, 900, 30, 70.0), (1000, 990, 30, 0.0), (1000, 2000, 30, 0.0)],
)
def test_refresh_is_due_margin_seconds_before_exp(
    exp: float | None, now: float, margin: float, expected: float | None
) -> None:
    assert refresh_delay(exp, now, margin) == expected


@pytest.mark.parametrize(
    ("code", "callback", "expected"),
    [
        (None, False, True),  # never connected: the gateway may be down
        (1000, False, True),
        (1001, False, True),  # server shutting down
        (1006, False, True),  # connection lost
        (1009, True, True),
        (4408, False, True),
        (4409, True, True),  # slow consumer
        (4429, True, True),
        (4401, True, True),  # a fresh token from the callback may work
        (4401, False, False),  # the same fixed token will be refused again
        (4403, True, False),  # banned
        (1008, True, False),  # origin not allowed, too many connections
    ],
)
def test_which_close_codes_are_retried(code: int | None, callback: bool, expected: bool) -> None:
    assert should_reconnect(code, callback) is expected


def test_first_subscribe_starts_from_the_channels_present() -> None:
    tracker = SeqTracker()
    tracker.add("c")
    assert tracker.since("c") is None
    assert tracker.on_ack("c", 41, None) is False
    assert tracker.since("c") == 41
    assert not tracker.accept("c", 41)
    assert tracker.accept("c", 45)
    assert tracker.since("c") == 45


def test_duplicates_and_older_messages_are_dropped_and_strays_ignored() -> None:
    tracker = SeqTracker()
    tracker.add("c")
    tracker.on_ack("c", None, None)
    assert [tracker.accept("c", s) for s in (3, 3, 2, 7, 5, 8)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    assert not tracker.accept("other", 1)  # not subscribed
    tracker.remove("c")
    assert not tracker.accept("c", 100)


def test_a_message_before_the_first_ack_is_kept_and_the_ack_does_not_go_back() -> None:
    tracker = SeqTracker()
    tracker.add("c")
    assert tracker.accept("c", 10)
    assert tracker.on_ack("c", 9, None) is False
    assert tracker.since("c") == 10


def test_recovered_resubscribe_keeps_the_position_so_the_replay_is_delivered() -> None:
    tracker = SeqTracker()
    tracker.add("c")
    tracker.on_ack("c", 10, None)
    # reconnect: resubscribe with since=10; the ack already names the latest seq 20
    assert tracker.since("c") == 10
    assert tracker.on_ack("c", 20, True) is False
    assert [tracker.accept("c", s) for s in (11, 15, 20, 15)] == [True, True, True, False]


@pytest.mark.parametrize("recovered", [False, None, "yes"])
def test_unrecovered_resubscribe_asks_for_a_reload_and_restarts_from_the_present(
    recovered: object,
) -> None:
    tracker = SeqTracker()
    tracker.add("c")
    tracker.on_ack("c", 10, None)
    assert tracker.on_ack("c", 30, recovered) is True  # a silent server counts as "not recovered"
    assert not tracker.accept("c", 25)  # older than the reload point
    assert tracker.accept("c", 31)


def test_a_reset_history_lowers_the_position_so_new_messages_are_not_taken_for_duplicates() -> None:
    tracker = SeqTracker()
    tracker.add("c")
    tracker.on_ack("c", 500, None)
    assert tracker.on_ack("c", 3, False) is True
    assert tracker.accept("c", 4)
    tracker.add("d")
    tracker.on_ack("d", 500, None)
    assert tracker.on_ack("d", None, False) is True  # history gone entirely
    assert tracker.accept("d", 0)


def test_a_channel_with_no_seq_yet_is_lost_only_if_something_was_published_meanwhile() -> None:
    tracker = SeqTracker()
    tracker.add("quiet")
    tracker.on_ack("quiet", None, None)
    assert tracker.since("quiet") is None  # resubscribed without since
    assert tracker.on_ack("quiet", None, None) is False
    assert tracker.on_ack("quiet", 0, None) is True
    assert tracker.since("quiet") == 0


def test_an_ack_for_a_channel_no_longer_subscribed_changes_nothing() -> None:
    tracker = SeqTracker()
    assert tracker.on_ack("gone", 5, False) is False
    assert tracker.since("gone") is None


def test_full_jitter_uses_the_random_module_by_default() -> None:
    random.seed(7)
    first = backoff_delay(2, 1.0, 10.0)
    random.seed(7)
    assert backoff_delay(2, 1.0, 10.0) == first


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (403, None, (4403, 0.0)),  # a banned address: stop, as for close 4403
        (429, "7", (None, 7.0)),
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", (None, 0.0)),
        (429, "-5", (None, 0.0)),
        (429, "99999999", (None, 0.0)),
        (429, None, (None, 0.0)),
        (401, None, (None, 0.0)),
        (503, "7", (None, 0.0)),
    ],
)
def test_a_refused_handshake_maps_to_a_close_code_and_a_least_wait(
    status: int, retry_after: str | None, expected: tuple[int | None, float]
) -> None:
    assert handshake_refusal(status, retry_after) == expected


@pytest.mark.parametrize(
    "url",
    ["https://localhost:8443/ws", "http://localhost/ws", "localhost:8443/ws", "tcp://x/ws", ""],
)
def test_a_url_that_is_not_ws_or_wss_is_refused_before_any_io(url: str) -> None:
    with pytest.raises(ValueError, match="must start with wss://"):
        check_url(url)
    with pytest.raises(ValueError, match="must start with wss://"):
        RabbitgateClient(url, token="t")


@pytest.mark.parametrize("url", ["wss://localhost:8443/ws", "WS://127.0.0.1:1/ws"])
def test_ws_and_wss_urls_are_accepted(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(
    ("status", "fatal"),
    [(400, True), (404, True), (405, True), (426, True), (403, False), (429, False),
     (401, False), (500, False), (502, False), (503, False)],
)  # fmt: skip
def test_which_upgrade_refusals_say_this_is_not_a_rabbitgate_endpoint(
    status: int, fatal: bool
) -> None:
    reason = not_an_endpoint("wss://h/ws", status)
    assert (reason is not None) is fatal
    if reason is not None:
        assert f"HTTP {status}" in reason and "not a rabbitgate endpoint" in reason

"""The decisions of the fleet-wide Connections service and its control messages,
apart from Redis (gateway/operations/fleet_connections.py, control_messages.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.core.channel_rates import ChannelRates
from gateway.operations.connections import ConnectionFilter, channel_loads
from gateway.operations.control_messages import MAX_SKEW_SECONDS, Ignored, open_message, seal
from gateway.operations.fleet_connections import (
    Gathering,
    SeenRequests,
    alive_processes,
    checked_ban_entry,
    checked_request,
    merge_lists,
    not_answering,
    reached,
)

KEY = b"k" * 32


# --- control messages ---------------------------------------------------------


def test_a_sealed_message_opens_with_its_key_and_carries_its_time() -> None:
    opened = open_message(KEY, seal(KEY, {"op": "list", "id": "1"}, now=100.0), now=101.0)
    assert opened == {"op": "list", "id": "1", "ts": 100.0}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (seal(b"another key", {"op": "list"}), "bad_signature"),
        (seal(None, {"op": "list"}), "unsigned"),
        # Built at collection time: far enough out that it stays stale until run.
        (seal(KEY, {"op": "list"}, now=time.time() - 100 * MAX_SKEW_SECONDS), "stale"),
        (seal(KEY, {"op": "list"}, now=time.time() + 100 * MAX_SKEW_SECONDS), "stale"),
        (b"v1.", "malformed"),
        (b"v2.abc.{}", "malformed"),
        (b"", "malformed"),
        (12, "malformed"),
        (None, "malformed"),
        (b"v1." + b"0" * 64 + b".{}", "bad_signature"),
    ],
    # Fixed ids: the sealed messages carry the time they were made, and test ids
    # must be the same in every pytest-xdist worker's collection.
    ids=[
        "another-key",
        "unsigned",
        "old",
        "future",
        "no-signature",
        "v2",
        "empty",
        "int",
        "none",
        "zero-signature",
    ],
)
def test_what_cannot_be_trusted_is_ignored_with_its_reason(raw: object, reason: str) -> None:
    assert open_message(KEY, raw) == Ignored(reason)


def test_a_message_just_inside_the_skew_is_taken_and_just_outside_is_stale() -> None:
    raw = seal(KEY, {"op": "list"}, now=1000.0)
    assert isinstance(open_message(KEY, raw, now=1000.0 + MAX_SKEW_SECONDS - 0.1), dict)
    assert open_message(KEY, raw, now=1000.0 + MAX_SKEW_SECONDS + 0.1) == Ignored("stale")
    assert open_message(KEY, raw, now=1000.0 - MAX_SKEW_SECONDS - 0.1) == Ignored("stale")


def test_a_signed_body_that_is_not_an_object_with_a_time_is_malformed() -> None:
    import hashlib
    import hmac

    for body in (b"[1, 2]", b"not json", b'{"ts": "yesterday"}', b'{"ts": true}', b"{}"):
        signature = hmac.new(KEY, body, hashlib.sha256).hexdigest().encode()
        assert open_message(KEY, b"v1." + signature + b"." + body) == Ignored("malformed")


def test_a_tampered_body_fails_its_signature() -> None:
    raw = seal(KEY, {"op": "kick", "user": "ann"})
    assert open_message(KEY, raw.replace(b"ann", b"bob")) == Ignored("bad_signature")


def test_without_a_key_messages_are_taken_signed_or_not() -> None:
    assert isinstance(open_message(None, seal(None, {"op": "list"})), dict)
    assert isinstance(open_message(None, seal(KEY, {"op": "list"})), dict)
    assert open_message(None, b"garbage") == Ignored("malformed")


def test_a_stored_ban_is_opened_whatever_its_age() -> None:
    old = seal(KEY, {"kind": "user"}, now=time.time() - 86400)
    assert open_message(KEY, old) == Ignored("stale")
    assert isinstance(open_message(KEY, old, max_skew=None), dict)


# --- who should answer, and when a gathering is done ---------------------------


def test_alive_processes_are_the_others_whose_entry_has_not_expired() -> None:
    registry = [("me/1", 5000.0), ("a/2", 5000.0), ("b/3", 999.0), ("c/4", 1000.5)]
    assert alive_processes(registry, 1000.0, "me/1") == ["a/2", "c/4"]
    assert alive_processes([], 1000.0, "me/1") == []


async def test_a_gathering_is_done_once_every_expected_process_answered() -> None:
    gathering = Gathering(frozenset({"a/1", "b/2"}))
    gathering.add("a/1", {"closed": 1})
    assert not gathering.done.is_set() and not_answering(gathering) == ["b/2"]
    gathering.add("late/9", {"closed": 0})  # not expected (started meanwhile): kept
    gathering.add("b/2", {"closed": 2})
    assert gathering.done.is_set() and not_answering(gathering) == []
    assert reached("me/0", gathering) == [
        {"process": "me/0", "answered": True},
        {"process": "a/1", "answered": True},
        {"process": "b/2", "answered": True},
        {"process": "late/9", "answered": True},
    ]
    await asyncio.wait_for(gathering.done.wait(), 0.1)


def test_reached_names_who_did_not_answer() -> None:
    gathering = Gathering(frozenset({"a/1", "dead/2"}))
    gathering.add("a/1", {"closed": 0})
    assert reached("me/0", gathering)[-1] == {"process": "dead/2", "answered": False}


# --- merging lists -------------------------------------------------------------


def own_answer() -> dict[str, object]:
    return {
        "process": "me/0",
        "processes": [{"process": "me/0", "connections": 1}],
        "connections": [{"process": "me/0", "session": "s2", "since": 20.0}],
        "channels": [{"channel": "chat", "subscribers": 1, "messages_per_second": 0.5}],
        "bans": [{"kind": "user", "key": "eve", "until": 100.0}],
    }


def test_merge_lists_joins_rows_channels_bans_and_names_who_did_not_answer() -> None:
    other = {
        "processes": [{"process": "a/1", "connections": 2}],
        "connections": [
            {"process": "a/1", "session": "s1", "since": 10.0},
            {"process": "a/1", "session": "s3", "since": 30.0},
        ],
        "channels": [
            {"channel": "chat", "subscribers": 2, "messages_per_second": 0.25},
            {"channel": "news", "subscribers": 1, "messages_per_second": 0},
        ],
        "bans": [{"kind": "user", "key": "eve", "until": 200.0}],
    }
    merged = merge_lists(own_answer(), {"a/1": other}, ["dead/2"])
    assert merged["process"] == "me/0"
    assert merged["processes"] == [
        {"process": "me/0", "connections": 1},
        {"process": "a/1", "connections": 2},
        {"process": "dead/2", "answered": False},
    ]
    assert [r["session"] for r in merged["connections"]] == ["s1", "s2", "s3"]
    assert merged["channels"] == [
        {"channel": "chat", "subscribers": 3, "messages_per_second": 0.75},
        {"channel": "news", "subscribers": 1, "messages_per_second": 0.0},
    ]
    assert merged["bans"] == [{"kind": "user", "key": "eve", "until": 200.0}]


def test_merge_lists_survives_answers_of_the_wrong_shape() -> None:
    odd = {
        "processes": "many",
        "connections": [1, "x", {"since": "yesterday"}],
        "channels": [{"channel": 5}, {"channel": "c", "subscribers": True}],
        "bans": [{"kind": None}],
    }
    merged = merge_lists(own_answer(), {"odd/3": odd}, [])
    assert merged["processes"][-1] == {"process": "odd/3", "connections": 0}
    assert len(merged["connections"]) == 2
    assert {c["channel"] for c in merged["channels"]} == {"chat", "c"}
    assert len(merged["bans"]) == 1


# --- requests from other processes -----------------------------------------------


def test_valid_requests_are_taken_with_their_arguments() -> None:
    listing = checked_request({"op": "list", "id": "1", "from": "a/1", "user": "ann"})
    assert listing is not None and listing.args == {"where": ConnectionFilter(user="ann")}
    kick = checked_request(
        {"op": "kick", "id": "2", "from": "a/1", "session": "s1", "shown": "bye"}
    )
    assert kick is not None and kick.args == {"session": "s1", "user": None, "shown": "bye"}
    until = time.time() + 60
    ban = checked_request(
        {"op": "ban", "id": "3", "from": "a/1", "kind": "address", "key": "10.0.0.1",
         "until": until, "shown": "banned"}
    )  # fmt: skip
    assert ban is not None
    assert ban.args == {"kind": "address", "key": "10.0.0.1", "until": until, "shown": "banned"}


@pytest.mark.parametrize(
    "message",
    [
        {"op": "drop", "id": "1", "from": "a/1"},
        {"op": "list", "from": "a/1"},
        {"op": "list", "id": "1"},
        {"op": "list", "id": "x" * 65, "from": "a/1"},
        {"op": "list", "id": "1", "from": "a/1", "channel": ["chat"]},
        {"op": "kick", "id": "1", "from": "a/1", "shown": "x"},  # neither session nor user
        {"op": "kick", "id": "1", "from": "a/1", "session": "s", "user": "u", "shown": "x"},
        {"op": "kick", "id": "1", "from": "a/1", "user": 5, "shown": "x"},
        {"op": "ban", "id": "1", "from": "a/1", "kind": "planet", "key": "x", "until": 2e9},
        {"op": "ban", "id": "1", "from": "a/1", "kind": "user", "key": "", "until": 2e9},
        {"op": "ban", "id": "1", "from": "a/1", "kind": "user", "key": "x", "until": 1.0},
        {"op": "ban", "id": "1", "from": "a/1", "kind": "user", "key": "x", "until": 9e99},
        {"op": "ban", "id": "1", "from": "a/1", "kind": "user", "key": "x", "until": "never"},
        {"op": "unban", "id": "1", "from": "a/1", "kind": "user"},
    ],
)
def test_anything_else_is_not_a_request(message: dict[str, object]) -> None:
    assert checked_request(message) is None


def test_a_stored_ban_is_taken_only_while_it_lasts_and_well_formed() -> None:
    now = 1000.0
    entry = {"kind": "user", "key": "eve", "until": 1500.0, "shown": "banned"}
    assert checked_ban_entry(entry, now) == ("user", "eve", 1500.0, "banned")
    assert checked_ban_entry({**entry, "until": 999.0}, now) is None
    assert checked_ban_entry({**entry, "kind": "planet"}, now) is None
    assert checked_ban_entry({**entry, "shown": 5}, now) is None


# --- channel loads and rates -------------------------------------------------------


def test_channel_loads_count_the_listed_connections_and_honor_a_channel_filter() -> None:
    rows = [{"channels": ["a", "b"]}, {"channels": ["a"]}, {"channels": []}]
    rates = {"a": 2.0, "c": 9.0}
    assert channel_loads(rows, rates, ConnectionFilter()) == [
        {"channel": "a", "subscribers": 2, "messages_per_second": 2.0},
        {"channel": "b", "subscribers": 1, "messages_per_second": 0.0},
    ]
    assert channel_loads(rows, rates, ConnectionFilter(channel="b")) == [
        {"channel": "b", "subscribers": 1, "messages_per_second": 0.0}
    ]


def test_channel_rates_average_the_complete_seconds_of_the_window() -> None:
    now = [100.2]
    rates = ChannelRates(window_seconds=10, clock=lambda: now[0])
    for _ in range(20):
        rates.count("a")
    rates.count("b")
    assert rates.rates() == {}  # the current second is not complete yet
    now[0] = 101.5
    rates.count("a")
    assert rates.rates() == {"a": 2.0, "b": 0.1}
    now[0] = 111.0  # second 100 has left the window; 101 is complete now
    assert rates.rates() == {"a": 0.1}
    now[0] = 200.0
    assert rates.rates() == {}


# --- with Redis unreachable ----------------------------------------------------------


class _Here:
    """A LocalConnections stand-in: this process, one connection of ann."""

    def __init__(self) -> None:
        self.banned: list[tuple[str, str]] = []

    async def list(self, where: ConnectionFilter) -> dict[str, object]:
        return own_answer()

    def close_sessions(self, session: str | None, user: str | None, shown: str) -> int:
        return 1 if user == "ann" else 0

    def apply_ban(self, kind: str, key: str, until: float, shown: str) -> int:
        self.banned.append((kind, key))
        return 1


async def test_with_redis_unreachable_answers_say_so_and_a_ban_is_refused() -> None:
    import dataclasses

    from gateway.config import LimitSettings, Settings
    from gateway.operations.connections import ConnectionsRequestError
    from gateway.operations.fleet_connections import UNREACHABLE, FleetConnections
    from gateway.telemetry.metrics import Metrics

    settings = Settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    settings = dataclasses.replace(settings, limits=LimitSettings(redis_timeout_seconds=0.1))
    here = _Here()
    fleet = FleetConnections(here, settings, Metrics())  # type: ignore[arg-type]
    try:
        began = time.monotonic()
        answer = await fleet.list(ConnectionFilter())
        assert time.monotonic() - began < 2
        assert answer["processes"][-1] == {"process": UNREACHABLE, "answered": False}
        assert [r["session"] for r in answer["connections"]] == ["s2"]  # this process's
        kicked = await fleet.kick("olga", session=None, user="ann", reason="")
        assert kicked["closed"] == 1
        assert kicked["processes"][-1] == {"process": UNREACHABLE, "answered": False}
        with pytest.raises(ConnectionsRequestError, match="nothing was banned"):
            await fleet.ban("olga", "user", "eve", 60, "spam")
        assert here.banned == []  # not banned here alone either
        with pytest.raises(ConnectionsRequestError, match="name either a session or a user"):
            await fleet.kick("olga", session=None, user=None, reason="")
    finally:
        await fleet.redis.aclose()


def test_a_request_is_acted_on_once_while_it_could_be_replayed() -> None:
    seen = SeenRequests(keep_seconds=60)
    assert seen.first_time("a/1 x", now=1000.0)
    assert not seen.first_time("a/1 x", now=1059.0)  # a replay
    assert seen.first_time("a/1 y", now=1059.0)
    # After the time a message is taken at all, its id is forgotten (the
    # message itself is refused as stale by then).
    assert seen.first_time("a/1 x", now=1061.0)

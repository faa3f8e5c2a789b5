"""The replay's decision over the offsets it sees (gateway/history.py), and its
admission (gateway/replays.py): pure, clock injected."""

from __future__ import annotations

import asyncio

import pytest

from gateway.broker.history import HistoryScan
from gateway.config import LimitSettings
from gateway.limits.replays import ReplayGate, ReplayRefused


def scan(since: int = 10, tail: int = 100, history: int = 5, limit: int = 1000) -> HistoryScan:
    return HistoryScan("c", since, tail, history, limit)


def test_offsets_before_since_are_skipped_and_the_tail_ends_a_recovered_read() -> None:
    s = scan()
    assert not s.see(3, "c", False)  # chunk boundary before since
    assert not s.see(10, "c", False)  # since itself is not replayed
    assert s.see(11, "c", False)
    assert not s.see(12, "other", False)
    assert not s.see(13, "c", True)  # a marker
    assert not s.done
    assert not s.see(100, "c", False)
    assert s.done and s.result().recovered and s.result().kept == [11]


def test_a_gap_at_since_ends_the_read_at_once() -> None:
    s = scan()
    assert not s.see(12, "c", False)
    assert s.done and s.reason == "gap" and not s.result().recovered


def test_the_read_ends_at_the_first_message_past_the_history() -> None:
    s = scan(history=2)
    s.see(10, "c", False)
    assert s.see(11, "c", False) and s.see(12, "c", False)
    assert not s.see(13, "c", False)
    assert s.reason == "history" and s.result().kept == []


def test_the_scan_limit_ends_the_read() -> None:
    s = scan(limit=3)
    for offset in range(10, 13):
        s.see(offset, "x", False)
    assert not s.done
    s.see(13, "x", False)
    assert s.reason == "scan_limit" and not s.result().recovered


def test_a_timeout_is_not_recovered_and_nothing_is_seen_after_the_end() -> None:
    s = scan()
    s.see(10, "c", False)
    assert s.result(timed_out=True).reason == "timeout"
    s.see(100, "c", False)
    assert not s.see(11, "c", False)


@pytest.mark.parametrize("offset", [None, "5", 1.5, True])
def test_an_offset_that_is_not_an_integer_is_ignored(offset: object) -> None:
    s = scan()
    assert not s.see(offset, "c", False) and not s.done


async def test_a_user_gets_at_most_replays_per_user_reads_at_once() -> None:
    gate = ReplayGate(LimitSettings(replays_per_user=2))
    first, second = await gate.admit("u"), await gate.admit("u")
    with pytest.raises(ReplayRefused) as refused:
        await gate.admit("u")
    assert refused.value.refusal.limit == "replays" and refused.value.refusal.retry_after > 0
    await gate.admit("v")  # another user is not held up
    gate.release(first)
    gate.release(first)  # twice is harmless
    await gate.admit("u")
    assert gate.in_flight("u") == 2
    gate.release(second)


async def test_what_a_user_read_is_charged_to_its_budget() -> None:
    now = [0.0]
    limits = LimitSettings(replay_scan_per_second_per_user=100, replay_scan_burst=1000)
    gate = ReplayGate(limits, clock=lambda: now[0])
    ticket = await gate.admit("u")
    ticket.scanned = 3000  # into debt: 2000 messages, 20 s at 100/s
    gate.release(ticket)
    with pytest.raises(ReplayRefused) as refused:
        await gate.admit("u")
    assert refused.value.refusal.limit == "replay_budget"
    assert refused.value.refusal.retry_after == pytest.approx(20, abs=0.1)
    now[0] = 20.1
    gate.release(await gate.admit("u"))


async def test_reads_past_the_process_cap_wait_then_are_refused() -> None:
    gate = ReplayGate(LimitSettings(replays_in_flight=1, replay_timeout_seconds=0.05))
    held = await gate.admit("a")
    with pytest.raises(ReplayRefused) as refused:
        await gate.admit("b")
    assert refused.value.refusal.limit == "replays_in_flight"
    assert gate.in_flight("b") == 0
    waiting = asyncio.ensure_future(gate.admit("c"))
    await asyncio.sleep(0)
    gate.release(held)
    gate.release(await waiting)

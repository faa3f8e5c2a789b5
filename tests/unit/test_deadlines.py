"""Many one-shot timers on one loop timer (gateway/core/deadlines.py), on asyncio's loop."""

from __future__ import annotations

import asyncio
import functools

import pytest

from gateway.core.deadlines import MIN_COMPACT_ENTRIES, Deadlines


async def test_deadlines_run_in_time_order_each_once() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    now = loop.time()
    deadlines.call_at(now + 0.06, lambda: ran.append("late"))
    deadlines.call_at(now + 0.02, lambda: ran.append("early"))
    deadlines.call_at(now + 0.02, lambda: ran.append("early, set second"))
    deadlines.call_at(now - 1, lambda: ran.append("overdue"))
    await asyncio.sleep(0.03)
    assert ran == ["overdue", "early", "early, set second"]
    await asyncio.sleep(0.06)
    assert ran == ["overdue", "early", "early, set second", "late"]
    assert len(deadlines) == 0


async def test_a_cancelled_deadline_never_runs() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    first = deadlines.call_at(loop.time() + 0.01, lambda: ran.append("first"))
    deadlines.call_at(loop.time() + 0.02, lambda: ran.append("second"))
    first.cancel()
    first.cancel()  # twice is harmless
    assert first.cancelled and len(deadlines) == 1
    await asyncio.sleep(0.04)
    assert ran == ["second"]


async def test_a_callback_can_set_the_next_deadline() -> None:
    """What a session does when its idle timeout moved: wake up later."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[float] = []

    def again() -> None:
        ran.append(loop.time())
        if len(ran) < 3:
            deadlines.call_at(loop.time() + 0.01, again)

    deadlines.call_at(loop.time(), again)
    await asyncio.sleep(0.1)
    assert len(ran) == 3
    assert ran == sorted(ran)


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    deadlines = Deadlines()
    ran: list[str] = []
    deadlines.call_at(loop.time(), lambda: 1 / 0)
    deadlines.call_at(loop.time(), lambda: ran.append("after"))
    await asyncio.sleep(0.02)
    assert ran == ["after"]
    assert isinstance(errors[0]["exception"], ZeroDivisionError)


async def test_cancelled_entries_do_not_pile_up() -> None:
    """A client refreshing its token again and again moves its deadline each time."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    far = loop.time() + 3600
    current = deadlines.call_at(far, lambda: None)
    for n in range(10 * MIN_COMPACT_ENTRIES):
        current.cancel()
        current = deadlines.call_at(far + n, lambda: None)
    assert len(deadlines) == 1
    assert len(deadlines._heap) <= 2 * MIN_COMPACT_ENTRIES + 2
    deadlines.close()
    assert len(deadlines) == 0


@pytest.mark.parametrize("count", [1, 1000])
async def test_close_drops_everything(count: int) -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[int] = []
    for n in range(count):
        deadlines.call_at(loop.time() + 0.01, functools.partial(ran.append, n))
    deadlines.close()
    await asyncio.sleep(0.03)
    assert ran == []

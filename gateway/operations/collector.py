"""Garbage collection for a process that holds 10,000s of long-lived connections.

Python's cyclic collector walks every tracked object on a full collection,
and a full collection comes whenever the objects that survived earlier ones
have grown by a quarter. An idle TLS connection is ~140 tracked objects: at
10,000 connections a full collection held the event loop 840-920 ms
(``bench.pauses``), and connection churn brings one every few minutes.
Raising the thresholds only makes those pauses rarer, not shorter.

What is done instead: every ``gc_freeze_seconds`` (default 1 s) the objects
not frozen yet are collected (a full collection, but of one interval's worth
of young objects only: a few ms) and the survivors frozen (``gc.freeze``:
moved out of the collector's sight, O(1)). A connection is thus frozen within
a second of opening and never walked again. Frozen objects are still freed by
reference counting, but a *cycle* among them never is: that is why every
connection's cycles are broken when it ends (``transports.ws_adapter.release``), and
``tests/integration/test_gc_churn.py`` counts objects over a churn of
connections to show that nothing is left behind.

Other cyclic garbage made of objects frozen while alive (an exception
traceback kept across a freeze, say) is never collected; it is bounded by
what is alive at one instant of each interval and shows as growth of
``gc.get_freeze_count()`` (``bench.pauses`` prints it). ``0`` turns this off
and leaves Python's own schedule.
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger("rabbitgate.collector")


def collect_and_freeze() -> int:
    """Collect what is not frozen yet, then freeze the survivors; returns objects collected."""
    collected = gc.collect()
    gc.freeze()
    return collected


async def run(interval: float) -> None:
    """``collect_and_freeze`` every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        collect_and_freeze()

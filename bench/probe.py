"""Event-loop lag and garbage-collector pauses, measured inside a gateway process.

    python bench/probe.py OUT_FILE serve --config gateway.yaml

Runs ``gateway.cli`` (whichever ``gateway`` package is on the path, so a
copy from before a change is measured the same way) with two probes added
from the outside, no change to the gateway's code:

- every collection's duration and generation, through ``gc.callbacks``;
- the loop's lag: a timer due every ``INTERVAL`` seconds records how late it
  ran. A timer that is late by L means no callback could run for about L:
  that is the pause every connection saw.

SIGUSR1 starts a measurement window (clears what was recorded); SIGUSR2
writes the window's summary as JSON to OUT_FILE (via a temp file and a
rename, so a reader never sees half of it). Run as a script, not ``-m``, so
that this file is found whatever ``gateway`` copy is on PYTHONPATH; it
imports nothing from ``bench``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import time
from array import array
from typing import Any

INTERVAL = 0.005


class Probe:
    def __init__(self, out_file: str) -> None:
        self.out_file = out_file
        self.lags = array("d")
        self.gc_pauses: list[tuple[int, float, int]] = []  # (generation, seconds, collected)
        self._gc_started = 0.0
        self._window_started = time.monotonic()

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_pauses.append(
                (info["generation"], time.perf_counter() - self._gc_started, info["collected"])
            )
            self._gc_started = 0.0

    def reset(self) -> None:
        self.lags = array("d")
        self.gc_pauses = []
        self._window_started = time.monotonic()

    async def tick(self) -> None:
        due = time.perf_counter() + INTERVAL
        while True:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            now = time.perf_counter()
            self.lags.append(max(0.0, now - due))
            # The next tick is due an interval after this one ran, not on a
            # fixed grid: a long pause counts once, not once per missed tick.
            due = now + INTERVAL

    def summary(self) -> dict[str, Any]:
        lags = sorted(self.lags)

        def pct(q: float) -> float:
            if not lags:
                return float("nan")
            return lags[min(len(lags) - 1, int(q * len(lags)))] * 1e3

        by_generation: dict[str, dict[str, float]] = {}
        for generation, seconds, _ in self.gc_pauses:
            entry = by_generation.setdefault(str(generation), {"count": 0, "max_ms": 0.0})
            entry["count"] += 1
            entry["max_ms"] = max(entry["max_ms"], seconds * 1e3)
        return {
            "window_seconds": time.monotonic() - self._window_started,
            "lag_samples": len(lags),
            "lag_ms": {"p99": pct(0.99), "p999": pct(0.999), "max": lags[-1] * 1e3 if lags else 0},
            "gc_pause_max_ms": max((s for _, s, _ in self.gc_pauses), default=0.0) * 1e3,
            "gc_pause_total_ms": sum(s for _, s, _ in self.gc_pauses) * 1e3,
            "gc_by_generation": by_generation,
            "gc_pauses_top_ms": sorted((s * 1e3 for _, s, _ in self.gc_pauses), reverse=True)[:5],
            "lag_top_ms": [x * 1e3 for x in lags[-5:][::-1]],
            "gc_tracked_objects": len(gc.get_objects()),
            "gc_frozen_objects": gc.get_freeze_count(),
            "gc_threshold": list(gc.get_threshold()),
            "python": sys.version.split()[0],
        }

    def dump(self) -> None:
        tmp = f"{self.out_file}.tmp"
        with open(tmp, "w") as out:
            json.dump(self.summary(), out)
        os.replace(tmp, self.out_file)


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: probe.py OUT_FILE gateway-cli-args...", file=sys.stderr)
        return 2
    out_file, cli_args = sys.argv[1], sys.argv[2:]
    sys.path[0] = os.getcwd()  # the gateway copy the bench runs, not this folder
    probe = Probe(out_file)
    gc.callbacks.append(probe.on_gc)

    import uvloop

    from gateway import cli

    real_run = uvloop.run

    def run_with_probe(main_coro: Any, **kwargs: Any) -> Any:
        async def wrapped() -> Any:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, probe.reset)
            loop.add_signal_handler(signal.SIGUSR2, probe.dump)
            ticker = loop.create_task(probe.tick())
            try:
                return await main_coro
            finally:
                ticker.cancel()

        return real_run(wrapped(), **kwargs)

    uvloop.run = run_with_probe  # type: ignore[assignment]
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())

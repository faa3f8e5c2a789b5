"""Smoke run of bench/flood.py: tiny parameters, real gateway process, real
RabbitMQ. It checks that the tool runs to the end and what must hold on any
machine (nothing lost, the flooder closed with 4429); never a time or a ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_flood_runs_and_loses_nothing() -> None:
    command = [
        sys.executable,
        "-m",
        "bench.flood",
        "--clients",
        "20",
        "--seconds",
        "2",
        "--warmup",
        "0.5",
        "--json",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{result.stdout[-2000:]}"
    report = json.loads(result.stdout)
    baseline, flood = report["phases"]
    for phase in (baseline, flood):
        assert phase["published"] > 0
        assert phase["missing"] == 0 and phase["duplicates"] == 0
        assert phase["well_behaved_rate_limited"] == 0
        assert phase["well_behaved_closed"] == 0
        assert phase["p99_ms"] is not None
    flooder = flood["flooder"]
    assert flooder["connections"] >= 1 and flooder["rate_limited"] > 0
    assert set(flooder["close_codes"]) <= {"4429", "None"} and "4429" in flooder["close_codes"]
    assert "p99_ratio" in report

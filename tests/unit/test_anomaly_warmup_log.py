"""A quiet gateway's detector does not warn every window while it warms up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from anomaly.features import WindowState
from anomaly.settings import AnomalySettings
from anomaly.worker import Worker


def test_too_few_windows_is_a_warning_once_not_every_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(AnomalySettings(data_dir=tmp_path, warmup_windows=2, long_window_windows=0))
    caplog.set_level(logging.DEBUG, logger="rabbitgate")
    for n in range(10):  # nobody connects: every window is empty
        worker.process(WindowState(float(n), float(n + 1)), keep_all=False)
    too_few = [r for r in caplog.records if "too few windows" in r.getMessage()]
    assert [r.levelno for r in too_few] == [logging.WARNING] + [logging.DEBUG] * 8
    assert worker.model is None

"""The detector's worker process on a real gateway: killed or hung, it is
replaced by one that reloads the model and goes on scoring; the gateway's
death takes it along; stopping the gateway leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from anomaly_fixtures import save_baseline_model

from anomaly.child import WorkerGone
from anomaly.detector import Detector
from gateway.config import Settings

from .anomaly_helpers import next_alert, open_ws, scan_channels, welcome
from .processes import GatewayProcess

pytestmark = pytest.mark.integration


async def new_worker(detector: Detector, old_pid: int | None, deadline: float = 60) -> int:
    """Wait until the supervisor has started a worker other than ``old_pid``."""

    async def started() -> int:
        while True:
            worker = detector.worker
            if worker is not None and worker.pid != old_pid and worker.alive:
                if detector._worker_ready.is_set():
                    return int(worker.pid or 0)
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(started(), deadline)


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (it runs no more either way)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def scan_and_expect_alert(
    gateway: Any,
    client_ssl: ssl.SSLContext,
    token: str,
    address: str,
    alert_queue: aio_pika.abc.AbstractQueue,
) -> None:
    ws = await open_ws(gateway.port, client_ssl, token, address)
    await welcome(ws)
    await scan_channels(ws, 40)
    decisions = await gateway.anomaly.detector.tick()
    assert ("user", "mallory") in {
        (d.window.subject_kind, d.window.key) for d in decisions if d.flagged
    }
    kinds = set()
    while "user" not in kinds:
        _, body = await next_alert(alert_queue)
        kinds.add(body["subject"]["kind"])
    await ws.close()


async def test_a_killed_worker_is_replaced_and_the_detector_still_alerts(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    alert_queue: aio_pika.abc.AbstractQueue,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    gateway = await start_gateway(anomaly_settings())
    detector: Detector = gateway.anomaly.detector
    assert detector.worker is not None and detector.model is not None
    first = detector.worker.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    second = await new_worker(detector, first)
    assert exited(first)
    assert detector.worker_restarts == 1
    assert gateway.node.metrics.anomaly_worker_restarts._value.get() == 1
    assert not detector.learning and detector.model is not None  # reloaded from disk
    await scan_and_expect_alert(
        gateway, client_ssl, make_token("mallory"), "127.0.8.1", alert_queue
    )
    assert detector.worker is not None and detector.worker.pid == second


async def test_a_hung_worker_is_killed_and_replaced(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    alert_queue: aio_pika.abc.AbstractQueue,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    gateway = await start_gateway(anomaly_settings())
    detector: Detector = gateway.anomaly.detector
    assert detector.worker is not None
    first = detector.worker.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)  # alive, answering nothing
    detector.reply_timeout = 1.0
    with pytest.raises(WorkerGone):
        await detector.tick()
    await new_worker(detector, first)
    assert exited(first) and detector.worker_restarts == 1
    detector.reply_timeout = 300.0
    await scan_and_expect_alert(
        gateway, client_ssl, make_token("mallory"), "127.0.8.2", alert_queue
    )


async def test_stopping_the_gateway_ends_the_worker(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
) -> None:
    gateway = await start_gateway(anomaly_settings())
    worker = gateway.anomaly.detector.worker
    pid = worker.pid
    await gateway.stop()
    assert exited(pid)
    assert worker.gone.is_set()


async def test_the_worker_exits_when_the_gateway_process_is_killed(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "anomaly"
    data_dir.mkdir()
    save_baseline_model(data_dir)
    monkeypatch.setenv("RABBITGATE_ANOMALY_ENABLED", "1")
    monkeypatch.setenv("RABBITGATE_ANOMALY_DATA_DIR", str(data_dir))
    gateway = GatewayProcess(settings, tmp_path).start()
    try:
        assert gateway.process is not None
        workers = [pid for pid in children(gateway.process.pid) if b"spawn_main" in cmdline(pid)]
        assert len(workers) == 1, (workers, gateway.log.read_text()[-2000:])
        gateway.kill()  # SIGKILL: no stop, no cleanup; only the worker's pipe tells it
        deadline = time.monotonic() + 30
        while not exited(workers[0]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert exited(workers[0])
    finally:
        gateway.stop()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""

"""websockets' own lines about a connection name it by user, session and address,
not by ``<gateway.transports.admission.AdmittedConnection object at 0x...>``."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from gateway.app import Gateway
from gateway.telemetry import logs
from gateway.telemetry.logs import configure_logging

pytestmark = pytest.mark.integration


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything logged at INFO, as `rabbitgate serve` writes it."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    levels = {name: logging.getLogger(name).level for name in logs.LEAKY_LOGGERS}
    buffer = io.StringIO()
    configure_logging("INFO", "json", stream=buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_connection_lines_show_user_session_and_address(
    gateway: Gateway, connect_client: Any, log_output: io.StringIO
) -> None:
    alice = await connect_client("alice")
    session = alice.welcome["session"]
    await alice.close()
    for _ in range(100):  # the server logs "connection closed" once it saw the close
        if '"connection closed"' in log_output.getvalue():
            break
        await asyncio.sleep(0.02)
    text = log_output.getvalue()
    assert "object at 0x" not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    by_msg = {line["msg"]: line for line in lines if line["logger"] == "websockets.server"}
    assert by_msg["connection open"]["address"] == "127.0.0.1"
    closed = by_msg["connection closed"]
    assert (closed["user"], closed["session"], closed["address"]) == (
        "alice",
        session,
        "127.0.0.1",
    )
    assert "websocket" not in closed

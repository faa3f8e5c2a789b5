"""JSON log lines and the audit stream, without a gateway."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway.telemetry import logs
from gateway.telemetry.audit import audit_sink
from gateway.telemetry.events import TrafficEvent
from gateway.telemetry.logs import configure_logging


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Root logging into a buffer as JSON, restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    saved_levels = {n: logging.getLogger(n).level for n in (*logs.LEAKY_LOGGERS, logs.AUDIT_LOGGER)}
    buffer = io.StringIO()
    configure_logging("INFO", "json", stream=buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_ts_level_logger_msg(captured: io.StringIO) -> None:
    logging.getLogger("rabbitgate.test").warning("hello %s", "world", extra={"channel": "c.1"})
    (line,) = lines(captured)
    assert line["level"] == "WARNING" and line["logger"] == "rabbitgate.test"
    assert line["msg"] == "hello world" and line["channel"] == "c.1"
    assert isinstance(line["ts"], str) and line["ts"].endswith("+00:00")


async def test_the_bound_connection_names_every_line_of_its_task(captured: io.StringIO) -> None:
    async def connection(n: int) -> None:
        logs.bind(session=f"s{n}", user=f"u{n}", address="192.0.2.1")
        await asyncio.sleep(0)
        logging.getLogger("rabbitgate.test").info("working")

    await asyncio.gather(connection(1), connection(2))
    logging.getLogger("rabbitgate.test").info("outside")
    found = lines(captured)
    assert {(x["session"], x["user"]) for x in found[:2]} == {("s1", "u1"), ("s2", "u2")}
    assert "session" not in found[2]


def test_exceptions_and_odd_extra_values_still_make_one_line(captured: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("rabbitgate.test").exception("failed", extra={"obj": object()})
    (line,) = lines(captured)
    assert "ValueError: boom" in str(line["exc"]) and "object" in str(line["obj"])


def test_debug_logs_never_switch_on_the_libraries_that_log_headers_or_bodies() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("DEBUG", "text", stream=io.StringIO())
        for name in logs.LEAKY_LOGGERS:
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        configure_logging("ERROR", "text", stream=io.StringIO())
        assert logging.getLogger(logs.AUDIT_LOGGER).isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name in (*logs.LEAKY_LOGGERS, logs.AUDIT_LOGGER):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_the_audit_stream_records_security_decisions_only(captured: io.StringIO) -> None:
    for event in (
        TrafficEvent("auth_failed", "192.0.2.7", detail="expired"),
        TrafficEvent("denied", "192.0.2.7", "eve", "s1", "admin.x", detail="publish", rule="3"),
        TrafficEvent("rate_limited", "192.0.2.7", "eve", "s1", detail="frames"),
        TrafficEvent("banned", "192.0.2.7", "eve", detail="4429"),
        TrafficEvent("publish", "192.0.2.7", "eve", "s1", "chat.a", size=5),
        TrafficEvent("auth_ok", "192.0.2.7", "eve"),
    ):
        audit_sink(event)
    found = lines(captured)
    assert [x["event"] for x in found] == ["auth_failed", "denied", "rate_limited", "banned"]
    assert all(x["logger"] == "rabbitgate.audit" for x in found)
    denied = found[1]
    assert (denied["user"], denied["channel"], denied["rule"], denied["detail"]) == (
        "eve",
        "admin.x",
        "3",
        "publish",
    )
    assert denied["address"] == "192.0.2.7" and denied["session"] == "s1"

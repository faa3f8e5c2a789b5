"""Logs as JSON lines, one event a line, for operators and their log shippers.

Each line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, and the
``session``, ``user`` and ``address`` of the connection when known: from the
record's ``extra`` first, else from the log context bound for the current task
(``bind``; asyncio copies it into tasks the connection's handler creates).
Other ``extra`` fields a caller passes (``event``, ``channel``, ``rule``...)
are added as they are.

``configure_logging`` is what ``rabbitgate serve`` calls. It caps the loggers
of libraries that write request headers or message bodies at DEBUG
(websockets, aiohttp, aio-pika, aiormq) at INFO, so that turning on debug logs
never puts a token or a message body in them, and keeps the audit stream
(``rabbitgate.audit``) at INFO whatever the general level.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import weakref
from datetime import UTC, datetime
from typing import IO, Any

import orjson

AUDIT_LOGGER = "rabbitgate.audit"
CONTEXT_FIELDS = ("session", "user", "address")
# Libraries that log raw frames, headers or bodies at DEBUG.
LEAKY_LOGGERS = ("websockets", "aiohttp", "aio_pika", "aiormq")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "rabbitgate_log_context", default=None
)
# What every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def bind(**fields: str | None) -> None:
    """Name the connection the current task (and tasks it starts) works for."""
    _context.set({k: v for k, v in fields.items() if v is not None})


# Fields of WebSocket connections, for websockets' own lines ("connection
# open", "connection closed"): it logs them with ``extra={"websocket": conn}``
# from callbacks outside the connection's task, where no context is bound.
# Weak: a connection's entry goes with it.
_connections: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def bind_connection(connection: Any, **fields: str | None) -> None:
    """``bind`` for the current task, and remember the fields for ``connection``."""
    bind(**fields)
    with contextlib.suppress(TypeError):  # not weakly referenceable: address alone
        _connections[_key(connection)] = {k: v for k, v in fields.items() if v is not None}


def _key(connection: Any) -> Any:
    # websockets logs with a weakref.proxy of the connection, which can be
    # neither hashed nor weakly referenced; its sans-I/O protocol object can,
    # and the proxy reaches it.
    return getattr(connection, "protocol", None) or connection


def connection_fields(connection: Any) -> dict[str, str]:
    """session, user (once authenticated) and address of a websockets connection;
    {} for anything else (a log line never fails on its ``extra``)."""
    try:
        known = _connections.get(_key(connection))
        if known:
            return dict(known)
        address = getattr(connection, "forwarded_client", None)
        if address is None:
            remote = getattr(connection, "remote_address", None)
            address = remote[0] if isinstance(remote, tuple) and remote else None
    except (TypeError, ReferenceError, OSError):  # unhashable, a proxy of a connection gone
        return {}
    return {"address": str(address)} if address is not None else {}


class JsonFormatter(logging.Formatter):
    """One JSON object a line; never raises on odd ``extra`` values."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_context.get() or {})
        for key, value in record.__dict__.items():
            if key == "websocket":  # its repr is <...AdmittedConnection object at 0x...>
                line.update(connection_fields(value))
            elif key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(
    level: str, log_format: str, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as JSON lines or text.

    Replaces the root logger's handlers; returns the handler installed.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if root.level < logging.INFO:
        for name in LEAKY_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    # watchfiles says "N changes detected" at INFO on every edit; the reloader
    # logs what matters (the reload and its result) itself.
    logging.getLogger("watchfiles").setLevel(max(root.level, logging.WARNING))
    # The audit stream stays on whatever the general level.
    logging.getLogger(AUDIT_LOGGER).setLevel(min(root.level, logging.INFO))
    return handler

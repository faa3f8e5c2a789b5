"""Deleting what test runs leave on the main RabbitMQ: history streams and their exchanges.

Used at the end of every test session (tests/conftest.py) and by hand:
``python tests/tests_cleanup.py`` deletes every stream of a test prefix
(``t`` and 10 hex digits) that any earlier run left behind.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Iterable

import aio_pika

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
STREAM_PREFIX = "rabbitgate.stream."
TEST_PREFIX = re.compile(r"t[0-9a-f]{10}")


def stream_names() -> list[str]:
    """Every history stream on the broker (``rabbitmqctl``; empty if it is not there)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return []
    try:
        listed = subprocess.run(
            [ctl, "-q", "list_queues", "name"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [n for n in listed.stdout.split() if n.startswith(STREAM_PREFIX)]


async def delete_streams(prefixes: Iterable[str] | None = None) -> int:
    """Delete the streams (and exchanges) of ``prefixes``, or of every test prefix."""
    wanted = set(prefixes) if prefixes is not None else None
    doomed = []
    for name in stream_names():
        exchange = name[len(STREAM_PREFIX) :]
        head = exchange.split(".", 1)[0]
        if (wanted is None and TEST_PREFIX.fullmatch(head)) or (wanted and head in wanted):
            doomed.append((name, exchange))
    if not doomed:
        return 0
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=10)
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError):
        return 0
    async with connection:
        channel = await connection.channel()
        for queue, exchange in doomed:
            await channel.queue_delete(queue)
            await channel.exchange_delete(exchange)
    return len(doomed)


if __name__ == "__main__":
    print(f"deleted {asyncio.run(delete_streams())} test streams")

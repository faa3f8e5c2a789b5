"""The logs of a real scenario: JSON lines, an audit record per security
decision, and never a token or a message body, even at DEBUG."""

from __future__ import annotations

import io
import logging
import ssl
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.app import Gateway
from gateway.telemetry import logs
from gateway.telemetry.logs import configure_logging

pytestmark = pytest.mark.integration


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything logged, as `rabbitgate serve --log-level DEBUG` would write it."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    names = (*logs.LEAKY_LOGGERS, logs.AUDIT_LOGGER)
    levels = {name: logging.getLogger(name).level for name in names}
    buffer = io.StringIO()
    configure_logging("DEBUG", "json", stream=buffer)
    yield buffer
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_security_decisions_are_audited_without_tokens_or_bodies(
    gateway: Gateway,
    connect_client: Any,
    make_token: Callable[..., str],
    client_ssl: ssl.SSLContext,
    log_output: io.StringIO,
) -> None:
    marker = f"body-{uuid.uuid4().hex}"
    alice_token = make_token("alice")
    sse_token = make_token("carol")
    bad_token = make_token("mallory") + "x"

    alice = await connect_client(token=alice_token)
    bob = await connect_client("bob")
    await bob.request("subscribe", channel="chat.audit")
    assert (await alice.request("publish", channel="chat.audit", data={"s": marker}))[
        "type"
    ] == "ack"
    assert (await bob.next_message())["data"] == {"s": marker}
    denied = await alice.request("publish", channel="user.bob.inbox", data=marker)
    assert denied["code"] == "forbidden"
    with pytest.raises(InvalidStatus):
        await connect(
            f"wss://localhost:{gateway.port}/ws",
            ssl=client_ssl,
            additional_headers={"Authorization": f"Bearer {bad_token}"},
        )
    async with aiohttp.ClientSession() as http:
        url = f"https://localhost:{gateway.sse_port}/events"
        params = {"channel": "user.bob.inbox", "access_token": sse_token}
        async with http.get(url, params=params, ssl=client_ssl) as response:
            assert response.status == 403
    assert await gateway.reloader.reload("test") is True
    await alice.close()
    await bob.close()

    text = log_output.getvalue()
    records = [orjson.loads(line) for line in text.splitlines()]
    assert records, "nothing was logged"
    audit = [r for r in records if r["logger"] == "rabbitgate.audit"]
    decisions = [(r.get("event"), r.get("user"), r.get("channel"), r.get("detail")) for r in audit]
    assert ("auth_failed", None, None, "bad_signature") in decisions, decisions
    assert ("denied", "alice", "user.bob.inbox", "publish") in decisions
    assert ("denied", "carol", "user.bob.inbox", "subscribe") in decisions
    assert any(str(r["msg"]).startswith("policy reload") for r in audit), audit
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)

    for secret in (alice_token, sse_token, bad_token, marker):
        assert secret not in text
        # Nor any part that identifies it: the signature, or the body's marker.
        assert secret.rsplit(".", 1)[-1] not in text

"""STOMP over the real gateway (TLS, real tokens, real RabbitMQ), frames written by hand.

The conversation as contract section 10 says it, and the hostile cases: a
bad frame, a NUL in a header, huge headers, many subscriptions, frames before
CONNECT, SEND to a queue or a wildcard, ACK. Each gets an ERROR and a close,
and the gateway goes on serving.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway.server import Gateway

from .stomp_wire import StompWire, frame, open_wire

pytestmark = pytest.mark.integration


@pytest.fixture
def wire(gateway: Gateway, client_ssl: ssl.SSLContext) -> Callable[..., Any]:
    async def make(**kwargs: Any) -> StompWire:
        return await open_wire(gateway.port, client_ssl, **kwargs)

    return make


async def connected(wire: Callable[..., Any], token: str) -> StompWire:
    client: StompWire = await wire()
    answer = await client.connect(token)
    assert answer.command == "CONNECTED", (answer.headers, answer.body)
    return client


async def test_connect_with_passcode_subscribe_send_with_receipt_and_receive(
    wire: Callable[..., Any], make_token: Callable[..., str]
) -> None:
    client: StompWire = await wire()
    answer = await client.connect(make_token("alice"), heart_beat="0,0")
    assert answer.command == "CONNECTED"
    assert answer.headers["version"] == "1.2"
    assert answer.headers["server"].startswith("rabbitgate/")
    assert answer.headers["session"]
    assert client.ws.subprotocol == "v12.stomp"
    await client.send(frame("SUBSCRIBE", id="sub-0", destination="/topic/chat.a", receipt="r1"))
    assert (await client.recv()).headers == {"receipt-id": "r1"}
    body = orjson.dumps({"text": "hi"})
    await client.send(
        frame(
            "SEND", body, destination="/topic/chat.a", content_type="application/json", receipt="r2"
        )
    )
    got = [await client.recv(), await client.recv()]
    receipt = next(f for f in got if f.command == "RECEIPT")
    message = next(f for f in got if f.command == "MESSAGE")
    assert receipt.headers["receipt-id"] == "r2"
    assert message.headers["subscription"] == "sub-0"
    assert message.headers["destination"] == "/topic/chat.a"
    assert message.headers["content-type"] == "application/json"
    assert message.headers["x-from"] == "alice"
    assert int(message.headers["x-seq"]) >= 0 and int(message.headers["x-ts"]) > 0
    assert message.headers["message-id"]
    assert orjson.loads(message.body) == {"text": "hi"}

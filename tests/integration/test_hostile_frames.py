"""Bad input gets the spec's error frame or close code; the connection (and
the server) keep working afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.integration

BAD_FRAMES = [
    ("not json", "bad_request"),
    ("[1,2,3]", "bad_request"),
    ('"just a string"', "bad_request"),
    ("{}", "bad_request"),
    ('{"type": 5}', "bad_request"),
    ('{"type": "launch_missiles", "id": 1}', "bad_request"),
    ('{"type": "subscribe"}', "bad_request"),
    ('{"type": "subscribe", "id": 1}', "bad_request"),
    ('{"type": "subscribe", "id": true, "channel": "chat.a"}', "bad_request"),
    ('{"type": "subscribe", "id": {"x": 1}, "channel": "chat.a"}', "bad_request"),
    ('{"type": "subscribe", "id": "' + "x" * 65 + '", "channel": "chat.a"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": 5}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.*"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.#"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "#"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat..a"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": ".chat"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat."}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": ""}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.' + "a" * 196 + '"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.caf\u00e9"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.a b"}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.a", "since": -1}', "bad_request"),
    ('{"type": "subscribe", "id": 1, "channel": "chat.a", "since": "5"}', "bad_request"),
    ('{"type": "publish", "channel": "chat.a"}', "bad_request"),
    ('{"type": "publish", "data": 1}', "bad_request"),
    ('{"type": "ping"}', "bad_request"),
    ('{"type": "auth", "token": 5}', "bad_request"),
    ('{"type": "unsubscribe", "id": 1}', "bad_request"),
]


@pytest.mark.parametrize(("text", "code"), BAD_FRAMES)
async def test_a_bad_frame_gets_an_error_and_the_connection_stays(
    connect_client: Any, text: str, code: str
) -> None:
    alice = await connect_client("alice")
    await alice.ws.send(text)
    answer = await alice.recv()
    assert answer["type"] == "error" and answer["code"] == code, answer
    assert (await alice.request("ping"))["type"] == "pong"


async def test_a_channel_of_exactly_200_bytes_is_accepted(connect_client: Any) -> None:
    alice = await connect_client("alice")
    channel = "chat." + "a" * 195
    assert len(channel) == 200
    assert (await alice.request("subscribe", channel=channel))["type"] == "ack"


async def test_error_echoes_the_request_id(connect_client: Any) -> None:
    alice = await connect_client("alice")
    await alice.ws.send('{"type":"subscribe","id":"abc","channel":"chat.*"}')
    answer = await alice.recv()
    assert answer["id"] == "abc"


async def test_binary_frames_are_refused_without_closing(connect_client: Any) -> None:
    alice = await connect_client("alice")
    await alice.ws.send(b'{"type":"ping","id":1}')
    assert (await alice.recv())["code"] == "bad_request"
    assert (await alice.request("ping"))["type"] == "pong"


async def test_a_frame_over_the_limit_closes_with_1009(connect_client: Any) -> None:
    alice = await connect_client("alice")
    await alice.ws.send('{"type":"publish","channel":"chat.a","data":"' + "x" * 70_000 + '"}')
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(alice.ws.recv(), 5)
    assert alice.ws.close_code == 1009


async def test_the_server_survives_a_burst_of_garbage(connect_client: Any) -> None:
    alice = await connect_client("alice")
    for i in range(200):
        await alice.ws.send("{" * (i % 50) + "garbage")
    for _ in range(200):
        assert (await alice.recv())["code"] == "bad_request"
    bob = await connect_client("bob")
    assert (await bob.request("ping"))["type"] == "pong"

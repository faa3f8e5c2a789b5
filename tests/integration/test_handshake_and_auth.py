"""Section 1, 2 and 7 of the wire contract: handshake, authentication, token life."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway.app import Gateway

pytestmark = pytest.mark.integration


def url(gateway: Gateway) -> str:
    return f"wss://localhost:{gateway.port}/ws"


async def close_code(ws: Any, timeout: float = 5) -> int | None:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code


@pytest.mark.parametrize(
    "authorization",
    ["Bearer not-a-jwt", "Basic YWxpY2U6c2VjcmV0", "Bearer ", "Bearer a.b.c"],
)
async def test_an_invalid_header_token_is_refused_with_401_before_the_upgrade(
    gateway: Gateway, client_ssl: ssl.SSLContext, authorization: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(
            url(gateway), ssl=client_ssl, additional_headers={"Authorization": authorization}
        )
    assert refused.value.response.status_code == 401
    assert b"a.b.c" not in refused.value.response.body


async def test_an_expired_header_token_is_refused_with_401(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    token = make_token("alice", ttl=-10)
    with pytest.raises(InvalidStatus) as refused:
        await connect(
            url(gateway), ssl=client_ssl, additional_headers={"Authorization": f"Bearer {token}"}
        )
    assert refused.value.response.status_code == 401


async def test_no_auth_frame_in_time_closes_with_4408(
    gateway: Gateway, client_ssl: ssl.SSLContext
) -> None:
    async with connect(url(gateway), ssl=client_ssl) as ws:
        assert await close_code(ws) == 4408


async def test_an_invalid_auth_frame_closes_with_4401(
    gateway: Gateway, client_ssl: ssl.SSLContext
) -> None:
    async with connect(url(gateway), ssl=client_ssl) as ws:
        await ws.send('{"type":"auth","token":"eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."}')
        assert await close_code(ws) == 4401


async def test_frames_before_auth_get_unauthorized_and_are_not_processed(
    gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any
) -> None:
    async with connect(url(gateway), ssl=client_ssl) as ws:
        await ws.send('{"type":"subscribe","id":1,"channel":"chat.lobby"}')
        answer = await asyncio.wait_for(ws.recv(), 5)
        assert '"unauthorized"' in answer and '"id":1' in answer
        await ws.send('{"type":"publish","channel":"chat.lobby","data":1}')
        assert '"unauthorized"' in await asyncio.wait_for(ws.recv(), 5)
        await ws.send("not json")
        assert '"unauthorized"' in await asyncio.wait_for(ws.recv(), 5)
        await ws.send(b"\x00binary")
        assert '"unauthorized"' in await asyncio.wait_for(ws.recv(), 5)
        await ws.send(f'{{"type":"auth","token":"{make_token("alice")}"}}')
        assert '"welcome"' in await asyncio.wait_for(ws.recv(), 5)


async def test_the_connection_closes_with_4401_when_the_token_expires(connect_client: Any) -> None:
    alice = await connect_client("alice", ttl=1.5)
    assert await close_code(alice.ws) == 4401
    assert "expired" in alice.ws.close_reason


async def test_a_refreshed_token_keeps_the_connection_open(
    connect_client: Any, make_token: Any
) -> None:
    alice = await connect_client("alice", ttl=1.5)
    answer = await alice.request("auth", token=make_token("alice", ttl=60))
    assert answer["type"] == "ack"
    await asyncio.sleep(2.0)
    assert (await alice.request("ping"))["type"] == "pong"


async def test_a_refresh_for_another_user_is_refused_and_the_old_token_stays(
    connect_client: Any, make_token: Any
) -> None:
    alice = await connect_client("alice", ttl=1.5)
    answer = await alice.request("auth", token=make_token("mallory", ttl=60))
    assert answer["code"] == "unauthorized"
    bad = await alice.request("auth", token="garbage")
    assert bad["code"] == "unauthorized"
    assert await close_code(alice.ws) == 4401


async def test_subprotocols(gateway: Gateway, client_ssl: ssl.SSLContext, make_token: Any) -> None:
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    async with connect(url(gateway), ssl=client_ssl, additional_headers=headers) as ws:
        assert ws.subprotocol is None
    async with connect(
        url(gateway),
        ssl=client_ssl,
        additional_headers=headers,
        subprotocols=["x", "rabbitgate.v1"],
    ) as ws:
        assert ws.subprotocol == "rabbitgate.v1"
    with pytest.raises(InvalidHandshake):
        await connect(
            url(gateway), ssl=client_ssl, additional_headers=headers, subprotocols=["stomp"]
        )


async def test_plaintext_is_refused_on_the_tls_port(gateway: Gateway) -> None:
    with pytest.raises(
        (InvalidHandshake, ConnectionError, EOFError, OSError, asyncio.TimeoutError)
    ):
        await asyncio.wait_for(connect(f"ws://localhost:{gateway.port}/ws"), 5)


async def test_other_paths_are_not_found(gateway: Gateway, client_ssl: ssl.SSLContext) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"wss://localhost:{gateway.port}/admin", ssl=client_ssl)
    assert refused.value.response.status_code == 404

"""`rabbitgate connections list|kick|ban|unban` against a real gateway's admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import Gateway
from gateway.cli import main
from gateway.config import Settings
from gateway.operations.connections_admin import add_operator
from gateway.policy.rules import load_policy_set

pytestmark = pytest.mark.integration


@pytest.fixture
async def operated(
    settings: Settings, cleanup_broker: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    operators = tmp_path / "operators"
    token = add_operator(operators, "olga")
    custom = dataclasses.replace(settings, operators_file=operators)
    gw = Gateway(custom, load_policy_set(custom.policies_dir))
    await gw.start()
    monkeypatch.setenv("RABBITGATE_ADMIN_URL", f"http://127.0.0.1:{gw.admin_port}")
    monkeypatch.setenv("RABBITGATE_OPERATOR_TOKEN", token)
    yield gw
    await gw.stop()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["connections", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def closed(client: Any) -> tuple[int | None, str | None]:
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            await asyncio.wait_for(client.ws.recv(), 5)
    return client.ws.close_code, client.ws.close_reason


async def test_list_shows_each_connection_and_escapes_hostile_names(
    operated: Gateway, connect_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ann = await connect_client("ann", gw=operated)
    assert (await ann.request("subscribe", channel="chat.lobby"))["type"] == "ack"
    assert (await ann.request("publish", channel="chat.lobby", data={"n": 1}))["type"] == "ack"
    # A token's sub is printable (gateway/auth/principal.py): no control codes
    # can reach a terminal; markup passes as text, one row per connection.
    await connect_client('<img src=x onerror="1">', gw=operated)
    code, out, err = await cli(capsys, "list", "--json")
    assert code == 0, err
    answer = json.loads(out)
    rows = {r["user"]: r for r in answer["connections"]}
    assert rows["ann"]["transport"] == "websocket"
    assert rows["ann"]["channels"] == ["chat.lobby"]
    assert rows["ann"]["messages_in"] == 1
    assert rows["ann"]["address"] == "127.0.0.1"
    assert rows["ann"]["since"] > 1.7e9 and 0 <= rows["ann"]["send_buffer_fill"] <= 1
    code, out, _ = await cli(capsys, "list", "--channel", "chat.lobby")
    assert code == 0 and "\tann\t" in out and "img" not in out
    code, out, _ = await cli(capsys, "list", "--user", '<img src=x onerror="1">')
    assert '\t<img src=x onerror=\\"1\\">\t' in out
    assert out.count("\n") == 3  # the two heading lines and one row


async def test_kick_a_user_closes_every_session_with_1008_and_the_reason(
    operated: Gateway, connect_client: Any, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, "rabbitgate.audit")
    one = await connect_client("bob", gw=operated)
    two = await connect_client("bob", gw=operated)
    other = await connect_client("cat", gw=operated)
    code, out, err = await cli(capsys, "kick", "--user", "bob", "--reason", "maintenance")
    assert code == 0, err
    assert "closed 2 connection(s)" in out
    for client in (one, two):
        assert await closed(client) == (1008, "disconnected by an operator: maintenance")
    assert (await other.request("ping"))["type"] == "pong"
    records = [r for r in caplog.records if getattr(r, "event", None) == "operator_kick"]
    assert [(r.operator, r.target, r.closed) for r in records] == [("olga", "user bob", 2)]  # type: ignore[attr-defined]


async def test_ban_closes_with_4403_refuses_reconnects_and_unban_lifts_it(
    operated: Gateway, connect_client: Any, client_ssl: ssl.SSLContext, make_token: Any,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, "rabbitgate.audit")
    dan = await connect_client("dan", gw=operated)
    code, out, err = await cli(capsys, "ban", "--user", "dan", "--for", "10m", "--reason", "spam")
    assert code == 0, err
    assert await closed(dan) == (4403, "banned by an operator: spam")
    headers = {"Authorization": f"Bearer {make_token('dan')}"}
    with pytest.raises((InvalidStatus, ConnectionClosed)):
        async with connect(
            f"wss://localhost:{operated.port}/ws", ssl=client_ssl, additional_headers=headers
        ) as ws:
            await asyncio.wait_for(ws.recv(), 5)
            await asyncio.wait_for(ws.recv(), 5)
    code, out, _ = await cli(capsys, "list", "--json")
    assert json.loads(out)["bans"][0]["key"] == "dan"
    code, out, _ = await cli(capsys, "unban", "--user", "dan")
    assert code == 0 and out.strip() == "unbanned"
    await connect_client("dan", gw=operated)
    events = [
        (r.event, r.operator)  # type: ignore[attr-defined]
        for r in caplog.records
        if str(getattr(r, "event", "")).startswith("operator_")
    ]
    assert events == [("operator_ban", "olga"), ("operator_unban", "olga")]


async def test_no_token_or_a_wrong_one_acts_on_nothing(
    operated: Gateway, connect_client: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    eve = await connect_client("eve", gw=operated)
    monkeypatch.setenv("RABBITGATE_OPERATOR_TOKEN", "not-the-token")
    code, out, err = await cli(capsys, "kick", "--user", "eve")
    assert code == 1 and err.count("\n") == 1 and "401 unauthorized" in err
    monkeypatch.delenv("RABBITGATE_OPERATOR_TOKEN")
    code, out, err = await cli(capsys, "list")
    assert code == 1 and "RABBITGATE_OPERATOR_TOKEN" in err
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{operated.admin_port}/connections/kick"
        async with http.post(url, json={"user": "eve"}) as response:
            assert response.status == 401
    assert (await eve.request("ping"))["type"] == "pong"


async def test_without_operators_file_the_endpoints_are_not_served(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gateway.admin_port}/connections") as response:
            assert response.status == 404

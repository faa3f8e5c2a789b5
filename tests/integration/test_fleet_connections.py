"""The operator's tools over every gateway process (gateway/operations/fleet_connections.py):
real gateway processes sharing the real RabbitMQ and Redis, real TLS WebSocket
clients with real signed tokens, the real CLI against their admin listeners,
and `serve --workers 2` behind its supervisor's admin port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.cli import main
from gateway.config import Settings
from gateway.operations.connections_admin import add_operator
from gateway.operations.control_messages import seal
from gateway.operations.staff import CONSOLE_ACT, set_member

from .conftest import Client
from .fleet import REDIS_URL, Fleet

pytestmark = pytest.mark.integration

KEY = "k" * 32  # control.key of every process in these tests
PASSWORD = "correct horse battery staple"


@pytest.fixture
def prefix() -> str:
    """A control prefix of this test's own: other gateways on this Redis are not ours."""
    return f"rabbitgate:test-control:{uuid.uuid4().hex}"


class Operator:
    """`rabbitgate connections ...` as the operator olga, against an admin port."""

    def __init__(self, token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.token_file = token_file
        self.capsys = capsys
        self.err = ""  # the latest command's stderr

    async def run(self, admin_port: int, *argv: str) -> str:
        flags = [
            "--admin-url",
            f"http://127.0.0.1:{admin_port}",
            "--token-file",
            str(self.token_file),
        ]
        code = await asyncio.to_thread(main, ["connections", *argv, *flags])
        out, self.err = self.capsys.readouterr()
        assert code == 0, self.err
        return out

    async def list(self, admin_port: int, *argv: str) -> Any:
        return json.loads(await self.run(admin_port, "list", "--json", *argv))


@pytest.fixture
def operator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Operator:
    # A token file, not $RABBITGATE_OPERATOR_TOKEN: the gateways started here
    # would read that RABBITGATE_* variable as a setting of theirs.
    token = add_operator(tmp_path / "operators", "olga")
    (tmp_path / "token").write_text(token)
    return Operator(tmp_path / "token", capsys)


@pytest.fixture
def gateways(
    settings: Settings, tmp_path: Path, prefix: str, operator: Operator, cleanup_broker: None
) -> Iterator[Any]:
    """``start()``: one more gateway process (``serve``, one worker) of this fleet."""
    started: list[Fleet] = []

    staff = tmp_path / "staff"
    set_member(staff, "olga", PASSWORD, frozenset({CONSOLE_ACT}))

    def start(**extra: Any) -> Fleet:
        config = {
            "workers": 1,
            "operators_file": str(tmp_path / "operators"),
            "staff": {"file": str(staff)},
            "presence_ttl_seconds": 3,
            "control": {"key": KEY, "prefix": prefix, "deadline_seconds": 1.0},
            **extra,
        }
        gateway = Fleet(settings, tmp_path, **config)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


async def open_client(port: int, token: str, tls: ssl.SSLContext) -> Client:
    ws = await connect(
        f"wss://localhost:{port}/ws",
        ssl=tls,
        additional_headers={"Authorization": f"Bearer {token}"},
    )
    client = Client(ws)
    assert (await client.recv())["type"] == "welcome"
    return client


async def console_login(http: aiohttp.ClientSession, base: str) -> None:
    async with http.get(base + "login") as page:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert csrf is not None
    form = {"csrf": csrf.group(1), "name": "olga", "password": PASSWORD}
    async with http.post(base + "login", data=form, allow_redirects=False) as login:
        assert login.status == 303, await login.text()


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found is not None
    return found.group(1)


async def closed(client: Client) -> tuple[int | None, str | None]:
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            await asyncio.wait_for(client.ws.recv(), 5)
    return client.ws.close_code, client.ws.close_reason


async def refused(port: int, token: str, tls: ssl.SSLContext) -> bool:
    """Whether a connection with ``token`` is refused (at the handshake or after auth)."""
    try:
        client = await open_client(port, token, tls)
    except (InvalidStatus, ConnectionClosed):
        return True
    except AssertionError:
        return True
    await client.ws.close()
    return False


async def test_list_kick_and_ban_reach_every_gateway_and_one_started_later(
    gateways: Any, make_token: Any, client_ssl: ssl.SSLContext,
    operator: Operator,
) -> None:  # fmt: skip
    a, b = gateways(), gateways()
    ann_a = await open_client(a.port, make_token("ann"), client_ssl)
    ann_b = await open_client(b.port, make_token("ann"), client_ssl)
    bob_b = await open_client(b.port, make_token("bob"), client_ssl)
    for client in (ann_a, ann_b):
        assert (await client.request("subscribe", channel="chat.fleet"))["type"] == "ack"
    for n in range(5):
        assert (await ann_a.request("publish", channel="chat.fleet", data={"n": n}))[
            "type"
        ] == "ack"
    await asyncio.sleep(1.2)  # the rate counts complete seconds

    answer = await operator.list(a.admin_port)
    processes = {p["process"]: p for p in answer["processes"]}
    assert len(processes) == 2 and all(p.get("answered", True) for p in processes.values())
    assert {p["connections"] for p in processes.values()} == {1, 2}
    rows = answer["connections"]
    assert sorted(r["user"] for r in rows) == ["ann", "ann", "bob"]
    assert {r["process"] for r in rows} == set(processes)
    assert len({r["process"] for r in rows if r["user"] == "ann"}) == 2
    ann_rows = {r["process"]: r["messages_out"] for r in rows if r["user"] == "ann"}
    # Frames written to each: the welcome, the subscribe's ack and the 5
    # messages; on A also the acks of its 5 publishes.
    assert sorted(ann_rows.values()) == [7, 12], ann_rows
    (channel,) = answer["channels"]
    assert channel["channel"] == "chat.fleet" and channel["subscribers"] == 2
    # 5 messages fanned out on each of the two processes, over a 10 s window.
    assert channel["messages_per_second"] == pytest.approx(1.0)
    # A filter holds on every process.
    only_bob = await operator.list(a.admin_port, "--user", "bob")
    assert [r["user"] for r in only_bob["connections"]] == ["bob"]
    assert only_bob["channels"] == []

    # A kick by user, asked of B, closes ann's sessions on both.
    out = await operator.run(b.admin_port, "kick", "--user", "ann", "--reason", "maintenance")
    assert "closed 2 connection(s)" in out
    for client in (ann_a, ann_b):
        assert await closed(client) == (1008, "disconnected by an operator: maintenance")
    assert (await bob_b.request("ping"))["type"] == "pong"

    # A ban asked of A closes bob on B and holds on both, and on C started after it.
    out = await operator.run(
        a.admin_port, "ban", "--user", "bob", "--for", "10m", "--reason", "spam"
    )
    assert "closed 1 connection(s)" in out
    assert await closed(bob_b) == (4403, "banned by an operator: spam")
    c = await asyncio.to_thread(gateways)
    for gateway in (a, b, c):
        assert await refused(gateway.port, make_token("bob"), client_ssl), gateway.port
    bans = (await operator.list(c.admin_port))["bans"]
    assert [(ban["kind"], ban["key"]) for ban in bans] == [("user", "bob")]
    # Lifted from C, it is lifted everywhere.
    out = await operator.run(c.admin_port, "unban", "--user", "bob")
    assert out.strip() == "unbanned"
    for gateway in (a, b, c):
        assert not await refused(gateway.port, make_token("bob"), client_ssl), gateway.port


async def test_a_killed_gateway_is_named_as_not_answering_then_dropped(
    gateways: Any, make_token: Any, client_ssl: ssl.SSLContext,
    operator: Operator,
) -> None:  # fmt: skip
    # Its registry entry outlives it by up to 8 s: time to look at it from every tool.
    a, b = gateways(presence_ttl_seconds=8), gateways(presence_ttl_seconds=8)
    await open_client(b.port, make_token("zed"), client_ssl)
    answer = await operator.list(a.admin_port)
    assert [r["user"] for r in answer["connections"]] == ["zed"]
    (zed,) = answer["connections"]
    b.signal(signal.SIGKILL)
    b.wait(10)
    began = time.monotonic()
    answer = await operator.list(a.admin_port)
    assert time.monotonic() - began < 3  # the deadline (1 s), not a stall
    missing = [p for p in answer["processes"] if p.get("answered") is False]
    assert [p["process"] for p in missing] == [zed["process"]]
    assert answer["connections"] == []
    out = await operator.run(a.admin_port, "list")
    assert f"process {zed['process']}: did not answer" in out
    # An action says what it did not reach, and does not wait longer for it.
    began = time.monotonic()
    out = await operator.run(a.admin_port, "kick", "--user", "zed")
    assert time.monotonic() - began < 3
    assert "closed 0 connection(s)" in out
    assert operator.err == f"not reached (did not answer): {zed['process']}\n"
    # The console says it too, on the page and after an action.
    base = f"http://127.0.0.1:{a.admin_port}/console/"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await console_login(http, base)
        async with http.get(base) as page:
            text = await page.text()
        assert "Incomplete: 1 process did not answer" in text and zed["process"] in text
        form = {"csrf": csrf_of(text), "user": "zed", "reason": "x"}
        async with http.post(base + "kick", data=form) as page:
            text = await page.text()
        assert "Disconnected 0 sessions (close code 1008)." in text
        assert "Some processes did not answer: it did not reach them." in text
    # Then its registry entry lapses: it is not named at all.
    for _ in range(50):
        answer = await operator.list(a.admin_port)
        if len(answer["processes"]) == 1:
            break
        await asyncio.sleep(0.2)
    assert [p.get("answered", True) for p in answer["processes"]] == [True]
    assert answer["processes"][0]["process"] != zed["process"]


def ignored(gateway: Fleet) -> dict[str, float]:
    status, text = gateway.get("/metrics")
    assert status == 200
    return {
        reason: float(value)
        for reason, value in re.findall(
            r'^rabbitgate_control_messages_ignored_total\{reason="([a-z_]+)"\} ([0-9.e+]+)$',
            text,
            re.MULTILINE,
        )
    }


async def test_forged_stale_and_malformed_control_messages_are_ignored_and_counted(
    gateways: Any, prefix: str, make_token: Any, client_ssl: ssl.SSLContext,
    operator: Operator,
) -> None:  # fmt: skip
    a = gateways()
    victim = await open_client(a.port, make_token("vic"), client_ssl)
    before = ignored(a)
    assert set(before) == {"malformed", "unsigned", "bad_signature", "stale"}
    kick = {"op": "kick", "id": "x1", "from": "attacker/1", "user": "vic", "shown": "owned"}
    ban = {"kind": "user", "key": "vic", "until": time.time() + 600, "shown": "owned"}
    replayed = seal(KEY.encode(), {"op": "list", "id": "r1", "from": "attacker/1"})
    sent = {
        "bad_signature": [seal(b"another key, not the fleet's", kick)],
        "unsigned": [seal(None, kick)],
        # An old kick, and a copy of a signed request done already (a replay).
        "stale": [seal(KEY.encode(), kick, now=time.time() - 3600), replayed],
        "malformed": [
            b"not a control message",
            b"v1.abc",
            seal(KEY.encode(), {"op": "kick", "id": "x2", "from": "a/1", "user": 5, "shown": ""}),
            seal(KEY.encode(), {"op": "drop tables", "id": "x3", "from": "a/1"}),
            b"\xff" * 100,
        ],
    }
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.publish(f"{prefix}:requests", replayed)  # done: it is signed
        for messages in sent.values():
            for message in messages:
                await client.publish(f"{prefix}:requests", message)
        # A ban written straight into the store, with another key, is ignored too.
        await client.hset(f"{prefix}:bans", "user\nvic", seal(b"another key, not the fleet's", ban))
        after: dict[str, float] = {}
        for _ in range(50):  # the store is read every second (presence_ttl_seconds / 3)
            after = ignored(a)
            if (
                all(after[r] - before[r] >= len(m) for r, m in sent.items())
                and after["bad_signature"] - before["bad_signature"] >= 2
            ):
                break
            await asyncio.sleep(0.2)
        # Each message once (the forged stored ban is counted at every read of the store).
        for reason in ("unsigned", "stale", "malformed"):
            assert after[reason] - before[reason] == len(sent[reason]), (reason, before, after)
        assert after["bad_signature"] - before["bad_signature"] >= 2
    finally:
        await client.delete(f"{prefix}:bans")
        await client.aclose()
    assert (await victim.request("ping"))["type"] == "pong"
    assert (await operator.list(a.admin_port))["bans"] == []
    # A real kick, signed with the fleet's key, does act.
    out = await operator.run(a.admin_port, "kick", "--user", "vic")
    assert "closed 1 connection(s)" in out


async def test_without_a_control_key_the_gateway_warns_and_an_unsigned_kick_acts(
    gateways: Any, prefix: str, make_token: Any, client_ssl: ssl.SSLContext
) -> None:
    """What docs/console.md says of a fleet without ``control.key``, shown:
    the start-up log says it, and a kick published by anyone on Redis acts."""
    keyed = gateways()
    unkeyed = gateways(control={"prefix": prefix + ":open", "deadline_seconds": 1.0})
    assert "control.key is not set" not in keyed.tail()
    assert "control.key is not set" in unkeyed.tail()
    assert "redis://" not in unkeyed.tail()  # the warning never shows the URL (or its password)
    victim = await open_client(unkeyed.port, make_token("vic"), client_ssl)
    kick = {"op": "kick", "id": "k1", "from": "anyone/1", "user": "vic", "shown": "bye"}
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.publish(f"{prefix}:open:requests", seal(None, kick))
    finally:
        await client.aclose()
    code, reason = await closed(victim)
    assert code == 1008 and reason is not None and "bye" in reason, (code, reason)


async def test_the_supervisor_admin_port_covers_every_worker_for_cli_and_console(
    settings: Settings, tmp_path: Path, prefix: str, operator: Operator, make_token: Any,
    client_ssl: ssl.SSLContext, cleanup_broker: None,
) -> None:  # fmt: skip
    staff = tmp_path / "staff"
    set_member(staff, "olga", PASSWORD, frozenset({CONSOLE_ACT}))
    fleet = Fleet(
        settings, tmp_path, workers=2,
        operators_file=str(tmp_path / "operators"), staff={"file": str(staff)},
        control={"key": KEY, "prefix": prefix},
    ).start()  # fmt: skip
    try:
        clients = [
            await open_client(fleet.port, make_token(f"user{i}"), client_ssl) for i in range(16)
        ]
        # The kernel spread them over both workers.
        opened = fleet.metric("rabbitgate_connections_open", transport="websocket")
        assert set(opened) == {"0", "1"} and all(opened.values()), opened
        answer = await operator.list(fleet.admin_port)
        assert len(answer["connections"]) == 16
        by_process = {p["process"]: p["connections"] for p in answer["processes"]}
        assert len(by_process) == 2 and sorted(by_process.values()) == sorted(opened.values())
        assert {r["process"] for r in answer["connections"]} == set(by_process)

        base = f"http://127.0.0.1:{fleet.admin_port}/console/"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await console_login(http, base)
            # Every later request reaches the worker that holds the login.
            for _ in range(3):
                async with http.get(base, allow_redirects=False) as page:
                    assert page.status == 200
                    text = await page.text()
            for i in range(16):
                assert f">user{i}<" in text
            for process in by_process:
                assert process in text
            assert "Incomplete" not in text
            # An action from the console reaches the other worker too.
            form = {"csrf": csrf_of(text), "user": "user3", "reason": "bye"}
            async with http.post(base + "kick", data=form, allow_redirects=False) as answer_:
                assert answer_.status == 303
        assert await closed(clients[3]) == (1008, "disconnected by an operator: bye")
        assert (await clients[4].request("ping"))["type"] == "pong"
    finally:
        fleet.stop()

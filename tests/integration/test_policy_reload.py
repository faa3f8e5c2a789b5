"""Policy hot reload on a running gateway (spec section 6): real TLS clients, real RabbitMQ.

The gateway fixture watches the test's policies folder; these tests rewrite it
(in place, by temp file and rename, vim style) and check what clients see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from websockets.asyncio.client import connect

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set, parse_policy_files

from .conftest import Client
from .processes import GatewayProcess

pytestmark = pytest.mark.integration

POLICY_FILE = "10-test.yaml"


def rule(pattern: str, exchange: str, subscribe: str, publish: str) -> str:
    return (
        f'  - channel: "{pattern}"\n    exchange: {exchange}\n'
        f"    subscribe: {subscribe}\n    publish: {publish}\n"
    )


def rules_first(base: str, *rules: str) -> str:
    """``base`` with ``rules`` before its own: they decide the channels they match."""
    head, sep, tail = base.partition("rules:\n")
    assert sep, "the test policy has no 'rules:' line"
    return head + sep + "".join(rules) + tail


def digest_of(text: str) -> str:
    return parse_policy_files({POLICY_FILE: text}).digest


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def write_in_place(folder: Path, text: str) -> None:
    (folder / POLICY_FILE).write_text(text)


def write_by_rename(folder: Path, text: str) -> None:
    """Write a temp file and rename it over the policy (VS Code, sed -i, kubectl cp)."""
    temp = folder / f".{POLICY_FILE}.tmp{os.getpid()}"
    temp.write_text(text)
    os.replace(temp, folder / POLICY_FILE)


def write_like_vim(folder: Path, text: str) -> None:
    """Rename the original to a backup, then write a new file (vim with backupcopy=no)."""
    os.replace(folder / POLICY_FILE, folder / f"{POLICY_FILE}~")
    (folder / POLICY_FILE).write_text(text)
    (folder / f"{POLICY_FILE}~").unlink()


async def frames_until(
    client: Client, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Every frame the client receives, in order, up to and including the one ``done`` picks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    frames: list[dict[str, Any]] = []
    while not frames or not done(frames[-1]):
        frames.append(await client.recv(max(0.01, deadline - loop.time())))
    return frames


async def test_rewrites_that_still_allow_lose_and_repeat_no_message(
    connect_client: Any, gateway: Gateway, policies_dir: Path, exchange_prefix: str
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    assert (await alice.request("subscribe", channel="chat.steady"))["type"] == "ack"
    base = (policies_dir / POLICY_FILE).read_text()
    news = f"{exchange_prefix}.news"
    variants = [
        (write_in_place, base + rule("extra.{x}", news, "[anyone]", "[nobody]")),
        (write_by_rename, base + rule("extra.{x}", news, "[role:member]", "[nobody]")),
        (write_like_vim, base + rule("more.{x}.{y}", news, "[anyone]", "[role:admin]")),
    ]
    first_digest = gateway.reloader.live_digest
    rewritten = asyncio.Event()
    sent_at_reload: list[int] = []
    sent = 0

    async def publish_steadily() -> None:
        nonlocal sent
        # ~50 per second (inside the default per-connection frame limit), until
        # the rewrites are done and at least 200 went out.
        while sent < 200 or not rewritten.is_set():
            await bob.send(type="publish", channel="chat.steady", data=sent, id=sent)
            sent += 1
            await asyncio.sleep(0.02)

    async def rewrite() -> None:
        for write, text in variants:
            await until(lambda: sent >= 20 + 60 * len(sent_at_reload), "publishing to go on")
            write(policies_dir, text)
            expected = digest_of(text)
            await until(lambda: gateway.reloader.live_digest == expected, "the reload")  # noqa: B023
            sent_at_reload.append(sent)
        rewritten.set()

    await asyncio.gather(publish_steadily(), rewrite())
    assert len(sent_at_reload) == 3 and all(0 < n < sent for n in sent_at_reload)
    assert gateway.reloader.live_digest != first_digest
    assert gateway.reloader.reloads_failed == 0, gateway.reloader.last_error

    await bob.send(type="publish", channel="chat.steady", data="end", id="end")
    frames = await frames_until(alice, lambda f: f.get("data") == "end", timeout=20)
    assert [f for f in frames if f["type"] != "message"] == [], "alice got something else"
    assert [f["data"] for f in frames] == [*range(sent), "end"]
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs))
    # Every publish was acked: bob's permission never lapsed either.
    acks = [await bob.recv() for _ in range(sent + 1)]
    assert sorted((f["type"], str(f["id"])) for f in acks) == sorted(
        [("ack", str(i)) for i in range(sent)] + [("ack", "end")]
    )


async def test_an_invalid_file_keeps_the_last_good_set(
    connect_client: Any, gateway: Gateway, policies_dir: Path, exchange_prefix: str
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.kept")
    reloader = gateway.reloader
    before = reloader.live_digest
    good = (policies_dir / POLICY_FILE).read_text()
    bad = rules_first(good, rule("chat.{room}", "x", "[role: admin]", "[anyone]"))
    bad_line = bad.splitlines().index("    subscribe: [role: admin]") + 1
    write_by_rename(policies_dir, bad)

    await until(lambda: reloader.reloads_failed == 1, "the refused reload")
    assert reloader.live_digest == before
    assert reloader.last_error is not None
    where = f"{policies_dir / POLICY_FILE}:{bad_line}: rule 1 (chat.{{room}}): field 'subscribe'"
    assert where in reloader.last_error
    # The old rules still decide: a new subscribe is allowed, the old one delivers.
    assert (await alice.request("subscribe", channel="chat.new"))["type"] == "ack"
    assert (await bob.request("publish", channel="chat.kept", data=1))["type"] == "ack"
    assert (await bob.request("publish", channel="chat.new", data=2))["type"] == "ack"
    got = await alice.messages_until(2)
    assert sorted((m["channel"], m["data"]) for m in got) == [("chat.kept", 1), ("chat.new", 2)]
    assert alice.other == []

    # Fixing the file clears the error.
    fixed = good + rule("fixed.{x}", f"{exchange_prefix}.news", "[anyone]", "[nobody]")
    write_in_place(policies_dir, fixed)
    await until(lambda: reloader.live_digest == digest_of(fixed), "the fixed set")
    assert reloader.last_error is None and reloader.reloads_ok >= 1


async def test_a_revoked_subscription_ends_with_forbidden_and_nothing_after(
    connect_client: Any,
    gateway: Gateway,
    policies_dir: Path,
    exchange_prefix: str,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    assert (await alice.request("subscribe", channel="chat.secret"))["type"] == "ack"
    assert (await alice.request("subscribe", channel="chat.open"))["type"] == "ack"
    assert (await bob.request("publish", channel="chat.secret", data="before"))["type"] == "ack"
    assert (await alice.next_message())["data"] == "before"

    chat = f"{exchange_prefix}.chat"
    revoked = rules_first(
        (policies_dir / POLICY_FILE).read_text(),
        # chat.open stays readable on the same exchange; other rooms need role:admin now.
        rule("chat.open", chat, "[anyone]", "[role:member]"),
        rule("chat.{room}", chat, "[role:admin]", "[role:member]"),
    )
    write_in_place(policies_dir, revoked)

    frames = await frames_until(alice, lambda f: f["type"] == "error")
    assert frames[:-1] == []
    error = frames[-1]
    assert error["code"] == "forbidden" and error["channel"] == "chat.secret"
    assert "id" not in error or error["id"] is None
    assert gateway.reloader.live_digest == digest_of(revoked)

    # Published after the revocation, by a client and by a backend, each followed
    # (in the same exchange's stream, so in order) by a message alice may read.
    assert (await bob.request("publish", channel="chat.secret", data="after"))["type"] == "ack"
    assert (await bob.request("publish", channel="chat.open", data="bob-done"))["type"] == "ack"
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(chat)
    await exchange.publish(aio_pika.Message(b'"backend-after"', app_id="svc"), "chat.secret")
    await exchange.publish(aio_pika.Message(b'"backend-done"', app_id="svc"), "chat.open")

    frames = await frames_until(alice, lambda f: f.get("data") == "backend-done")
    assert [(f["type"], f["channel"], f["data"]) for f in frames] == [
        ("message", "chat.open", "bob-done"),
        ("message", "chat.open", "backend-done"),
    ]
    # And the channel cannot be subscribed again.
    answer = await alice.request("subscribe", channel="chat.secret")
    assert (answer["type"], answer["code"]) == ("error", "forbidden")


@pytest.fixture
async def unwatched(settings: Settings, gateway: Gateway) -> AsyncIterator[Gateway]:
    """A second gateway on the same folder that does not watch it."""
    gw = Gateway(
        dataclasses.replace(settings, policy_watch=False), load_policy_set(settings.policies_dir)
    )
    await gw.start()
    yield gw
    await gw.stop()


async def test_reload_picks_up_a_change_when_watching_is_disabled(
    connect_client: Any,
    unwatched: Gateway,
    gateway: Gateway,
    policies_dir: Path,
    exchange_prefix: str,
) -> None:
    alice = await connect_client("alice", gw=unwatched)
    assert (await alice.request("subscribe", channel="chat.hup"))["type"] == "ack"
    before = unwatched.reloader.live_digest
    chat = f"{exchange_prefix}.chat"
    revoked = rules_first(
        (policies_dir / POLICY_FILE).read_text(), rule("chat.{room}", chat, "[nobody]", "[nobody]")
    )
    write_in_place(policies_dir, revoked)
    # The watching gateway on the same folder sees it; the other must not.
    await until(lambda: gateway.reloader.live_digest == digest_of(revoked), "the watcher")
    assert unwatched.reloader.live_digest == before and unwatched.reloader.reloads_ok == 0

    assert await unwatched.reloader.reload("SIGHUP") is True
    assert unwatched.reloader.live_digest == digest_of(revoked)
    assert unwatched.reloader.reloads_ok == 1 and unwatched.reloader.last_error is None
    error = await alice.recv()
    assert (error["type"], error["code"], error["channel"]) == ("error", "forbidden", "chat.hup")


async def test_sighup_reloads_a_running_rabbitgate_process(
    settings: Settings,
    tmp_path: Path,
    policies_dir: Path,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    cleanup_broker: None,
    monkeypatch: pytest.MonkeyPatch,
    exchange_prefix: str,
) -> None:
    monkeypatch.setenv("RABBITGATE_POLICY_WATCH", "false")  # only the signal may reload
    process = GatewayProcess(settings, tmp_path).start()
    try:
        headers = {"Authorization": f"Bearer {make_token('alice')}"}
        async with connect(
            f"wss://localhost:{process.port}/ws", ssl=client_ssl, additional_headers=headers
        ) as ws:
            assert orjson.loads(await ws.recv())["type"] == "welcome"
            await ws.send(
                orjson.dumps({"type": "subscribe", "id": 1, "channel": "chat.hup"}).decode()
            )
            answer = orjson.loads(await ws.recv())
            assert answer["type"] == "ack", answer
            write_in_place(
                policies_dir,
                rules_first(
                    (policies_dir / POLICY_FILE).read_text(),
                    rule("chat.{room}", f"{exchange_prefix}.chat", "[nobody]", "[nobody]"),
                ),
            )
            process.signal(signal.SIGHUP)
            error = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (error["type"], error["code"], error["channel"]) == (
                "error",
                "forbidden",
                "chat.hup",
            )
        assert "policy reload (SIGHUP)" in process.log.read_text()
    finally:
        process.stop()


async def test_a_reload_during_a_subscribe_in_flight_still_revokes_it(
    connect_client: Any, gateway: Gateway, policies_dir: Path, exchange_prefix: str
) -> None:
    alice = await connect_client("alice")
    bob = await connect_client("bob")
    assert (await bob.request("publish", channel="chat.race", data="old"))["type"] == "ack"
    text = rules_first(
        (policies_dir / POLICY_FILE).read_text(),
        rule("chat.race", f"{exchange_prefix}.chat", "[role:admin]", "[role:member]"),
    )
    (policies_dir.parent / "revoked").mkdir()
    (policies_dir.parent / "revoked" / POLICY_FILE).write_text(text)
    revoked = load_policy_set(policies_dir.parent / "revoked")
    # `since` makes the subscribe wait on the broker (a history read); hold that
    # read until the swap is done, so the race is hit every time.
    broker = gateway.node.broker
    read_history = broker.replay
    swapped = asyncio.Event()

    async def replay_after_swap(*args: Any, **kwargs: Any) -> Any:
        await swapped.wait()
        return await read_history(*args, **kwargs)

    broker.replay = replay_after_swap  # type: ignore[method-assign]
    await alice.send(type="subscribe", id="s", channel="chat.race", since=0)
    try:
        await until(lambda: any(s._joining for s in gateway.node.sessions), "subscribe in flight")
        await gateway.node.swap_policies(revoked)
    finally:
        swapped.set()  # (also when failing: a held read would stall the gateway's stop)
    answer = await alice.recv()
    assert (answer["type"], answer.get("code")) == ("error", "forbidden"), answer
    assert (await bob.request("publish", channel="chat.race", data="after"))["type"] == "ack"
    assert (await alice.request("ping"))["type"] == "pong"
    assert alice.messages == [], "a revoked subscription still received a message"

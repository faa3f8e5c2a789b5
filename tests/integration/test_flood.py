"""One flooding client among many well-behaved ones: the flooder is throttled
and then closed with 4429; nothing a well-behaved client published is lost or
duplicated (bench/flood.py measures the same with latencies)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.app import Gateway

pytestmark = pytest.mark.integration

WELL_BEHAVED = 20
MESSAGES_EACH = 15

POLICY = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [anyone]
    publish: [anyone]
    limits: {{publish: "10/second", burst: 20, max_bytes: 4096}}
"""


@pytest.fixture
def policies_dir(tmp_path: Path, exchange_prefix: str) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "10-flood.yaml").write_text(POLICY.format(p=exchange_prefix))
    return folder


async def behave(client: Any, name: str) -> list[dict[str, Any]]:
    """Publish at 6-7 a second, below the rule's 10/s, each with an id; return the answers."""
    answers = []
    for n in range(MESSAGES_EACH):
        answer = await client.request("publish", channel="chat.room", data={"n": n, "by": name})
        answers.append(answer)
        await asyncio.sleep(0.15)
    return answers


async def flood(client: Any) -> tuple[list[dict[str, Any]], int | None]:
    """Publish as fast as the socket takes it while reading every answer, until closed."""
    answers: list[dict[str, Any]] = []

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                answers.append(orjson.loads(await client.ws.recv()))

    reader = asyncio.create_task(read())
    with contextlib.suppress(ConnectionClosed):
        for i in range(5000):
            await client.send(type="publish", id=f"f{i}", channel="chat.room", data={"f": i})
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the reader run
    await asyncio.wait_for(reader, 10)
    return answers, client.ws.close_code


async def test_a_flooder_is_throttled_and_closed_and_nothing_of_the_others_is_lost(
    gateway: Gateway, connect_client: Any
) -> None:
    events: list[Any] = []
    gateway.node.events.subscribe(events.append)
    reader = await connect_client("reader")
    assert (await reader.request("subscribe", channel="chat.room"))["type"] == "ack"
    clients = [await connect_client(f"good{i}") for i in range(WELL_BEHAVED)]
    flooder = await connect_client("flooder")

    good = [asyncio.create_task(behave(c, f"good{i}")) for i, c in enumerate(clients)]
    await asyncio.sleep(0.3)  # the flood starts while everyone is publishing
    flood_answers, close_code = await flood(flooder)
    results = await asyncio.gather(*good)

    # The flooder: its burst admitted, then rate_limited with retry_after, then 4429.
    assert close_code == 4429
    flooder_acks = {a["id"] for a in flood_answers if a["type"] == "ack"}
    limited = [a for a in flood_answers if a.get("code") == "rate_limited"]
    assert 20 <= len(flooder_acks) <= 25  # the burst, and what refilled meanwhile
    assert len(limited) == 10 and all(a["retry_after"] > 0 for a in limited)
    assert not [a for a in flood_answers if a["type"] == "error" and a not in limited]

    # The well-behaved: every publish acked, none rate limited.
    for answers in results:
        assert [a["type"] for a in answers] == ["ack"] * MESSAGES_EACH
    assert not [e for e in events if e.kind == "rate_limited" and e.user != "flooder"]

    # The reader receives each acked message exactly once, the flooder's included.
    expected = WELL_BEHAVED * MESSAGES_EACH + len(flooder_acks)
    got = await reader.messages_until(expected, timeout=20)
    seen = Counter(
        (m["from"], m["data"].get("n"), m["data"].get("f")) for m in got if m["from"] != "reader"
    )
    for i in range(WELL_BEHAVED):
        for n in range(MESSAGES_EACH):
            assert seen[(f"good{i}", n, None)] == 1
    assert sum(count for (sender, _, _), count in seen.items() if sender == "flooder") == len(
        flooder_acks
    )
    assert max(seen.values()) == 1
    with pytest.raises(TimeoutError):  # and nothing more: no refused publish got through
        await reader.next_message(timeout=0.5)

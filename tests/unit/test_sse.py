"""The SSE wire side, no network: event ids, event text, the bounded buffer."""

from __future__ import annotations

import asyncio
import base64
import zlib

import orjson
import pytest

from gateway.transports.sse import (
    MAX_EVENT_ID_CHARS,
    EventIds,
    SseOutbox,
    format_event,
)


def test_an_event_id_is_unpadded_base64url_of_the_positions_in_channel_order() -> None:
    channels = ["chat.a", "news.b-c_d", "chat.quiet"]
    event_id = EventIds(channels).encode({"news.b-c_d": 0, "chat.a": 12})
    assert "=" not in event_id and "+" not in event_id and "/" not in event_id
    padded = event_id + "=" * (-len(event_id) % 4)
    fingerprint = zlib.crc32(b"chat.a\nnews.b-c_d\nchat.quiet")
    assert orjson.loads(base64.urlsafe_b64decode(padded)) == [fingerprint, 12, 0, None]
    assert EventIds(channels).decode(event_id) == {"chat.a": 12, "news.b-c_d": 0}
    # The same number of channels, other names or another order: not this stream's.
    assert EventIds(["chat.a", "news.b-c_d", "chat.other"]).decode(event_id) is None
    assert EventIds(["news.b-c_d", "chat.a", "chat.quiet"]).decode(event_id) is None


def test_an_event_id_stays_small_with_many_long_channel_names() -> None:
    """The names come from the URL, not the id: 100 channels of 200 bytes fit a header."""
    channels = [f"tenant{i:03d}." + "x" * 190 for i in range(100)]
    positions = {channel: 10**12 + i for i, channel in enumerate(channels)}
    event_id = EventIds(channels).encode(positions)
    assert len(event_id) < 2 * 1024
    assert EventIds(channels).decode(event_id) == positions


def test_an_event_id_of_the_first_form_is_still_read() -> None:
    """Ids issued before the channel names left them: ``{"channel": seq}``."""
    old = _b64(b'{"chat.a": 12, "news.b": 3}')
    assert EventIds(["chat.a", "news.b"]).decode(old) == {"chat.a": 12, "news.b": 3}


OURS = zlib.crc32(b"chat.a\nchat.b")  # the fingerprint of the stream below


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "not base64 !",
        _b64(b"not json"),
        _b64(b'"chat.a"'),  # neither a list nor an object
        _b64(b"[1, 2, 3]"),  # no fingerprint of chat.a + chat.b
        _b64(f"[{OURS}, 1]".encode()),  # one position: a stream of one channel
        _b64(f"[{OURS}, 1, 2, 3]".encode()),
        _b64(f"[{OURS}, 1, -1]".encode()),
        _b64(f"[{OURS}, 1, 1.5]".encode()),
        _b64(f"[{OURS}, true, 1]".encode()),
        _b64(f'[{OURS}, "7", 1]'.encode()),
        _b64(b'{"chat.#": 1}'),  # an AMQP wildcard is no channel
        _b64(b'{"chat.a": -1}'),
        _b64(b'{"chat.a": 1.5}'),
        _b64(b'{"chat.a": true}'),
        _b64(b'{"chat.a": "7"}'),
        "A" * (MAX_EVENT_ID_CHARS + 1),
    ],
)
def test_an_id_that_is_not_ours_decodes_to_none(text: str | None) -> None:
    assert EventIds(["chat.a", "chat.b"]).decode(text) is None


def test_an_event_has_its_name_id_and_one_data_line() -> None:
    frame = orjson.dumps({"type": "message", "data": "two\nlines"})
    text = format_event("message", frame, "abc")
    assert text == b"event: message\nid: abc\ndata: " + frame + b"\n\n"
    assert text.count(b"\n") == 4  # orjson escapes the newline inside the JSON
    assert format_event("recovery", b"{}") == b"event: recovery\ndata: {}\n\n"


async def test_the_outbox_hands_over_frames_in_order_and_heartbeats_on_timeout() -> None:
    outbox = SseOutbox(max_bytes=1000, max_messages=10)
    assert await outbox.take(0.01) == []
    assert outbox.send(b"one") and outbox.send(b"two")
    assert outbox.pending() == (6, 2)
    assert await outbox.take(1) == [b"one", b"two"]
    assert outbox.pending() == (0, 0)


async def test_the_outbox_wakes_a_waiting_writer() -> None:
    outbox = SseOutbox(max_bytes=1000, max_messages=10)
    waiting = asyncio.ensure_future(outbox.take(5))
    await asyncio.sleep(0)
    outbox.send(b"x")
    assert await asyncio.wait_for(waiting, 1) == [b"x"]


@pytest.mark.parametrize(("max_bytes", "max_messages", "sent"), [(10, 100, 2), (1000, 3, 3)])
async def test_the_outbox_overflows_once_past_either_limit(
    max_bytes: int, max_messages: int, sent: int
) -> None:
    overflows: list[bool] = []
    outbox = SseOutbox(
        max_bytes=max_bytes, max_messages=max_messages, on_overflow=lambda: overflows.append(True)
    )
    results = [outbox.send(b"12345") for _ in range(6)]
    assert results == [True] * sent + [False] * (6 - sent)
    assert overflows == [True] and outbox.overflowed
    assert await outbox.take(1) is None  # the writer stops: the stream is dropped


async def test_a_closed_outbox_delivers_what_it_holds_then_ends() -> None:
    outbox = SseOutbox(max_bytes=1000, max_messages=10)
    outbox.send(b"last")
    outbox.close()
    assert not outbox.send(b"late")
    assert await outbox.take(1) == [b"last"]
    assert await outbox.take(1) is None

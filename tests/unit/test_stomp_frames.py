"""The STOMP frame codec: tables of frames, then hypothesis (round trips, and
no input makes it do anything but return frames or raise StompError)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.transports.stomp.frames import (
    HEARTBEAT,
    Frame,
    FrameParser,
    FrameTooLarge,
    StompError,
    escape,
    serialize,
    unescape,
)

PARSED = [
    # (version, bytes, frames)
    (
        "1.2",
        b"SEND\ndestination:/topic/a\n\nhi\0",
        [Frame("SEND", (("destination", "/topic/a"),), b"hi")],
    ),
    (
        "1.2",
        b"SEND\r\ndestination:/topic/a\r\n\r\nhi\0",
        [Frame("SEND", (("destination", "/topic/a"),), b"hi")],
    ),
    ("1.2", b"DISCONNECT\n\n\0", [Frame("DISCONNECT")]),
    (
        "1.2",
        b"SEND\ncontent-length:3\n\na\0b\0",
        [Frame("SEND", (("content-length", "3"),), b"a\0b")],
    ),
    ("1.2", b"SEND\ncontent-length:0\n\n\0", [Frame("SEND", (("content-length", "0"),), b"")]),
    # Header escapes of 1.2, and the first of repeated headers wins.
    ("1.2", b"SEND\na\\cb:x\\ny\\r\\\\\n\n\0", [Frame("SEND", (("a:b", "x\ny\r\\"),))]),
    ("1.2", b"SEND\nk:1\nk:2\n\n\0", [Frame("SEND", (("k", "1"), ("k", "2")))]),
    # A value may hold a colon; only the first one splits.
    ("1.2", b"SEND\nk:a:b\n\n\0", [Frame("SEND", (("k", "a:b"),))]),
    # CONNECT is never unescaped: a backslash in a passcode stays.
    ("1.2", b"CONNECT\npasscode:a\\b\n\n\0", [Frame("CONNECT", (("passcode", "a\\b"),))]),
    # 1.0 has no escaping at all.
    ("1.0", b"SEND\nk:a\\tb\n\n\0", [Frame("SEND", (("k", "a\\tb"),))]),
    ("1.1", b"SEND\nk:a\\nb\n\n\0", [Frame("SEND", (("k", "a\nb"),))]),
    # Heart-beats between and before frames: one event per run of EOLs.
    ("1.2", b"\n", [HEARTBEAT]),
    ("1.2", b"\r\n\n\r\n", [HEARTBEAT]),
    ("1.2", b"\nDISCONNECT\n\n\0\n\n", [HEARTBEAT, Frame("DISCONNECT"), HEARTBEAT]),
    ("1.2", b"DISCONNECT\n\n\0DISCONNECT\n\n\0", [Frame("DISCONNECT"), Frame("DISCONNECT")]),
    ("1.2", b"SEND\nk:caf\xc3\xa9\n\n\0", [Frame("SEND", (("k", "café"),))]),
]


@pytest.mark.parametrize(("version", "data", "frames"), PARSED)
def test_parse(version: str, data: bytes, frames: list[object]) -> None:
    assert FrameParser(version=version).feed(data) == frames


REFUSED = [
    (b"HELLO\n\n\0", "unknown command"),
    (b"send\n\n\0", "unknown command"),
    (b"MESSAGE\n\n\0", "unknown command"),  # a server frame
    (b"SEND\nno colon here\n\n\0", "without ':'"),
    (b"SEND\n:empty name\n\n\0", "empty name"),
    (b"SEND\nk:a\\tb\n\n\0", "undefined escape"),
    (b"SEND\nk:a\\\n\n\0", "undefined escape"),
    (b"SEND\nk:a\0b\n\n\0", "NUL"),
    (b"SEND\nk:v\0", "NUL"),
    (b"SEND\ncontent-length:x\n\n\0", "content-length"),
    (b"SEND\ncontent-length:-1\n\n\0", "content-length"),
    (b"SEND\ncontent-length:1\n\nab\0", "longer than its content-length"),
    (b"SEND\nk:\xff\n\n\0", "UTF-8"),
]


@pytest.mark.parametrize(("data", "why"), REFUSED)
def test_refused(data: bytes, why: str) -> None:
    with pytest.raises(StompError, match=why):
        FrameParser().feed(data)


def test_1_1_has_no_carriage_return_escape() -> None:
    with pytest.raises(StompError, match="undefined escape"):
        FrameParser(version="1.1").feed(b"SEND\nk:\\r\n\n\0")


def test_a_frame_may_span_messages() -> None:
    parser = FrameParser()
    assert parser.feed(b"SEND\ndesti") == []
    assert parser.feed(b"nation:/topic/a\n") == []
    assert parser.feed(b"\nbo") == []
    assert parser.buffered == len(b"SEND\ndestination:/topic/a\n\nbo")
    assert parser.feed(b"dy\0\n") == [
        Frame("SEND", (("destination", "/topic/a"),), b"body"),
        HEARTBEAT,
    ]
    assert parser.buffered == 0


def test_content_length_frame_may_span_messages() -> None:
    parser = FrameParser()
    assert parser.feed(b"SEND\ncontent-length:4\n\na\0") == []
    assert parser.feed(b"b\0\0") == [Frame("SEND", (("content-length", "4"),), b"a\0b\0")]


LIMITS = [
    # (parser, data, what)
    (FrameParser(max_frame_bytes=100), b"SEND\n\n" + b"x" * 200, "larger than 100"),
    (FrameParser(max_frame_bytes=100), b"SEND\n\n" + b"x" * 100 + b"\0", "larger than 100"),
    (FrameParser(max_frame_bytes=100), b"SEND\ncontent-length:500\n\n", "larger than 100"),
    (FrameParser(max_frame_bytes=100), b"SEND\n" + b"k" * 200, "larger than 100"),
    (FrameParser(max_headers=3), b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0", "more than 3 headers"),
    (
        FrameParser(max_header_line_bytes=10),
        b"SEND\nkey:" + b"v" * 10 + b"\n\n\0",
        "longer than 10",
    ),
]


@pytest.mark.parametrize(("parser", "data", "why"), LIMITS)
def test_limits(parser: FrameParser, data: bytes, why: str) -> None:
    with pytest.raises(FrameTooLarge, match=why):
        parser.feed(data)


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    data = b"SEND\n\n" + b"x" * 93 + b"\0"
    assert len(data) == 100
    assert FrameParser(max_frame_bytes=100).feed(data) == [Frame("SEND", (), b"x" * 93)]


def test_an_incomplete_frame_under_the_limit_waits() -> None:
    parser = FrameParser(max_frame_bytes=100)
    assert parser.feed(b"SEND\n\n" + b"x" * 50) == []


SERIALIZED = [
    (("RECEIPT", [("receipt-id", "r1")], b""), "1.2", b"RECEIPT\nreceipt-id:r1\n\n\0"),
    (
        ("ERROR", [("message", "a:b")], b"why"),
        "1.2",
        b"ERROR\nmessage:a\\cb\ncontent-length:3\n\nwhy\0",
    ),
    (
        ("MESSAGE", [("k", "a\nb\r\\")], b""),
        "1.2",
        b"MESSAGE\nk:a\\nb\\r\\\\\ncontent-length:0\n\n\0",
    ),
    (("MESSAGE", [("k", "a\nb\r")], b""), "1.1", b"MESSAGE\nk:a\\nb \ncontent-length:0\n\n\0"),
    (("MESSAGE", [("k", "a:b\nc")], b""), "1.0", b"MESSAGE\nk:a:b c\ncontent-length:0\n\n\0"),
    # CONNECTED is not escaped, but never lets a value end a line either.
    (("CONNECTED", [("session", "a:b\nc")], b""), "1.2", b"CONNECTED\nsession:a:b c\n\n\0"),
]


@pytest.mark.parametrize(("args", "version", "data"), SERIALIZED)
def test_serialize(
    args: tuple[str, list[tuple[str, str]], bytes], version: str, data: bytes
) -> None:
    command, headers, body = args
    assert serialize(command, headers, body, version=version) == data


# --- hypothesis -----------------------------------------------------------------

header_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    max_size=30,
)
header_name = header_text.filter(bool)
commands = st.sampled_from(["SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "DISCONNECT", "BEGIN"])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    command=commands,
    headers=st.lists(st.tuples(header_name, header_text), max_size=8),
    body=st.binary(max_size=200),
    version=st.sampled_from(["1.1", "1.2"]),
)
def test_what_serialize_writes_parses_back(
    command: str, headers: list[tuple[str, str]], body: bytes, version: str
) -> None:
    data = serialize(command, headers, body, version=version)
    if version == "1.1":
        headers = [(k.replace("\r", " "), v.replace("\r", " ")) for k, v in headers]
    (frame,) = FrameParser(version=version).feed(data)
    assert frame.command == command
    assert frame.body == body
    expected = list(headers) + ([("content-length", str(len(body)))] if body else [])
    assert list(frame.headers) == expected


@FUZZ
@given(text=header_text, version=st.sampled_from(["1.1", "1.2"]))
def test_escape_round_trips(text: str, version: str) -> None:
    expected = text.replace("\r", " ") if version == "1.1" else text
    assert unescape(escape(text, version), version) == expected
    assert "\n" not in escape(text, version) and ":" not in escape(text, version)


@FUZZ
@given(
    data=st.lists(st.binary(max_size=300), max_size=6),
    version=st.sampled_from(["1.0", "1.1", "1.2"]),
)
def test_any_bytes_give_frames_or_a_stomp_error(data: list[bytes], version: str) -> None:
    parser = FrameParser(version=version, max_frame_bytes=512, max_headers=8)
    try:
        for chunk in data:
            for event in parser.feed(chunk):
                assert event is HEARTBEAT or isinstance(event, Frame)
            assert parser.buffered <= 512
    except StompError:
        pass


@FUZZ
@given(
    frames=st.lists(
        st.tuples(
            commands,
            st.lists(st.tuples(header_name, header_text), max_size=4),
            st.binary(max_size=50),
        ),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_frames_split_anywhere_parse_the_same(
    frames: list[tuple[str, list[tuple[str, str]], bytes]], cuts: list[int]
) -> None:
    data = b"\n".join(serialize(c, h, b) for c, h, b in frames)
    whole = [e for e in FrameParser().feed(data) if e is not HEARTBEAT]
    parser = FrameParser()
    pieces = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    split = [e for piece in pieces for e in parser.feed(piece) if e is not HEARTBEAT]
    assert split == whole
    assert len(whole) == len(frames)

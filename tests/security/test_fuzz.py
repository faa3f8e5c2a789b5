"""Bounded fuzzing (hypothesis) of what a hostile client controls: frames
(gateway/protocol/frames.py) and the parts of an SSE request the gateway reads
(token, channels, Last-Event-ID). The only answer to bad input is the
contract's error (FrameError, AuthError, None), never another exception.

Bounded for CI: a fixed number of examples per property, no deadline (the
machine is shared), well under a minute in all.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.auth.tokens import AuthError
from gateway.protocol.frames import (
    DEFAULT_MAX_DATA_DEPTH,
    FrameError,
    Publish,
    nested_deeper_than,
    parse_frame,
)
from gateway.transports.sse import EventIds
from gateway.transports.sse_server import _credentials, _since

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["publish", "subscribe", "unsubscribe", "ping", "auth", "x"])
        | json_values,
        "id": json_values,
        "channel": st.sampled_from(["chat.a", "a..b", "#", "x" * 201]) | json_values,
        "since": json_values,
        "data": json_values,
        "token": json_values,
    },
)


def check_parse(text: str | bytes) -> None:
    try:
        frame = parse_frame(text)
    except FrameError as exc:
        assert exc.code == "bad_request" and exc.message
        return
    if isinstance(frame, Publish):
        # What is published can be framed for delivery: JSON, within the depth.
        data = orjson.loads(frame.body)
        assert not nested_deeper_than(data, DEFAULT_MAX_DATA_DEPTH)
        orjson.dumps({"type": "message", "data": data})


@BOUNDED
@given(fields)
def test_fuzz_parse_frame_structured(obj: dict[str, Any]) -> None:
    check_parse(json.dumps(obj))


@BOUNDED
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_fuzz_parse_frame_raw(text: str | bytes) -> None:
    check_parse(text)


@BOUNDED
@given(st.integers(min_value=0, max_value=400), st.sampled_from(["[", '{"a":']))
def test_fuzz_parse_frame_nesting(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    check_parse(
        '{"type":"publish","channel":"c","data":' + opener * depth + "0" + closer * depth + "}"
    )


channels = st.lists(
    st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){0,2}", fullmatch=True),
    min_size=1,
    max_size=5,
    unique=True,
)


@BOUNDED
@given(st.text(max_size=200) | st.none(), channels)
def test_fuzz_last_event_id(last_event_id: str | None, names: list[str]) -> None:
    positions = _since(last_event_id, names)
    assert positions is None or set(positions) <= set(names)
    for seq in (positions or {}).values():
        assert seq is None or (type(seq) is int and seq >= 0)


@BOUNDED
@given(channels, st.lists(st.integers(min_value=0, max_value=2**53) | st.none(), max_size=5))
def test_fuzz_event_ids_round_trip(names: list[str], seqs: list[int | None]) -> None:
    ids = EventIds(names)
    positions = {c: s for c, s in zip(names, seqs, strict=False) if s is not None}
    assert ids.decode(ids.encode(positions)) == positions


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@BOUNDED
@given(
    st.lists(st.tuples(st.sampled_from(["Authorization", "Origin", "X"]), header_text), max_size=4),
    st.lists(st.tuples(st.sampled_from(["access_token", "channel"]), header_text), max_size=4),
)
def test_fuzz_sse_token(headers: list[tuple[str, str]], query: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    request = make_mocked_request(
        "GET", "/events?" + urlencode(query), headers=CIMultiDict(headers)
    )
    token = _credentials(request)
    if isinstance(token, AuthError):
        return
    assert token and token == token.strip()


@pytest.mark.parametrize("depth", [0, 32, 33, 254, 255, 1024, 1025])
def test_depths_at_the_edges(depth: int) -> None:
    check_parse('{"type":"publish","channel":"c","data":' + "[" * depth + "]" * depth + "}")

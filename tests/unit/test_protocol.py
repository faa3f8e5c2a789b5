from __future__ import annotations

import orjson
import pytest

from gateway.protocol.channels import is_valid_channel
from gateway.protocol.frames import (
    Auth,
    FrameError,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    data_from_body,
    error_frame,
    message_frame,
    parse_frame,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"subscribe","id":1,"channel":"chat.a"}', Subscribe(1, "chat.a", None)),
        ('{"type":"subscribe","id":"x","channel":"a","since":0}', Subscribe("x", "a", 0)),
        ('{"type":"unsubscribe","id":2,"channel":"a.b-c_d"}', Unsubscribe(2, "a.b-c_d")),
        ('{"type":"publish","channel":"a","data":{"k":[1,2]}}', Publish(None, "a", b'{"k":[1,2]}')),
        ('{"type":"publish","id":3,"channel":"a","data":null}', Publish(3, "a", b"null")),
        ('{"type":"ping","id":"p"}', Ping("p")),
        ('{"type":"auth","token":"t"}', Auth("t", None)),
    ],
)
def test_good_frames_parse(text: str, expected: object) -> None:
    assert parse_frame(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nope",
        "[]",
        "null",
        '{"type":null}',
        '{"type":"subscribe","id":1.5,"channel":"a"}',
        '{"type":"subscribe","id":9007199254740993,"channel":"a"}',
        '{"type":"subscribe","id":false,"channel":"a"}',
        '{"type":"subscribe","id":1,"channel":"a","since":true}',
        '{"type":"subscribe","id":1,"channel":"a","since":1.5}',
        '{"type":"ping","id":[1]}',
        '{"type":"auth","token":""}',
        "[" * 5000,
    ],
)
def test_bad_frames_are_bad_requests(text: str) -> None:
    with pytest.raises(FrameError) as error:
        parse_frame(text)
    assert error.value.code == "bad_request"


def test_an_error_echoes_a_valid_id_even_when_the_type_is_unknown() -> None:
    with pytest.raises(FrameError) as error:
        parse_frame('{"type":"nuke","id":"abc"}')
    assert error.value.request_id == "abc"


def test_unknown_type_is_not_echoed_unbounded() -> None:
    with pytest.raises(FrameError) as error:
        parse_frame(orjson.dumps({"type": "x" * 10_000}))
    assert len(error.value.message) < 100


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("a", True),
        ("chat.room-1_x", True),
        ("a" * 200, True),
        ("a" * 201, False),
        ("", False),
        ("a..b", False),
        (".a", False),
        ("a.", False),
        ("a.*", False),
        ("a.#", False),
        ("a b", False),
        ("caf\u00e9", False),
        ("a\n", False),
        ("a/b", False),
        (5, False),
        (None, False),
    ],
)
def test_channel_names(name: object, valid: bool) -> None:
    assert is_valid_channel(name) is valid


def test_server_frames() -> None:
    assert orjson.loads(message_frame("c", 5, {"a": 1}, None, 7)) == {
        "type": "message",
        "channel": "c",
        "seq": 5,
        "data": {"a": 1},
        "from": None,
        "ts": 7,
    }
    assert orjson.loads(error_frame("rate_limited", "slow down", 1, retry_after=0.5)) == {
        "type": "error",
        "id": 1,
        "code": "rate_limited",
        "message": "slow down",
        "retry_after": 0.5,
    }


def test_backend_bodies() -> None:
    assert data_from_body(b'{"a":1}') == {"a": 1}
    assert data_from_body(b"hello") == "hello"
    with pytest.raises(ValueError):
        data_from_body(b"\xff\xfe")


def test_data_nesting_is_limited_before_serialization() -> None:
    from gateway.protocol.frames import nested_deeper_than

    assert not nested_deeper_than(0, 0)
    assert not nested_deeper_than([[{}]], 3) and nested_deeper_than([[{}]], 2)
    assert nested_deeper_than({"a": [1, {"b": [[]]}]}, 3)
    deep = "[" * 40 + "]" * 40
    with pytest.raises(FrameError) as refused:
        parse_frame('{"type":"publish","channel":"a","data":' + deep + "}", max_depth=39)
    assert refused.value.code == "bad_request"
    parsed = parse_frame('{"type":"publish","channel":"a","data":' + deep + "}", max_depth=40)
    assert isinstance(parsed, Publish)


def test_a_message_frame_that_cannot_be_serialized_raises_value_error() -> None:
    from gateway.protocol.frames import message_frame

    value: object = 0
    for _ in range(300):
        value = [value]
    with pytest.raises(ValueError):
        message_frame("a", 1, value, None, 0)

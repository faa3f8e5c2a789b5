import pytest
from websockets.frames import Frame, Opcode

from gateway.transports.outbox import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_pre_framed_text_is_what_websockets_would_write(size: int) -> None:
    payload = b'{"x":"' + b"a" * max(0, size - 8) + b'"}'
    payload = payload[:size] if size >= 8 else b"a" * size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert text_frame(payload) == expected

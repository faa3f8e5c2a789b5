"""The handshake request is not kept after it is parsed (gateway/transports/ws_adapter.py).

websockets' sans-I/O ServerProtocol, fed real bytes: a handshake request with a
bearer token, WebSocket frames in the same read and after the handshake.
"""

from __future__ import annotations

import base64
import gc
import os
import weakref

import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CLOSED, OPEN
from websockets.server import ServerProtocol

from gateway.transports.ws_adapter import forget_request_in_parser

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def handshake_bytes() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /ws HTTP/1.1\r\n"
        "Host: localhost\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        "\r\n"
    ).encode()


def client_frame(text: str) -> bytes:
    """A masked text frame, as a client sends it."""
    frame = Frame(Opcode.TEXT, text.encode())
    return frame.serialize(mask=True, extensions=[])


def received_request(protocol: ServerProtocol) -> tuple[weakref.ref[Request], list[str]]:
    """A weak reference to the parsed request, and the text of any frames that came with it."""
    events = protocol.events_received()
    request = events[0]
    assert isinstance(request, Request)
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    texts = [event.data.decode() for event in events[1:] if isinstance(event, Frame)]
    protocol.send_response(protocol.accept(request))
    assert protocol.state is OPEN
    return weakref.ref(request), texts


def texts_of(protocol: ServerProtocol) -> list[str]:
    return [e.data.decode() for e in protocol.events_received() if isinstance(e, Frame)]


def test_the_request_is_gone_once_the_handshake_is_answered() -> None:
    protocol = ServerProtocol()
    forget_request_in_parser(protocol)
    protocol.receive_data(handshake_bytes())
    request, _ = received_request(protocol)
    gc.collect()
    assert request() is None
    # The connection goes on parsing frames, split anyhow across reads.
    data = client_frame("first") + client_frame("second")
    protocol.receive_data(data[:3])
    protocol.receive_data(data[3:9])
    protocol.receive_data(data[9:])
    assert texts_of(protocol) == ["first", "second"]


def test_websockets_alone_keeps_the_request_in_its_parser() -> None:
    """What the swap is for: without it the request (and its token) lives on."""
    protocol = ServerProtocol()
    protocol.receive_data(handshake_bytes())
    request, _ = received_request(protocol)
    gc.collect()
    assert request() is not None


def test_frames_in_the_same_read_as_the_request_are_parsed() -> None:
    protocol = ServerProtocol()
    forget_request_in_parser(protocol)
    first, second = client_frame('{"type":"auth"}'), client_frame("two")
    protocol.receive_data(handshake_bytes() + first + second[:4])
    _, texts = received_request(protocol)
    assert texts == ['{"type":"auth"}']
    protocol.receive_data(second[4:])
    assert texts_of(protocol) == ["two"]


def test_a_close_and_the_end_of_the_stream_still_work() -> None:
    protocol = ServerProtocol()
    forget_request_in_parser(protocol)
    protocol.receive_data(handshake_bytes())
    received_request(protocol)
    close = Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(mask=True, extensions=[])
    protocol.receive_data(close)
    assert protocol.close_rcvd is not None and protocol.close_rcvd.code == 1000
    assert protocol.close_expected()  # the server now closes the TCP connection
    protocol.receive_eof()
    assert protocol.state is CLOSED


def test_only_a_fresh_server_protocol_is_accepted() -> None:
    class Custom(ServerProtocol):
        pass

    with pytest.raises(TypeError):
        forget_request_in_parser(Custom())

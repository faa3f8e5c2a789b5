"""What a websockets connection keeps of its opening handshake: nothing.

websockets keeps the handshake request and response for a connection's whole
life, in three places: ``connection.request``, ``connection.response`` and a
local variable of the protocol's parser (a generator that parses the request,
then goes on parsing frames in the same frame of execution). That is ~4 KiB
per connection (the headers, their dicts and lists) and the bearer token of
the Authorization header, held in memory long after it was verified.

``forget_request_in_parser`` makes the parser let go of the request as soon
as it is parsed; ``forget_handshake`` drops the other two references once
``process_request`` has read what it needed.
"""

from __future__ import annotations

from collections.abc import Generator
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import Protocol
from websockets.server import ServerProtocol

# What a connection's ``request`` and ``response`` are once its handler runs
# (shared, empty: websockets needs them not None, and nothing reads them).
_REQUEST_READ = Request("/", Headers())
_RESPONSE_SENT = Response(HTTPStatus.SWITCHING_PROTOCOLS, "Switching Protocols", Headers())


class _NewFrameParser(Protocol):
    """What ``ServerProtocol.parse`` delegates to once the request is parsed.

    Placed after ``ServerProtocol`` in the method resolution order, its
    ``parse`` is the ``super().parse()`` that websockets' request parser
    ends with (``yield from``), with the request still a local variable of
    the calling generator. Instead of parsing frames inside that generator,
    it starts websockets' own frame parser as a new generator and makes it
    *the* parser (websockets swaps parsers the same way, for ``discard``).
    The old generator is then unreferenced and closed once the call that
    drove it returns, and the request goes with it.

    Frames that arrived in the same read as the request are parsed at once,
    by the ``next`` below, exactly as the old parser would have done.
    """

    def parse(self) -> Generator[None]:
        self.parser = Protocol.parse(self)
        next(self.parser)  # start coroutine
        yield  # never resumed: the protocol drives the new parser now


class _RequestForgettingServerProtocol(ServerProtocol, _NewFrameParser):
    """``ServerProtocol`` whose ``super().parse()`` is ``_NewFrameParser.parse``."""


def forget_request_in_parser(protocol: ServerProtocol) -> None:
    """Make ``protocol`` (not started yet: no byte received) drop the request once parsed.

    A class swap rather than a constructor: websockets' asyncio server builds
    the ``ServerProtocol`` itself. The subclass adds no state, only the
    method resolution order above.
    """
    if type(protocol) is not ServerProtocol:
        raise TypeError(f"expected a websockets ServerProtocol, got {type(protocol).__name__}")
    protocol.__class__ = _RequestForgettingServerProtocol


def forget_handshake(connection: ServerConnection) -> None:
    """Drop the connection's handshake request and response (call after the handshake)."""
    connection.request, connection.response = _REQUEST_READ, _RESPONSE_SENT

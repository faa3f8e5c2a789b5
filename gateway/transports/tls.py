"""TLS on an accepted TCP connection: OpenSSL over memory BIOs, as an asyncio transport.

Hand-written rather than ``loop.start_tls`` for memory. uvloop's TLS
protocol (uvloop 0.23, ``sslproto.pyx``) mallocs a read buffer of
``SSL_READ_MAX_SIZE`` (256 KiB, compiled in) for every connection and reads
the socket into it, so every idle connection keeps at least the page its
last read touched, plus the protocol and its second transport object.
asyncio's own ``sslproto`` allocates a 256 KiB ``bytearray`` per connection,
worse. Here the socket is read by uvloop's plain TCP transport (into its one
loop-wide buffer), and what is per connection is OpenSSL's state, its two
memory BIOs and this object. Measured with a bare server holding 10,000 idle
TLS connections on this machine (RSS, 2026-12-03): 24.1 KiB per connection
through ``start_tls``, 18.0 KiB through this layer; OpenSSL's own share is
~16 KiB either way (docs/performance.md has the gateway's figures).

What it does, as uvloop's TLS protocol does it for the cases the gateway
has: the server side of the handshake within ``handshake_timeout``
(failure, timeout or more than ``MAX_HANDSHAKE_BYTES`` buffered: the TCP
connection is aborted and ``on_failure`` called, nothing reached the
application); then records decrypted into one buffer shared by every
connection (``data_received`` is never re-entered) and handed to the
application protocol, and every ``write`` encrypted at once into one
``write`` of the TCP transport (so the TCP transport's write buffer and its
flow control, ``pause_writing``/``resume_writing``, are the application's).
``close`` sends close_notify and closes the TCP connection once what it
holds is sent, without waiting for the peer's close_notify (RFC 8446 6.1
lets the closer go). A peer's close_notify is the application's
``eof_received``; a TCP end without it is the same (asyncio's ragged-EOF
rule).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

# What a peer may have sent and the handshake not consumed yet (a ClientHello
# is at most a few KiB; the rest is a peer sending ahead or flooding).
MAX_HANDSHAKE_BYTES = 256 * 1024
# One TLS record's plaintext is at most 16 KiB; a read takes one record.
_READ_BUFFER = bytearray(64 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)


class TlsLayer(asyncio.Protocol, asyncio.Transport):
    """The TCP transport's protocol, and the transport of ``app`` (its plaintext side).

    ``on_open(layer)`` is called once the handshake is done; it must make the
    application protocol ready (``connection_made(layer)``): the bytes that
    came with the handshake's last flight are handed to it right after.
    ``on_failure(layer)`` instead when the handshake fails, times out, or the
    connection is aborted or lost before it is done; the application never
    hears of the connection then.
    """

    __slots__ = (
        "_raw",
        "_app",
        "_incoming",
        "_outgoing",
        "_ssl",
        "_state",
        "_timer",
        "_on_open",
        "_on_failure",
    )

    def __init__(
        self,
        raw: asyncio.Transport,
        app: asyncio.Protocol,
        context: ssl.SSLContext,
        handshake_timeout: float,
        on_open: Callable[[TlsLayer], None],
        on_failure: Callable[[TlsLayer], None],
    ) -> None:
        self._raw: Any = raw
        self._app: Any = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._state = _HANDSHAKE
        self._on_open: Callable[[TlsLayer], None] | None = on_open
        self._on_failure: Callable[[TlsLayer], None] | None = on_failure
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            handshake_timeout, self._handshake_failed
        )
        # From now on the TCP transport's reads, EOF and loss come here.
        raw.set_protocol(self)

    # --- the TCP side ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._state >= _CLOSING:
            return
        self._incoming.write(data)
        if self._state == _HANDSHAKE:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._send_pending()
                if self._incoming.pending > MAX_HANDSHAKE_BYTES:
                    self._handshake_failed()
                return
            except (ssl.SSLError, OSError, ValueError):
                self._send_pending()  # the alert, when OpenSSL wrote one
                self._handshake_failed()
                return
            self._opened()
            if self._state != _OPEN:
                return
            # Application data may have come with the handshake's last flight
            # (a client's HTTP request right after its Finished): read it now.
        self._read()

    def _opened(self) -> None:
        self._state = _OPEN
        self._send_pending()  # the last flight (TLS 1.2) and the session tickets
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        on_open, self._on_open, self._on_failure = self._on_open, None, None
        if on_open is not None:
            on_open(self)

    def _read(self) -> None:
        received: list[bytes] = []
        ended = False
        try:
            while True:
                n = cast(int, self._ssl.read(len(_READ_BUFFER), _READ_BUFFER))
                if not n:
                    ended = True
                    break
                received.append(bytes(_READ_VIEW[:n]))
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            ended = True
        except (ssl.SSLError, OSError, ValueError):  # a bad record: nothing more is trusted
            self.abort()
            return
        # What reading wrote (a KeyUpdate's answer, a refused renegotiation's alert).
        self._send_pending()
        if received:
            self._app.data_received(received[0] if len(received) == 1 else b"".join(received))
        if ended and self._state == _OPEN:
            self.eof_received()

    def eof_received(self) -> bool:
        if self._state == _HANDSHAKE:
            self._handshake_failed()
        elif self._state == _OPEN:
            keep_open = self._app.eof_received()
            if not keep_open:
                self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if state == _HANDSHAKE:
            self._fail_handshake()
        else:
            app, self._app = self._app, None
            if app is not None:
                app.connection_lost(exc)
        # Nothing of OpenSSL's state is needed any more; free it now.
        self._ssl = self._incoming = self._outgoing = None  # type: ignore[assignment]

    def pause_writing(self) -> None:
        if self._state != _HANDSHAKE and self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._state != _HANDSHAKE and self._app is not None:
            self._app.resume_writing()

    def _send_pending(self) -> None:
        outgoing = self._outgoing
        if outgoing is not None and outgoing.pending:
            self._raw.write(outgoing.read())

    def _handshake_failed(self) -> None:
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        if self._timer is not None:
            # Cancelled, not left to fire: the loop's timer would keep this
            # layer (and OpenSSL's state) alive until the timeout.
            self._timer.cancel()
            self._timer = None
        self._raw.abort()
        self._fail_handshake()

    def _fail_handshake(self) -> None:
        on_failure, self._on_open, self._on_failure = self._on_failure, None, None
        self._app = None
        if on_failure is not None:
            on_failure(self)

    # --- the application's transport -----------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError, ValueError):
            self.abort()
            return
        self._raw.write(self._outgoing.read())

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify, not a half close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half close")

    def close(self) -> None:
        if self._state >= _CLOSING:
            return
        if self._state == _HANDSHAKE:
            self._handshake_failed()
            return
        self._state = _CLOSING
        try:
            self._ssl.unwrap()  # writes close_notify; the peer's answer is not awaited
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._send_pending()
        self._raw.close()  # once what it holds is sent

    def abort(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake_failed()
            return
        if self._state == _OPEN:
            self._state = _CLOSING
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._state != _OPEN or bool(self._raw.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._ssl.context if self._ssl is not None else default
        if name in ("peercert", "cipher", "compression"):
            if self._ssl is None:
                return default
            return self._ssl.getpeercert() if name == "peercert" else getattr(self._ssl, name)()
        return self._raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return bool(self._raw.is_reading())

    def get_write_buffer_size(self) -> int:
        return int(self._raw.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        limits: tuple[int, int] = self._raw.get_write_buffer_limits()
        return limits

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._app
        return protocol

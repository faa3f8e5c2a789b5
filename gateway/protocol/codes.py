"""Every close code and error code the gateway answers with, in one place.

The contract (``protocol.md``, "Close codes" and "Error codes") names them;
every transport maps them onto its wire: a WebSocket closes with the code
itself, an SSE stream ends with a ``gateway-error`` event (or an HTTP status
before the stream starts), STOMP sends an ``ERROR`` frame. The clients (clients/python, clients/js)
keep their own copy of the ones they read, on purpose: a client package
imports nothing of the server.
"""

from __future__ import annotations

from typing import Final, Literal

# --- close codes (WebSocket close frame; SSE/STOMP report them as errors) ----
CLOSE_NORMAL: Final = 1000
# Idle timeout: a normal closure, not 1001, which the contract keeps for
# "server shutting down, reconnect elsewhere"; an idle client that comes back
# later simply reconnects.
CLOSE_IDLE: Final = 1000
CLOSE_GOING_AWAY: Final = 1001  # server shutting down
CLOSE_PROTOCOL_ERROR: Final = 1002  # a STOMP frame that is not valid STOMP
CLOSE_POLICY: Final = 1008  # origin not allowed, too many connections, no channel left
CLOSE_TOO_BIG: Final = 1009  # a frame over max_frame_bytes (websockets sends it itself)
CLOSE_AUTH: Final = 4401  # token invalid, expired or refused on refresh
CLOSE_BANNED: Final = 4403  # the abuse protection banned the user or address
CLOSE_AUTH_TIMEOUT: Final = 4408  # no auth frame within auth_timeout_seconds
CLOSE_SLOW_CONSUMER: Final = 4409  # the send buffer overflowed
CLOSE_RATE_LIMITED: Final = 4429  # rate limits broken too often

# --- error codes (the ``code`` of an ``error`` frame) ------------------------
ErrorCode = Literal[
    "bad_request",  # malformed frame, unknown type, bad field
    "unauthorized",  # no or bad token, or a refresh refused
    "forbidden",  # the policies (or a cap) deny it
    "rate_limited",  # with retry_after seconds
    "too_large",  # data over the rule's max_bytes
    "unavailable",  # the broker did not take or confirm it; retry
    "internal",
]
BAD_REQUEST: Final = "bad_request"
UNAUTHORIZED: Final = "unauthorized"
FORBIDDEN: Final = "forbidden"
RATE_LIMITED: Final = "rate_limited"
TOO_LARGE: Final = "too_large"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"

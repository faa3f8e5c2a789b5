"""Channel names: the allowlist of section 5 of the wire contract.

A channel name doubles as the AMQP routing key, so anything that could act as
an AMQP wildcard (``*``, ``#``) or an empty word must never get through.
"""

from __future__ import annotations

import re

MAX_CHANNEL_BYTES = 200

_CHANNEL = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def is_valid_channel(name: object) -> bool:
    """True when ``name`` is 1..200 bytes of dot-separated ``[A-Za-z0-9_-]+`` segments."""
    # fullmatch on an ASCII-only pattern: its length in characters is its length in bytes.
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_CHANNEL_BYTES
        and _CHANNEL.fullmatch(name) is not None
    )

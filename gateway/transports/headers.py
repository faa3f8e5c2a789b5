"""Request headers that must appear at most once. No I/O.

Two ``Authorization`` or two ``Origin`` headers are ambiguous (a proxy may
check one while the gateway reads the other) and made websockets raise
``MultipleValuesError`` (HTTP 500, a traceback). Both transports refuse such
a request with 400 before reading either, and count it as a failed
authentication of the address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

SINGLE_VALUED = ("Authorization", "Origin")


def repeated(get_all: Callable[[str], Sequence[str]]) -> str | None:
    """The first of ``SINGLE_VALUED`` that the request has more than once, or None.

    ``get_all(name)`` gives every value of a header (websockets'
    ``headers.get_all``, aiohttp's ``headers.getall(name, [])``).
    """
    for name in SINGLE_VALUED:
        if len(get_all(name)) > 1:
            return name
    return None

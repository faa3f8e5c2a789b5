"""glibc malloc settings for a process that holds 10,000s of idle connections.

uvloop gives every TLS connection a 256 KiB read buffer (``SSL_READ_MAX_SIZE``)
of which a page or two is ever written. glibc serves allocations that large
with their own ``mmap`` only up to its *dynamic* threshold: the first time
such a block is freed (any connection closing) the threshold rises past
256 KiB and every later buffer is carved out of the heap instead, between
the small objects of other connections. The heap then holds many partly
used pages: at 10,000 idle TLS connections that cost ~9 KiB of resident
memory per connection (measured with ``bench.connections``: 53 KiB -> 44 KiB
per connection with the threshold fixed).

Fixing the threshold (``M_MMAP_THRESHOLD``, which also turns the dynamic
adjustment off) keeps each buffer in a mapping of its own, where untouched
pages cost nothing. Equivalent to ``MALLOC_MMAP_THRESHOLD_=131072`` in the
environment; does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("rabbitgate.malloc")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default starting value


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of ``threshold`` bytes or more with ``mmap``, always.

    Returns False (and changes nothing) without glibc's ``mallopt``.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused; memory per connection will be higher")
        return False
    return True

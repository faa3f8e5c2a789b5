"""Password hashes of the staff who log in to the admin pages (scrypt).

Passwords are stored as scrypt hashes (RFC 7914, N=2^15, r=8, p=1, a random
16-byte salt); checking one costs ~50 ms and 32 MiB, which is what makes a
stolen staff file expensive to crack.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

N, R, P = 2**15, 8, 1
MAX_PASSWORD = 1024


def hash_password(password: str, *, n: int = N) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, n, R, P)
    return f"scrypt${n}${R}${P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def spend_a_check(password: str) -> None:
    """As long as a real check: an unknown name must not answer sooner (no user
    enumeration by timing)."""
    verify_password(password, _DUMMY)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if len(password) > MAX_PASSWORD:
        raise ValueError("password too long")
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_DUMMY = f"scrypt${N}${R}${P}${_b64(b'0' * 16)}${_b64(b'0' * 32)}"

"""Reviewers of the alert review page: a file of ``name:scrypt$...`` lines.

Passwords are stored as scrypt hashes (RFC 7914, N=2^15, r=8, p=1, a random
16-byte salt); checking one costs ~50 ms and 32 MiB, which is what makes a
stolen file expensive to crack. The file is read at each login, so adding or
removing a reviewer (``rabbitgate alerts add-reviewer``) needs no restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

N, R, P = 2**15, 8, 1
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MAX_PASSWORD = 1024


class ReviewerFileError(Exception):
    pass


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


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if len(password) > MAX_PASSWORD:
        raise ValueError("password too long")
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def read_reviewers(path: Path) -> dict[str, str]:
    """name -> stored hash; blank lines and ``#`` comments are skipped."""
    reviewers = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not NAME.match(name) or not stored.startswith("scrypt$"):
            raise ReviewerFileError(f"{path}:{number}: expected name:scrypt$...")
        reviewers[name] = stored
    return reviewers


def check_login(path: Path, name: str, password: str) -> bool:
    """True when ``name`` is a reviewer and ``password`` is theirs (timing-flat)."""
    try:
        reviewers = read_reviewers(path)
    except (OSError, ReviewerFileError):
        return False
    stored = reviewers.get(name)
    if stored is None:
        # Spend the same time on an unknown name: no user enumeration by timing.
        verify_password(password, _DUMMY)
        return False
    return verify_password(password, stored)


def set_reviewer(path: Path, name: str, password: str) -> None:
    """Add or replace ``name`` (the file is created, and kept, private)."""
    if not NAME.match(name):
        raise ReviewerFileError("reviewer names are 1-64 of A-Z a-z 0-9 . _ @ -")
    if len(password) < 12:
        raise ReviewerFileError("use a password of at least 12 characters")
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0].strip() != name]
    kept.append(f"{name}:{hash_password(password)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(kept) + "\n")
    os.replace(tmp, path)


_DUMMY = f"scrypt${N}${R}${P}${_b64(b'0' * 16)}${_b64(b'0' * 32)}"

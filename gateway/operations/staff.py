"""Who may log in to the admin pages, and with which roles: the staff file.

One line per person, ``name:scrypt$...`` optionally followed by ``:roles``,
a comma-separated list of

* ``review``: the alert review page (``/alerts/``, anomaly/review.py);
* ``console-view``: the live console (``/console/``), read only;
* ``console-act``: the console's actions (disconnect, ban, unban); it
  implies ``console-view`` (acting on what one may not see makes no sense).

A line without roles is a reviewer's line of the first version of the file
(``anomaly.reviewers_file``) and keeps the ``review`` role only, so an
existing reviewers file goes on working and gives no console access.
The same person may hold any mix: reviewers and operators may be the same
people or not.

The file is read at each login and each page (a removed role or person takes
effect at their next click, not at the end of their session).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.operations.passwords import hash_password, spend_a_check, verify_password

REVIEW = "review"
CONSOLE_VIEW = "console-view"
CONSOLE_ACT = "console-act"
ROLES = (REVIEW, CONSOLE_VIEW, CONSOLE_ACT)
# What a line without a roles field grants: it was written for the review page.
DEFAULT_ROLES = frozenset({REVIEW})
# A role that grants others with it.
_IMPLIES = {CONSOLE_ACT: frozenset({CONSOLE_VIEW})}
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD = 12


class StaffFileError(Exception):
    """A staff file that cannot be used; ``str()`` is one line naming the file and line."""


@dataclass(frozen=True)
class StaffMember:
    name: str
    password_hash: str
    roles: frozenset[str]


def parse_roles(text: str) -> frozenset[str]:
    """``"console-view,console-act"`` -> the roles; ValueError naming an unknown one."""
    roles = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    return frozenset(roles)


def grants(roles: Iterable[str], role: str) -> bool:
    """Whether holding ``roles`` allows what ``role`` allows."""
    held = set(roles)
    for name in list(held):
        held |= _IMPLIES.get(name, frozenset())
    return role in held


def read_staff(path: Path) -> dict[str, StaffMember]:
    """name -> member; blank lines and ``#`` comments are skipped.

    Raises StaffFileError (one line) for a file that cannot be read or a bad line.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise StaffFileError(f"staff file {path}: {exc.strerror or exc}") from None
    staff: dict[str, StaffMember] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        stored, has_roles, role_text = rest.partition(":")
        if not sep or not NAME.match(name) or not stored.startswith("scrypt$"):
            raise StaffFileError(f"staff file {path}:{number}: expected name:scrypt$...[:roles]")
        try:
            roles = parse_roles(role_text) if has_roles else DEFAULT_ROLES
        except ValueError as exc:
            raise StaffFileError(f"staff file {path}:{number}: {exc}") from None
        staff[name] = StaffMember(name, stored, roles)
    return staff


def check_login(path: Path, name: str, password: str) -> StaffMember | None:
    """The member when ``name`` is on the staff and ``password`` is theirs, else None.

    Takes as long for an unknown name or an unreadable file as for a wrong
    password (no user enumeration by timing).
    """
    try:
        member = read_staff(path).get(name)
    except StaffFileError:
        member = None
    if member is None:
        spend_a_check(password)
        return None
    return member if verify_password(password, member.password_hash) else None


def set_member(path: Path, name: str, password: str, roles: frozenset[str] | None = None) -> None:
    """Add or replace ``name`` (the file is created, and kept, private).

    ``roles`` None writes a line without a roles field (the ``review`` role).
    """
    if not NAME.match(name):
        raise StaffFileError("staff names are 1-64 of A-Z a-z 0-9 . _ @ -")
    if len(password) < MIN_PASSWORD:
        raise StaffFileError(f"use a password of at least {MIN_PASSWORD} characters")
    if roles is not None and (not roles or not roles <= set(ROLES)):
        raise StaffFileError(f"roles: one or more of {', '.join(ROLES)}")
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0].strip() != name]
    line = f"{name}:{hash_password(password)}"
    if roles is not None:
        line += ":" + ",".join(r for r in ROLES if r in roles)
    kept.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(kept) + "\n")
    os.replace(tmp, path)

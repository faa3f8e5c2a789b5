"""Reviewers of the alert review page: the staff file (gateway/operations/staff.py).

The file and its scrypt hashes moved down into the gateway, so that the review
page and the live console share one login; these names stay for the code that
reads reviewers (``rabbitgate alerts ack --reviewer``, ``add-reviewer``).
A reviewer is a staff member with the ``review`` role.
"""

from __future__ import annotations

from pathlib import Path

from gateway.operations.passwords import MAX_PASSWORD, hash_password, verify_password
from gateway.operations.staff import REVIEW, StaffFileError, grants, read_staff, set_member
from gateway.operations.staff import check_login as check_staff_login

ReviewerFileError = StaffFileError

__all__ = [
    "MAX_PASSWORD",
    "ReviewerFileError",
    "check_login",
    "hash_password",
    "read_reviewers",
    "set_reviewer",
    "verify_password",
]


def read_reviewers(path: Path) -> dict[str, str]:
    """name -> stored hash of everyone with the ``review`` role."""
    return {
        name: member.password_hash
        for name, member in read_staff(path).items()
        if grants(member.roles, REVIEW)
    }


def check_login(path: Path, name: str, password: str) -> bool:
    """True when ``name`` is a reviewer and ``password`` is theirs (timing-flat)."""
    member = check_staff_login(path, name, password)
    return member is not None and grants(member.roles, REVIEW)


def set_reviewer(path: Path, name: str, password: str) -> None:
    """Add or replace ``name`` as a reviewer, keeping the roles the line had."""
    roles = None
    if path.exists():
        try:
            member = read_staff(path).get(name)
        except StaffFileError:
            member = None
        if member is not None and member.roles != frozenset({REVIEW}):
            roles = member.roles | {REVIEW}
    set_member(path, name, password, roles)

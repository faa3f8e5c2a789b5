"""Who is on the other end of a connection, as the token's verified claims say.

``Principal`` is what the policies decide on; ``AuthError`` is the one error
any token check raises. Both live here, free of pyjwt and asyncio, so that the
policy code and its tests can build principals without verifying a token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

MAX_SUB_CHARS = 256

AuthReason = Literal[
    "missing",
    "too_large",
    "malformed",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "bad_issuer",
    "bad_audience",
    "bad_algorithm",
    "unknown_key",
    "missing_claim",
    "bad_claim",
    "key_unavailable",
    "duplicate_header",  # two Authorization or Origin headers (gateway/transports/headers.py)
]
AUTH_REASONS: frozenset[str] = frozenset(get_args(AuthReason))

# Fixed messages: they never quote the token, a header or a claim value, all of
# which the client chose (and which would otherwise end up in logs verbatim).
_MESSAGES: dict[str, str] = {
    "missing": "no token given",
    "too_large": "token too large",
    "malformed": "token malformed",
    "bad_signature": "token signature invalid",
    "expired": "token expired",
    "not_yet_valid": "token not yet valid",
    "bad_issuer": "token issuer not accepted",
    "bad_audience": "token audience not accepted",
    "bad_algorithm": "token algorithm not accepted",
    "unknown_key": "token signed with an unknown key",
    "missing_claim": "token lacks a required claim",
    "bad_claim": "token claim invalid",
    "key_unavailable": "no verification key available",
    "duplicate_header": "more than one Authorization or Origin header",
}


class AuthError(Exception):
    """A token was refused. ``reason`` is one of ``AUTH_REASONS`` (for metrics).

    ``str(exc)`` is a short message that is safe to log and to send to the
    client: callers must pass only text of their own as ``message``, never a
    part of the token.
    """

    def __init__(self, reason: AuthReason, message: str | None = None) -> None:
        if reason not in AUTH_REASONS:
            raise ValueError(f"unknown AuthError reason {reason!r}")
        self.reason: AuthReason = reason
        super().__init__(message or _MESSAGES[reason])


@dataclass(frozen=True)
class Principal:
    """The verified identity behind a connection.

    ``exp`` is the token's expiry (epoch seconds): the connection must be
    closed with 4401 then unless a fresh token arrived. It defaults to never,
    for principals built by hand in tests; ``TokenVerifier`` always sets it.
    """

    sub: str
    roles: frozenset[str]
    scopes: frozenset[str]
    # Read-only view of every claim, for policies that match on any claim by name.
    claims: Mapping[str, Any] = field(hash=False)
    exp: float = math.inf

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Principal:
        """Build a principal from already verified claims; raises AuthError.

        ``sub``: 1 to 256 printable characters. ``roles``: absent
        or a list of strings. ``scope``: absent or a space-separated string.
        ``exp``: absent (never expires) or a finite number.
        """
        sub = claims.get("sub")
        if sub is None:
            raise AuthError("missing_claim", 'token lacks the "sub" claim')
        # Printable only: the user name is echoed to the client and written to logs.
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_CHARS or not sub.isprintable():
            raise AuthError("bad_claim", '"sub" must be 1 to 256 printable characters')

        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise AuthError("bad_claim", '"roles" must be a list of strings')

        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise AuthError("bad_claim", '"scope" must be a space-separated string')

        exp = claims.get("exp", math.inf)
        if exp is not math.inf and not is_finite_number(exp):
            raise AuthError("bad_claim", '"exp" must be a number')

        return cls(
            sub=sub,
            roles=_frozen(roles),
            scopes=_frozen(scope.split()),
            claims=MappingProxyType(_compact(claims)),
            exp=float(exp),
        )


# Shared by every principal without roles or scopes (an empty frozenset is
# 216 bytes, and not a singleton).
_NOTHING: frozenset[str] = frozenset()
# The role and scope sets seen, shared by every principal that has the same
# one (10,000 connections usually hold a handful of distinct sets). Bounded:
# past the bound a set is simply not shared.
_SHARED_SETS: dict[frozenset[str], frozenset[str]] = {}
_MAX_SHARED_SETS = 4096
# Claim strings up to this length are shared between principals (issuer,
# audience, claim names, tenant ids); longer ones are kept as they came.
_MAX_SHARED_CHARS = 64


def _frozen(values: list[str]) -> frozenset[str]:
    if not values:
        return _NOTHING
    found = frozenset(values)
    shared = _SHARED_SETS.get(found)
    if shared is not None:
        return shared
    if len(_SHARED_SETS) < _MAX_SHARED_SETS:
        _SHARED_SETS[found] = found
    return found


def _compact(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The claims as kept for the connection's life, memory shared where equal.

    A JSON decoder makes new strings for every token: the claim names and
    the issuer, audience and role names are the same in most of them, ~50
    bytes each per connection. Names and short string values (alone or in a
    list) are interned, so 10,000 principals hold one copy. Values compare
    and hash as before; nothing a policy reads changes.
    """
    return {_share(name): _share_value(value) for name, value in claims.items()}


def _share(text: str) -> str:
    return sys.intern(text) if type(text) is str and len(text) <= _MAX_SHARED_CHARS else text


def _share_value(value: Any) -> Any:
    if type(value) is str:
        return _share(value)
    if type(value) is list and all(type(item) is str for item in value):
        return [_share(item) for item in value]
    return value


def is_finite_number(value: object) -> bool:
    """True for an int or float that is not a bool, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the range of a float
        return False

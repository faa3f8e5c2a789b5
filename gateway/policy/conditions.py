"""Policy conditions: who may subscribe to or publish on a channel (spec section 6).

A rule lists conditions per action; any one that holds grants the action. Each
condition is a small frozen value with ``evaluate(principal, bindings)``, where
``bindings`` are the placeholders the rule's channel pattern bound (``room``,
``user`` ...). ``parse_condition`` turns the operator's YAML text into one, and
``trace`` records why it held or not, for ``rabbitgate policy explain``.
``Principal`` (gateway/auth/principal.py) is what they are evaluated against.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.auth.principal import Principal

Bindings = Mapping[str, str]


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages quote hostile input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Anyone:
    """Any authenticated user (every connection is authenticated before it acts)."""

    def evaluate(self, principal: Principal, bindings: Bindings) -> bool:
        return True

    def __str__(self) -> str:
        return "anyone"


@dataclass(frozen=True)
class Nobody:
    def evaluate(self, principal: Principal, bindings: Bindings) -> bool:
        return False

    def __str__(self) -> str:
        return "nobody"


@dataclass(frozen=True)
class Role:
    name: str

    def evaluate(self, principal: Principal, bindings: Bindings) -> bool:
        return self.name in principal.roles

    def __str__(self) -> str:
        return f"role:{self.name}"


@dataclass(frozen=True)
class Scope:
    name: str

    def evaluate(self, principal: Principal, bindings: Bindings) -> bool:
        return self.name in principal.scopes

    def __str__(self) -> str:
        return f"scope:{self.name}"


@dataclass(frozen=True)
class Claim:
    """``claim:NAME=VALUE``; with ``placeholder`` set, VALUE names a pattern binding."""

    name: str
    value: str
    placeholder: bool = False

    def expected(self, bindings: Bindings) -> str | None:
        return bindings.get(self.value) if self.placeholder else self.value

    def evaluate(self, principal: Principal, bindings: Bindings) -> bool:
        expected = self.expected(bindings)
        return expected is not None and claim_text(principal, self.name) == expected

    def __str__(self) -> str:
        value = f"{{{self.value}}}" if self.placeholder else self.value
        return f"claim:{self.name}={value}"


@dataclass(frozen=True)
class All:
    conditions: tuple[Condition, ...]

    def evaluate(self, principal: Principal, bindings: Bindings) -> bool:
        return all(c.evaluate(principal, bindings) for c in self.conditions)

    def __str__(self) -> str:
        return "{all: [" + ", ".join(str(c) for c in self.conditions) + "]}"


Condition = Anyone | Nobody | Role | Scope | Claim | All


def claim_text(principal: Principal, name: str) -> str | None:
    """The claim as a string, or None when it is absent or not a plain str/int.

    Strict on purpose: ``True`` would compare equal to ``"True"``, and a list
    ``["acme"]`` must not pass for the tenant ``acme``.
    """
    # ``sub`` comes from the verified Principal, so the two can never disagree.
    value = principal.sub if name == "sub" else principal.claims.get(name)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


def placeholders(condition: Condition) -> frozenset[str]:
    """Names of the pattern placeholders the condition refers to."""
    if isinstance(condition, Claim) and condition.placeholder:
        return frozenset({condition.value})
    if isinstance(condition, All):
        return frozenset().union(*(placeholders(c) for c in condition.conditions))
    return frozenset()


def is_nobody(condition: Condition) -> bool:
    """True when the condition can never hold, whoever asks."""
    if isinstance(condition, Nobody):
        return True
    return isinstance(condition, All) and any(is_nobody(c) for c in condition.conditions)


# ---------------------------------------------------------------- parsing

MAX_NAME_CHARS = 256

# Role, scope and claim names: printable, no spaces; claim names may be URLs
# (Auth0 style ``https://example.com/tenant``). Never ``=``, so the claim
# syntax stays unambiguous.
_NAME = r"[A-Za-z0-9_.:/@+#~-]+"
_ROLE = re.compile(rf"role:({_NAME})")
_SCOPE = re.compile(rf"scope:({_NAME})")
_CLAIM = re.compile(rf"claim:({_NAME})=(.+)")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A literal claim value: no spaces, braces or control characters, so a typo
# like ``{user`` is an error rather than a literal nobody has.
_LITERAL = re.compile(r"[^\s{}\x00-\x1f\x7f]+")

_EXPECTED = "anyone, nobody, role:NAME, scope:NAME, claim:NAME=VALUE or {all: [...]}"


class ConditionError(ValueError):
    """The text is not a condition; the message says why (the caller adds where)."""


def parse_condition(raw: object) -> Condition:
    """One condition from its YAML value: a string, or ``{all: [conditions]}``."""
    if isinstance(raw, dict):
        return _parse_all(raw)
    if not isinstance(raw, str):
        raise ConditionError(f"a condition must be a string or {{all: [...]}}, not {shown(raw)}")
    if len(raw) > MAX_NAME_CHARS + 16:
        raise ConditionError(f"condition longer than {MAX_NAME_CHARS + 16} characters")
    if raw == "anyone":
        return Anyone()
    if raw == "nobody":
        return Nobody()
    if match := _ROLE.fullmatch(raw):
        return Role(match[1])
    if match := _SCOPE.fullmatch(raw):
        return Scope(match[1])
    if match := _CLAIM.fullmatch(raw):
        return _parse_claim(match[1], match[2], raw)
    raise ConditionError(f"unknown condition {shown(raw)} (expected {_EXPECTED})")


def _parse_claim(name: str, value: str, raw: str) -> Claim:
    if match := _PLACEHOLDER.fullmatch(value):
        return Claim(name, match[1], placeholder=True)
    if _LITERAL.fullmatch(value) is None:
        raise ConditionError(
            f"bad claim value in {shown(raw)}: use a literal without spaces or braces, "
            "or one {placeholder} of the channel pattern"
        )
    return Claim(name, value)


def _parse_all(raw: dict[Any, Any]) -> All:
    if list(raw) != ["all"]:
        hint = ""
        if len(raw) == 1:
            # ``[role: member]`` in YAML is a mapping, not the string "role:member".
            key, value = next(iter(raw.items()))
            hint = f" (did you mean {shown(f'{key}:{value}')}, without a space after the colon?)"
        raise ConditionError(f"unknown condition {shown(raw)}{hint}; expected {_EXPECTED}")
    items = raw["all"]
    if not isinstance(items, list) or not items:
        raise ConditionError("'all' needs a non-empty list of conditions")
    return All(tuple(parse_condition(item) for item in items))


# ---------------------------------------------------------------- explaining


@dataclass(frozen=True)
class Check:
    """One condition's result, with its nested checks for ``all``."""

    condition: str
    passed: bool
    note: str = ""
    children: tuple[Check, ...] = ()


def trace(condition: Condition, principal: Principal, bindings: Bindings) -> Check:
    """Evaluate every part of the condition (no short cut) and say why."""
    if isinstance(condition, All):
        children = tuple(trace(c, principal, bindings) for c in condition.conditions)
        return Check("all of", all(c.passed for c in children), children=children)
    passed = condition.evaluate(principal, bindings)
    note = ""
    if isinstance(condition, Role):
        note = "roles: " + (", ".join(sorted(principal.roles)) or "none")
    elif isinstance(condition, Scope):
        note = "scopes: " + (", ".join(sorted(principal.scopes)) or "none")
    elif isinstance(condition, Claim):
        actual = claim_text(principal, condition.name)
        shown = "absent or not a string/integer" if actual is None else repr(actual)
        note = f"needs {condition.expected(bindings)!r}, token has {shown}"
    return Check(str(condition), passed, note)

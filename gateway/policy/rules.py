"""Policies: the operators' YAML rules mapping channels to exchanges and deciding access.

Spec section 6. Files in name order, rules in order; the first rule whose
channel pattern matches decides, and no match denies. Everything here is pure
except ``load_policy_set``, which reads the folder. A set that fails validation
raises PolicyError naming file, line, rule and field; the caller keeps its last
good set.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import yaml

from gateway.auth.principal import Principal
from gateway.policy.conditions import (
    Anyone,
    Check,
    Condition,
    ConditionError,
    is_nobody,
    parse_condition,
    placeholders,
    shown,
    trace,
)
from gateway.protocol.channels import MAX_CHANNEL_BYTES, is_valid_channel

__all__ = [
    "Decision",
    "Explanation",
    "LintWarning",
    "PolicyError",
    "PolicySet",
    "Principal",
    "Rule",
    "RuleLimits",
    "load_policy_set",
    "parse_policy_files",
]

Action = Literal["subscribe", "publish"]

# Limits on what an operator's (or an attacker's) file may ask of us.
MAX_FILE_BYTES = 1024 * 1024
MAX_RULES = 1000  # keeps uncached lookups and lint's shadow check cheap
MAX_YAML_DEPTH = 32  # PyYAML composes recursively: deep nesting would exhaust the stack
MAX_YAML_NODES = 50_000  # a rule takes 10 to 30, so MAX_RULES fit with room to spare
MAX_EXCHANGE_BYTES = 127  # RabbitMQ's own limit is 255; 127 leaves room for derived names
DEFAULT_HISTORY = 100
MAX_HISTORY = 1_000_000
MAX_BURST = 1_000_000
MAX_DATA_BYTES = 1 << 30
CACHE_SIZE = 10_000  # channel -> rule lookups remembered by rule_for


class PolicyError(Exception):
    """A policy set that must not be loaded. ``str()`` names file:line, rule and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        rule: int | None = None,
        pattern: str | None = None,
        field: str | None = None,
    ) -> None:
        self.file, self.line, self.rule, self.field = file, line, rule, field
        self.reason = message
        where = ""
        if file:
            where += f"{file}:{line}: " if line else f"{file}: "
        if rule:
            where += f"rule {rule} ({pattern}): " if pattern else f"rule {rule}: "
        if field:
            where += f"field '{field}': "
        super().__init__(where + message)


class _Invalid(ValueError):
    """A validation failure; the rule parser adds file, rule and (unless given) line/field."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.line, self.field = line, field


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class RuleLimits:
    publish_per_second: float | None = None  # token bucket refill rate per user on this rule
    burst: int | None = None  # tokens the bucket holds
    max_bytes: int | None = None  # largest JSON ``data`` accepted


@dataclass(frozen=True)
class Rule:
    index: int  # position in the whole ordered set, 0-based
    source: str  # file name, e.g. "10-chat.yaml"
    line: int  # where the rule starts in that file
    pattern: str  # "chat.{room}"
    exchange: str
    subscribe: tuple[Condition, ...] = ()
    publish: tuple[Condition, ...] = ()
    limits: RuleLimits = RuleLimits()
    history: int = DEFAULT_HISTORY
    number: int = 1  # position within its file, 1-based, as messages show it
    # Precompiled pattern: segment count, (position, literal), (position, placeholder),
    # and each segment as its literal or None for a placeholder.
    _length: int = field(init=False, repr=False, compare=False)
    _shape: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    _literals: tuple[tuple[int, str], ...] = field(init=False, repr=False, compare=False)
    _slots: tuple[tuple[int, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        segments = check_pattern(self.pattern).split(".")
        slots = tuple((i, s[1:-1]) for i, s in enumerate(segments) if s.startswith("{"))
        literals = tuple((i, s) for i, s in enumerate(segments) if not s.startswith("{"))
        object.__setattr__(self, "_length", len(segments))
        object.__setattr__(self, "_shape", tuple(None if s[0] == "{" else s for s in segments))
        object.__setattr__(self, "_literals", literals)
        object.__setattr__(self, "_slots", slots)

    @property
    def label(self) -> str:
        return f"{self.source}#{self.number}"

    def conditions(self, action: Action) -> tuple[Condition, ...]:
        if action == "subscribe":
            return self.subscribe
        if action == "publish":
            return self.publish
        raise ValueError(f"unknown action {action!r}")

    def match(self, channel: str) -> dict[str, str] | None:
        """The placeholder bindings when ``channel`` matches the pattern, else None."""
        return self._match(channel.split(".")) if is_valid_channel(channel) else None

    def _match(self, parts: list[str]) -> dict[str, str] | None:
        # ``parts`` come from a valid channel name: no empty or wildcard segment.
        if len(parts) != self._length:
            return None
        for i, literal in self._literals:
            if parts[i] != literal:
                return None
        return {name: parts[i] for i, name in self._slots}

    def covers(self, other: Rule) -> bool:
        """True when every channel ``other`` matches, this rule matches too."""
        if other._length != self._length:
            return False
        pairs = zip(self._shape, other._shape, strict=True)
        return all(mine is None or mine == theirs for mine, theirs in pairs)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Rule | None  # None when no rule matched (default deny)
    bindings: Mapping[str, str]
    reason: str  # for logs and the CLI; not meant for clients


@dataclass(frozen=True)
class LintWarning:
    file: str
    line: int
    rule: str  # "10-chat.yaml#2 (chat.{room})"
    text: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: rule {self.rule}: " if self.file else ""
        return where + self.text


@dataclass(frozen=True)
class Explanation:
    """Why ``decision`` was reached: the deciding rule and every condition's result."""

    principal: Principal
    action: Action
    channel: str
    decision: Decision
    checks: tuple[Check, ...]

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def render(self) -> str:
        p, rule = self.principal, self.decision.rule
        lines = [
            f"{self.action} {self.channel!r} as {p.sub!r}",
            "  roles: "
            + (", ".join(sorted(p.roles)) or "none")
            + "; scopes: "
            + (", ".join(sorted(p.scopes)) or "none"),
        ]
        if rule is None:
            lines.append("  rule: none matches (default deny)")
        else:
            lines.append(
                f"  rule: {rule.label} at {rule.source}:{rule.line}, channel {rule.pattern!r}, "
                f"exchange {rule.exchange!r}"
            )
            bound = ", ".join(f"{k}={v}" for k, v in sorted(self.decision.bindings.items()))
            lines.append(f"  bindings: {bound or 'none'}")
            lines.append(f"  {self.action} is allowed when any one holds:")
            lines.extend(_render_check(c, 4) for c in self.checks)
            if not self.checks:
                lines.append("    (no conditions: nobody)")
        verdict = "ALLOWED" if self.allowed else "DENIED"
        lines.append(f"  verdict: {verdict} ({self.decision.reason})")
        return "\n".join(lines)


def _render_check(check: Check, indent: int) -> str:
    mark = "[yes]" if check.passed else "[no] "
    note = f"  ({check.note})" if check.note else ""
    head = " " * indent + f"{mark} {check.condition}{note}"
    return "\n".join([head, *(_render_check(c, indent + 6) for c in check.children)])


class PolicySet:
    """An ordered, validated rule set; build it with parse_policy_files or load_policy_set."""

    def __init__(self, rules: Sequence[Rule], files: Sequence[str] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.files: tuple[str, ...] = tuple(files)
        self.digest: str = _digest(self.rules, self.files)
        # Only rules with as many segments as the channel can match it.
        by_length: dict[int, list[Rule]] = {}
        for rule in self.rules:
            by_length.setdefault(rule._length, []).append(rule)
        self._by_length = {n: tuple(rules) for n, rules in by_length.items()}
        self._cache: dict[str, tuple[Rule, dict[str, str]] | None] = {}

    def rule_for(self, channel: str) -> tuple[Rule, dict[str, str]] | None:
        """The first rule matching ``channel`` and its bindings (a fresh dict), or None."""
        try:
            hit = self._cache[channel]
        except KeyError:
            if not is_valid_channel(channel):
                return None  # never cached: the cache holds only short, valid names
            hit = self._lookup(channel)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()  # crude but bounded; a miss costs one scan
            self._cache[channel] = hit
        return None if hit is None else (hit[0], dict(hit[1]))

    def _lookup(self, channel: str) -> tuple[Rule, dict[str, str]] | None:
        parts = channel.split(".")
        for rule in self._by_length.get(len(parts), ()):
            bindings = rule._match(parts)
            if bindings is not None:
                return rule, bindings
        return None

    def decide(self, principal: Principal, action: Action, channel: str) -> Decision:
        if action not in ("subscribe", "publish"):
            raise ValueError(f"unknown action {action!r}")
        hit = self.rule_for(channel)
        if hit is None:
            reason = "no rule matches" if is_valid_channel(channel) else "invalid channel name"
            return Decision(False, None, {}, reason)
        rule, bindings = hit
        conditions = rule.conditions(action)
        prefix = f"rule {rule.label} {rule.pattern}"
        for condition in conditions:
            if condition.evaluate(principal, bindings):
                return Decision(True, rule, bindings, f"{prefix}: {condition}")
        why = "no condition holds" if any(not is_nobody(c) for c in conditions) else "nobody"
        return Decision(False, rule, bindings, f"{prefix}: {why}")

    def revoked(
        self, principal: Principal, subscriptions: Mapping[str, str]
    ) -> list[tuple[str, Decision]]:
        """The subscriptions (channel -> exchange) this set no longer allows.

        A subscription whose channel now maps to another exchange counts as
        revoked too: its messages would come from the wrong stream.
        """
        ended = []
        for channel, exchange in subscriptions.items():
            decision = self.decide(principal, "subscribe", channel)
            rule = decision.rule
            if not (decision.allowed and rule is not None and rule.exchange == exchange):
                ended.append((channel, decision))
        return ended

    def explain(self, principal: Principal, action: Action, channel: str) -> Explanation:
        decision = self.decide(principal, action, channel)
        checks: tuple[Check, ...] = ()
        if decision.rule is not None:
            checks = tuple(
                trace(c, principal, decision.bindings) for c in decision.rule.conditions(action)
            )
        return Explanation(principal, action, channel, decision, checks)

    def exchanges(self) -> frozenset[str]:
        return frozenset(rule.exchange for rule in self.rules)

    def lint(self) -> list[LintWarning]:
        """Rules that cannot work as their author meant; the set still loads."""
        if not self.rules:
            return [LintWarning("", 0, "", "no rules: every subscribe and publish is denied")]
        found: list[LintWarning] = []
        shadows = _shadows(self.rules)
        for rule in self.rules:
            texts: list[str] = []
            earlier = shadows.get(rule.index)
            if earlier is not None:
                texts.append(
                    f"can never match: rule {earlier.label} ({earlier.pattern}) at "
                    f"{earlier.source}:{earlier.line} comes first and matches all its channels"
                )
            if all(is_nobody(c) for c in (*rule.subscribe, *rule.publish)):
                texts.append("nobody may subscribe or publish: its channels are unusable")
            unlimited = rule.limits.publish_per_second is None
            if unlimited and any(isinstance(c, Anyone) for c in rule.publish):
                texts.append("anyone may publish, with no 'publish' limit")
            label = f"{rule.label} ({rule.pattern})"
            found.extend(LintWarning(rule.source, rule.line, label, text) for text in texts)
        return found


def _shadows(rules: tuple[Rule, ...]) -> dict[int, Rule]:
    """Rule index -> the first earlier rule that matches every channel it matches."""
    first: dict[tuple[str | None, ...], Rule] = {}  # each distinct shape's first rule
    found: dict[int, Rule] = {}
    for rule in rules:
        literals = [i for i, s in enumerate(rule._shape) if s is not None]
        if 2 ** len(literals) <= len(first):
            # Few literals: look up each pattern covering this one (literal or placeholder
            # at each literal position) instead of comparing with every earlier rule.
            candidates = [
                first.get(_generalize(rule._shape, literals, bits))
                for bits in range(2 ** len(literals))
            ]
        else:
            candidates = list(first.values())
        covering = [c for c in candidates if c is not None and c.covers(rule)]
        if covering:
            found[rule.index] = min(covering, key=lambda c: c.index)
        first.setdefault(rule._shape, rule)
    return found


def _generalize(
    shape: tuple[str | None, ...], literals: list[int], bits: int
) -> tuple[str | None, ...]:
    """``shape`` with the literals at ``literals`` whose bit is set made placeholders."""
    generalized = list(shape)
    for n, i in enumerate(literals):
        if bits >> n & 1:
            generalized[i] = None
    return tuple(generalized)


def _digest(rules: tuple[Rule, ...], files: tuple[str, ...]) -> str:
    # The meaning of the set, not its bytes: editing a comment keeps the digest.
    canonical = {
        "files": list(files),
        "rules": [
            [
                r.source,
                r.pattern,
                r.exchange,
                [str(c) for c in r.subscribe],
                [str(c) for c in r.publish],
                [r.limits.publish_per_second, r.limits.burst, r.limits.max_bytes],
                r.history,
            ]
            for r in rules
        ],
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- loading


def load_policy_set(directory: Path) -> PolicySet:
    """Every ``*.yaml`` file of ``directory`` (dot-files skipped), in name order."""
    try:
        paths = sorted(
            (p for p in directory.iterdir() if p.name.endswith(".yaml") and p.name[0] != "."),
            key=lambda p: p.name,
        )
    except OSError as exc:
        message = f"cannot read the policies folder: {exc.strerror}"
        raise PolicyError(message, file=str(directory)) from None
    texts: dict[str, str] = {}
    for path in paths:
        if not path.is_file():  # a FIFO or device named *.yaml would block or never end
            raise PolicyError("not a regular file", file=str(path))
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise PolicyError(f"cannot read: {exc.strerror}", file=str(path)) from None
        if len(data) > MAX_FILE_BYTES:
            raise PolicyError(f"larger than {MAX_FILE_BYTES} bytes", file=str(path))
        try:
            texts[path.name] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("not UTF-8 text", file=str(path)) from None
    return parse_policy_files(texts, base=str(directory))


def parse_policy_files(files: Mapping[str, str], *, base: str = "") -> PolicySet:
    """Validate file name -> YAML text (in name order) into a PolicySet; raises PolicyError.

    ``base`` only prefixes file names in error messages (the folder they came from).
    """
    rules: list[Rule] = []
    for name in sorted(files):
        display = os.path.join(base, name) if base else name
        rules.extend(_parse_file(files[name], name, display, len(rules)))
        if len(rules) > MAX_RULES:
            raise PolicyError(f"more than {MAX_RULES} rules in the whole set", file=display)
    return PolicySet(rules, tuple(sorted(files)))


def _parse_file(text: str, source: str, display: str, first_index: int) -> list[Rule]:
    try:
        if len(text) > MAX_FILE_BYTES or len(text.encode()) > MAX_FILE_BYTES:
            raise _Invalid(f"larger than {MAX_FILE_BYTES} bytes")
        root = _compose(text)
        if root is None:
            raise _Invalid("the file is empty; it needs 'version: 1' and 'rules:'", line=1)
        top = _fields(root, "the file")
        for key, (line, _) in top.items():
            if key not in ("version", "rules"):
                raise _Invalid(_unknown(key, ("version", "rules")), line, key)
        for key in ("version", "rules"):
            if key not in top:
                raise _Invalid(f"missing top-level '{key}'", root.start_mark.line + 1, key)
        line, node = top["version"]
        version = _plain(node)
        if type(version) is not int or version != 1:
            raise _Invalid(f"must be 1 (the number), not {shown(version)}", line, "version")
        line, rules_node = top["rules"]
        if not isinstance(rules_node, yaml.SequenceNode):
            raise _Invalid("must be a list of rules, each starting '- channel:'", line, "rules")
    except _Invalid as exc:
        raise PolicyError(str(exc), file=display, line=exc.line, field=exc.field) from None
    return [
        _parse_rule(node, source, display, number, first_index + number - 1)
        for number, node in enumerate(rules_node.value, 1)
    ]


_RULE_FIELDS = ("channel", "exchange", "subscribe", "publish", "limits", "history")
T = TypeVar("T")


def _parse_rule(node: yaml.Node, source: str, display: str, number: int, index: int) -> Rule:
    rule_line = node.start_mark.line + 1
    pattern: str | None = None

    def error(exc: _Invalid | ConditionError, field: str | None, line: int | None) -> PolicyError:
        return PolicyError(
            str(exc),
            file=display,
            line=getattr(exc, "line", None) or line or rule_line,
            rule=number,
            pattern=pattern,
            field=getattr(exc, "field", None) or field,
        )

    try:
        fields = _fields(node, "a rule")
    except _Invalid as exc:
        raise error(exc, None, None) from None

    def value(name: str, parse: Callable[[yaml.Node], T], default: T) -> T:
        if name not in fields:
            return default
        line, value_node = fields[name]
        try:
            return parse(value_node)
        except (_Invalid, ConditionError) as exc:
            raise error(exc, name, line) from None

    for required in ("channel", "exchange"):
        if required not in fields:
            missing = _Invalid("missing: every rule needs 'channel' and 'exchange'")
            raise error(missing, required, None)
    # The channel first, so that every later message can name the rule by it.
    pattern = value("channel", lambda n: check_pattern(_plain(n)), "")
    for key, (line, _) in fields.items():
        if key not in _RULE_FIELDS:
            raise error(_Invalid(_unknown(key, _RULE_FIELDS)), key, line)
    names = frozenset(s[1:-1] for s in pattern.split(".") if s.startswith("{"))
    return Rule(
        index=index,
        source=source,
        line=rule_line,
        pattern=pattern,
        exchange=value("exchange", lambda n: _check_exchange(_plain(n)), ""),
        subscribe=value("subscribe", lambda n: _parse_conditions(_plain(n), names), ()),
        publish=value("publish", lambda n: _parse_conditions(_plain(n), names), ()),
        limits=value("limits", _parse_limits, RuleLimits()),
        history=value("history", _parse_history, DEFAULT_HISTORY),
        number=number,
    )


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key[:64], known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"not a known field; {hint}(fields: {', '.join(known)})"


# ---------------------------------------------------------------- field values

_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_PLACEHOLDER_SEGMENT = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_EXCHANGE = re.compile(r"[A-Za-z0-9_.:-]+")


def check_pattern(raw: object) -> str:
    """``raw`` when it is a valid channel pattern; raises a ValueError saying why not."""
    if not isinstance(raw, str) or not raw:
        raise _Invalid(f'must be a channel pattern such as "chat.{{room}}", not {shown(raw)}')
    if len(raw.encode()) > MAX_CHANNEL_BYTES:
        raise _Invalid(f"pattern longer than {MAX_CHANNEL_BYTES} bytes")
    if "*" in raw or "#" in raw:
        raise _Invalid("AMQP wildcards * and # are not allowed; use a {name} placeholder")
    seen: set[str] = set()
    for segment in raw.split("."):
        if _PLACEHOLDER_SEGMENT.fullmatch(segment):
            if segment in seen:
                raise _Invalid(f"placeholder {segment} appears twice")
            seen.add(segment)
        elif not _LITERAL_SEGMENT.fullmatch(segment):
            raise _Invalid(
                f"bad segment {shown(segment)} in {shown(raw)}: each dot-separated segment is "
                "letters, digits, _ and -, or one {name} placeholder"
            )
    return raw


def _check_exchange(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise _Invalid(f"must name a RabbitMQ exchange (not the default one), not {shown(raw)}")
    if len(raw.encode()) > MAX_EXCHANGE_BYTES:
        raise _Invalid(f"exchange name longer than {MAX_EXCHANGE_BYTES} bytes")
    if not _EXCHANGE.fullmatch(raw):
        raise _Invalid(f"bad exchange name {shown(raw)}: use letters, digits and _ . : -")
    if raw.lower().startswith("amq."):
        raise _Invalid(f"{shown(raw)}: names starting with 'amq.' are reserved by RabbitMQ")
    return raw


def _parse_conditions(raw: object, names: frozenset[str]) -> tuple[Condition, ...]:
    if raw is None:  # ``publish:`` with nothing after it: nobody, like a missing list
        return ()
    if not isinstance(raw, list):
        raise _Invalid(f"must be a list of conditions such as [role:member], not {shown(raw)}")
    conditions = tuple(parse_condition(item) for item in raw)
    for condition in conditions:
        unbound = placeholders(condition) - names
        if unbound:
            name = sorted(unbound)[0]
            raise _Invalid(f"{condition}: placeholder {{{name}}} is not in the channel pattern")
    return conditions


_RATE = re.compile(
    r"\s*(\d{1,9}(?:\.\d{1,6})?)\s*(?:/|\bper\b)\s*(second|minute|hour|day)s?\s*",
    re.IGNORECASE | re.ASCII,
)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _parse_limits(node: yaml.Node) -> RuleLimits:
    if isinstance(node, yaml.ScalarNode) and _plain(node) is None:
        return RuleLimits()
    fields = _fields(node, "limits")
    values: dict[str, object] = {}
    for key, (line, value_node) in fields.items():
        if key not in ("publish", "burst", "max_bytes"):
            raise _Invalid(_unknown(key, ("publish", "burst", "max_bytes")), line, f"limits.{key}")
        values[key] = _plain(value_node)

    def check(key: str, parse: Callable[[object], T]) -> T | None:
        if key not in values:
            return None
        try:
            return parse(values[key])
        except _Invalid as exc:
            raise _Invalid(str(exc), fields[key][0], f"limits.{key}") from None

    rate = check("publish", _parse_rate)
    burst = check("burst", lambda v: _bounded_int(v, 1, MAX_BURST))
    max_bytes = check("max_bytes", lambda v: _bounded_int(v, 1, MAX_DATA_BYTES))
    if burst is not None and rate is None:
        raise _Invalid("'burst' needs a 'publish' rate", fields["burst"][0], "limits.burst")
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))
    return RuleLimits(publish_per_second=rate, burst=burst, max_bytes=max_bytes)


def _parse_rate(raw: object) -> float:
    match = _RATE.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise _Invalid(f'must be a rate such as "10/second" or "600/minute", not {shown(raw)}')
    count = float(match[1])
    if count <= 0:
        raise _Invalid("the rate must be more than 0 (use publish: [nobody] to forbid publishing)")
    return count / _UNIT_SECONDS[match[2].lower()]


def _parse_history(node: yaml.Node) -> int:
    return _bounded_int(_plain(node), 0, MAX_HISTORY)


def _bounded_int(raw: object, low: int, high: int) -> int:
    # bool is an int in Python; ``history: yes`` is a mistake, not 1.
    if type(raw) is not int or not low <= raw <= high:
        raise _Invalid(f"must be a whole number from {low} to {high}, not {shown(raw)}")
    return raw


# ---------------------------------------------------------------- strict YAML


# libyaml's parser when installed: the pure-Python one needs ~20 s for a 1 MiB
# file of tiny items. Both are only ever fed files that passed _check_events.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_COLLECTION_STARTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_COLLECTION_ENDS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _compose(text: str) -> yaml.Node | None:
    """The document's node tree (line numbers kept), after _check_events approved it."""
    try:
        _check_events(text)
        return yaml.compose(text, Loader=_Loader)  # type: ignore[no-any-return]
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise _Invalid(f"not valid YAML: {exc.problem or exc.context}", line) from None
    except yaml.reader.ReaderError as exc:  # a control character, say
        line = text.count("\n", 0, exc.position) + 1
        message = f"not valid YAML: character #x{exc.character:04x} is not allowed"
        raise _Invalid(message, line) from None
    except yaml.YAMLError as exc:
        raise _Invalid(f"not valid YAML: {' '.join(str(exc).split())}") from None


def _check_events(text: str) -> None:
    """Refuse what a policy never needs and a hostile file could abuse, before composing.

    Aliases are refused outright, which rules out "billion laughs" expansion;
    explicit tags (``!!python/object``) never reach a constructor; nesting
    depth (the composer recurses) and the number of values are bounded.
    """
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Invalid("YAML anchors and aliases (&name, *name) are not allowed here", line)
        tag = getattr(event, "tag", None)
        if tag is not None:
            raise _Invalid(f"YAML tags ({shown(tag)}) are not allowed here", line)
        if isinstance(event, _COLLECTION_STARTS):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _Invalid(f"nested more than {MAX_YAML_DEPTH} levels deep", line)
        elif isinstance(event, _COLLECTION_ENDS):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise _Invalid(f"more than {MAX_YAML_NODES} YAML values in one file", line)


def _scalar(node: yaml.ScalarNode) -> object:
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, OverflowError):
        # e.g. an integer of 5,000 digits, or "=" (the YAML 'value' type)
        line = node.start_mark.line + 1
        raise _Invalid(f"cannot read the value {shown(node.value)}", line) from None


def _fields(node: yaml.Node, what: str) -> dict[str, tuple[int, yaml.Node]]:
    """A mapping node's keys -> (line, value node); keys must be unique strings."""
    if not isinstance(node, yaml.MappingNode):
        raise _Invalid(f"{what} must be a mapping of 'key: value' lines", node.start_mark.line + 1)
    found: dict[str, tuple[int, yaml.Node]] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise _Invalid("keys must be plain words, not a list or mapping", line)
        key = _scalar(key_node)
        if not isinstance(key, str):
            raise _Invalid(f"keys must be plain words, not {shown(key)}", line)
        if key in found:
            raise _Invalid(f"duplicate key {shown(key)}", line)
        found[key] = (line, value_node)
    return found


def _plain(node: yaml.Node) -> object:
    """The node as plain Python values (depth is bounded by the loader)."""
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item) for item in node.value]
    return {key: _plain(value) for key, (_, value) in _fields(node, "a value").items()}

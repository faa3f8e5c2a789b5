"""Policies (spec section 6): loading, validation, matching, deciding, explaining, lint."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy import rules as policy
from gateway.policy.conditions import All, Anyone, Claim, Nobody, Role, Scope
from gateway.policy.rules import (
    PolicyError,
    PolicySet,
    Principal,
    Rule,
    RuleLimits,
    load_policy_set,
    parse_policy_files,
)

SHIPPED = Path(__file__).resolve().parents[2] / "policies"

# Verbatim from the wire contract, section 6.
SPEC_EXAMPLE = """\
version: 1
rules:
  - channel: "chat.{room}"          # literal segments and {name} placeholders (one segment each)
    exchange: chat                  # RabbitMQ topic exchange; routing key = channel name
    subscribe: [role:member]        # any one condition suffices
    publish: [role:member]
    limits:
      publish: "10/second"          # token bucket per user on this rule ...
      burst: 20                     # ... holding this many tokens
      max_bytes: 4096               # largest JSON `data` accepted
    history: 1000                   # messages kept for replay with `since`
  - channel: "tenant.{tenant}.feed"
    exchange: feeds
    subscribe: [{all: ["role:member", "claim:tenant={tenant}"]}]
    publish: [nobody]
  - channel: "user.{user}.inbox"
    exchange: notify
    subscribe: ["claim:sub={user}"]
    publish: [nobody]
"""


def who(sub: str = "alice", roles: tuple[str, ...] = (), scope: str = "", **more: Any) -> Principal:
    claims = {"sub": sub, "roles": list(roles), "scope": scope, **more}
    return Principal(sub, frozenset(roles), frozenset(scope.split()), claims)


def one_file(text: str, name: str = "10-test.yaml") -> PolicySet:
    return parse_policy_files({name: textwrap.dedent(text)})


def rules(*lines: str) -> str:
    """A file whose rules are the given flow mappings, one per line (rule N on line N + 2)."""
    return "version: 1\nrules:\n" + "".join(f"  - {line}\n" for line in lines)


ALICE = who("alice", roles=("member",), tenant="acme")
BOB = who("bob", roles=("member",), tenant="globex")
EVE = who("eve")


# ---------------------------------------------------------------- the spec's example


@pytest.mark.parametrize(
    ("principal", "action", "channel", "allowed"),
    [
        (ALICE, "subscribe", "chat.lobby", True),
        (ALICE, "publish", "chat.lobby", True),
        (EVE, "subscribe", "chat.lobby", False),
        (EVE, "publish", "chat.lobby", False),
        (ALICE, "subscribe", "tenant.acme.feed", True),
        (BOB, "subscribe", "tenant.acme.feed", False),
        (who("carol", tenant="acme"), "subscribe", "tenant.acme.feed", False),  # not a member
        (ALICE, "publish", "tenant.acme.feed", False),
        (ALICE, "subscribe", "user.alice.inbox", True),
        (BOB, "subscribe", "user.alice.inbox", False),
        (ALICE, "publish", "user.alice.inbox", False),
        (ALICE, "subscribe", "chat", False),  # fewer segments: no rule
        (ALICE, "subscribe", "chat.lobby.extra", False),  # more segments: no rule
        (ALICE, "subscribe", "other.lobby", False),
    ],
)
def test_spec_example(principal: Principal, action: Any, channel: str, allowed: bool) -> None:
    policies = parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE})
    assert policies.decide(principal, action, channel).allowed is allowed


def test_spec_example_rules_are_parsed_in_full() -> None:
    chat, feed, inbox = parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE}).rules
    assert (chat.index, chat.source, chat.line, chat.number) == (0, "10-spec.yaml", 3, 1)
    assert chat.pattern == "chat.{room}" and chat.exchange == "chat"
    assert chat.subscribe == chat.publish == (Role("member"),)
    assert chat.limits == RuleLimits(publish_per_second=10.0, burst=20, max_bytes=4096)
    assert chat.history == 1000
    assert feed.subscribe == (All((Role("member"), Claim("tenant", "tenant", placeholder=True))),)
    assert feed.publish == (Nobody(),)
    assert (feed.line, feed.index, feed.history, feed.limits) == (12, 1, 100, RuleLimits())
    assert inbox.subscribe == (Claim("sub", "user", placeholder=True),)


# ---------------------------------------------------------------- matching and deciding


def test_first_matching_rule_wins_within_a_file() -> None:
    policies = one_file(
        rules(
            '{channel: "chat.lobby", exchange: chat, subscribe: [nobody]}',
            '{channel: "chat.{room}", exchange: chat, subscribe: [anyone]}',
        )
    )
    lobby = policies.decide(EVE, "subscribe", "chat.lobby")
    assert not lobby.allowed and lobby.rule is policies.rules[0]
    other = policies.decide(EVE, "subscribe", "chat.other")
    assert other.allowed and other.rule is policies.rules[1]
    assert other.bindings == {"room": "other"}


def test_files_are_read_in_name_order_whatever_the_mapping_order() -> None:
    policies = parse_policy_files(
        {
            "20-open.yaml": rules('{channel: "x.{a}", exchange: x, subscribe: [anyone]}'),
            "10-closed.yaml": rules('{channel: "x.{a}", exchange: x, subscribe: [nobody]}'),
        }
    )
    assert policies.files == ("10-closed.yaml", "20-open.yaml")
    assert [r.source for r in policies.rules] == ["10-closed.yaml", "20-open.yaml"]
    assert [r.index for r in policies.rules] == [0, 1]
    assert not policies.decide(ALICE, "subscribe", "x.y").allowed


@pytest.mark.parametrize(
    "channel",
    [
        "nothing.here",
        "chat",
        "",
        "chat.",
        ".chat",
        "chat..x",
        "chat.*",
        "chat.#",
        "chat.a b",
        "chat." + "x" * 200,
        "chat.é",
    ],
)
def test_default_deny_for_unmatched_and_invalid_channels(channel: str) -> None:
    policies = one_file(rules('{channel: "chat.{room}", exchange: chat, subscribe: [anyone]}'))
    decision = policies.decide(ALICE, "subscribe", channel)
    assert decision == policy.Decision(False, None, {}, decision.reason)
    assert decision.reason in ("no rule matches", "invalid channel name")
    assert policies.rule_for(channel) is None


def test_an_empty_set_denies_everything() -> None:
    policies = parse_policy_files({})
    assert policies.rules == () and policies.files == ()
    assert not policies.decide(ALICE, "subscribe", "chat.lobby").allowed
    assert policies.exchanges() == frozenset()


def test_missing_or_empty_condition_lists_mean_nobody() -> None:
    policies = one_file(
        rules(
            '{channel: "a.{x}", exchange: x}',
            '{channel: "b.{x}", exchange: x, subscribe: [], publish: }',
        )
    )
    for channel in ("a.1", "b.1"):
        for action in ("subscribe", "publish"):
            decision = policies.decide(ALICE, action, channel)  # type: ignore[arg-type]
            assert not decision.allowed and decision.rule is not None
            assert decision.reason.endswith(": nobody")


@pytest.mark.parametrize(
    ("condition", "principal", "allowed"),
    [
        ("anyone", EVE, True),
        ("nobody", ALICE, False),
        ("role:member", ALICE, True),
        ("role:member", EVE, False),
        ("role:admin", ALICE, False),
        ("scope:publish", who(scope="read publish"), True),
        ("scope:publish", who(scope="read publisher"), False),
        ("scope:read:messages", who(scope="read:messages"), True),
        ("claim:tenant=acme", ALICE, True),
        ("claim:tenant=acme", BOB, False),
        ("claim:tenant=acme", EVE, False),  # absent claim
        ("claim:tenant={room}", ALICE, False),  # bound to "lobby"
        ("claim:org={room}", who(org="lobby"), True),
        ("claim:level=3", who(level=3), True),  # an int claim compares by its text
        ("claim:verified=True", who(verified=True), False),  # never on bools
        ("claim:org=lobby", who(org=["lobby"]), False),  # never on lists
        ("claim:org=lobby", who(org={"lobby": 1}), False),
        ("claim:org=None", who(org=None), False),
        ("claim:sub={room}", who("lobby"), True),
        (
            "claim:https://example.com/team=red",
            Principal("al", frozenset(), frozenset(), {"https://example.com/team": "red"}),
            True,
        ),
        ({"all": ["role:member", "claim:tenant=acme"]}, ALICE, True),
        ({"all": ["role:member", "claim:tenant=acme"]}, BOB, False),
        (
            {"all": ["role:member", {"all": ["anyone", "claim:org={room}"]}]},
            who(roles=("member",), org="lobby"),
            True,
        ),
        ({"all": ["role:member", {"all": ["anyone", "nobody"]}]}, ALICE, False),
    ],
)
def test_each_condition_kind(condition: Any, principal: Principal, allowed: bool) -> None:
    text = yaml.safe_dump(
        {
            "version": 1,
            "rules": [{"channel": "chat.{room}", "exchange": "chat", "subscribe": [condition]}],
        }
    )
    policies = parse_policy_files({"t.yaml": text})
    assert policies.decide(principal, "subscribe", "chat.lobby").allowed is allowed


def test_any_one_condition_of_the_list_suffices() -> None:
    policies = one_file(
        rules('{channel: "p.{t}", exchange: p, publish: ["scope:publish", role:member]}')
    )
    assert policies.decide(who(scope="publish"), "publish", "p.news").allowed
    assert policies.decide(ALICE, "publish", "p.news").allowed
    assert not policies.decide(EVE, "publish", "p.news").allowed


def test_claim_sub_uses_the_verified_subject() -> None:
    inbox = one_file(
        rules('{channel: "user.{user}.inbox", exchange: n, subscribe: ["claim:sub={user}"]}')
    )
    assert inbox.decide(who("alice"), "subscribe", "user.alice.inbox").allowed
    assert not inbox.decide(who("alice"), "subscribe", "user.bob.inbox").allowed
    # The claims mapping cannot disagree with the verified ``sub``.
    forged = Principal("alice", frozenset(), frozenset(), {"sub": "bob"})
    assert not inbox.decide(forged, "subscribe", "user.bob.inbox").allowed


def test_decision_reasons_name_rule_and_condition() -> None:
    policies = parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE})
    assert policies.decide(ALICE, "publish", "chat.lobby").reason == (
        "rule 10-spec.yaml#1 chat.{room}: role:member"
    )
    assert policies.decide(EVE, "publish", "chat.lobby").reason == (
        "rule 10-spec.yaml#1 chat.{room}: no condition holds"
    )
    assert policies.decide(ALICE, "publish", "user.alice.inbox").reason.endswith(": nobody")
    assert policies.decide(ALICE, "publish", "nope").reason == "no rule matches"


def test_unknown_action_is_a_programming_error() -> None:
    policies = parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE})
    with pytest.raises(ValueError):
        policies.decide(ALICE, "Publish", "chat.lobby")  # type: ignore[arg-type]


def test_rule_match_binds_placeholders() -> None:
    rule = Rule(0, "t.yaml", 3, "tenant.{tenant}.room.{room}", "x")
    assert rule.match("tenant.acme.room.lobby") == {"tenant": "acme", "room": "lobby"}
    assert rule.match("tenant.acme.hall.lobby") is None
    assert rule.match("tenant.acme.room") is None
    assert rule.match("tenant.acme.room.*") is None
    assert rule.match("tenant..room.lobby") is None


def test_rule_for_hands_out_copies_and_keeps_its_cache_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(policy, "CACHE_SIZE", 5)
    policies = one_file(rules('{channel: "chat.{room}", exchange: chat, subscribe: [anyone]}'))
    hit = policies.rule_for("chat.lobby")
    assert hit is not None
    hit[1]["room"] = "tampered"
    assert policies.rule_for("chat.lobby") == (policies.rules[0], {"room": "lobby"})
    for n in range(50):
        policies.rule_for(f"chat.r{n}")
        policies.rule_for(f"none.r{n}")
        policies.rule_for("x" * 300 + str(n))  # invalid: never cached
        assert len(policies._cache) <= 5
    assert policies.rule_for("none.r1") is None


def test_exchanges_lists_each_once() -> None:
    policies = parse_policy_files(
        {"10-spec.yaml": SPEC_EXAMPLE, "20.yaml": rules('{channel: "more.{x}", exchange: chat}')}
    )
    assert policies.exchanges() == frozenset({"chat", "feeds", "notify"})


# ---------------------------------------------------------------- limits and history


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ('{publish: "10/second"}', RuleLimits(10.0, 10, None)),
        ('{publish: "10 per second"}', RuleLimits(10.0, 10, None)),
        ('{publish: "600/minute"}', RuleLimits(10.0, 10, None)),
        ('{publish: "5/hour"}', RuleLimits(5 / 3600, 1, None)),
        ('{publish: "1/day", burst: 3}', RuleLimits(1 / 86400, 3, None)),
        ('{publish: "2.5/seconds"}', RuleLimits(2.5, 3, None)),
        ('{publish: "90/Minute", max_bytes: 1}', RuleLimits(1.5, 2, 1)),
        ("{max_bytes: 4096}", RuleLimits(None, None, 4096)),
        ("{}", RuleLimits()),
        ("", RuleLimits()),
    ],
)
def test_limits(limits: str, expected: RuleLimits) -> None:
    rule = one_file(rules(f'{{channel: "a.{{x}}", exchange: x, limits: {limits}}}')).rules[0]
    assert rule.limits == expected


@pytest.mark.parametrize(
    ("history", "expected"), [("", 100), ("history: 0,", 0), ("history: 1000000,", 1_000_000)]
)
def test_history(history: str, expected: int) -> None:
    rule = one_file(rules(f'{{{history} channel: "a.{{x}}", exchange: x}}')).rules[0]
    assert rule.history == expected


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        ("{exchange: x}", "channel", "missing"),
        ('{channel: "a.{x}"}', "exchange", "missing"),
        (
            '{channel: "a.{x}", exchange: x, subscibe: [anyone]}',
            "subscibe",
            "did you mean 'subscribe'",
        ),
        ('{channel: "a.{x}", exchange: x, limit: {}}', "limit", "did you mean 'limits'"),
        ('{channel: "a.*", exchange: x}', "channel", "wildcards"),
        ('{channel: "a.#", exchange: x}', "channel", "wildcards"),
        ('{channel: "a..b", exchange: x}', "channel", "bad segment ''"),
        ('{channel: "a.", exchange: x}', "channel", "bad segment"),
        ('{channel: "a.b c", exchange: x}', "channel", "bad segment"),
        ('{channel: "a.é", exchange: x}', "channel", "bad segment"),
        ('{channel: "a.{x", exchange: x}', "channel", "bad segment '{x'"),
        ('{channel: "a.{1x}", exchange: x}', "channel", "bad segment"),
        ('{channel: "a.x{y}", exchange: x}', "channel", "bad segment"),
        ('{channel: "a.{x}.{x}", exchange: x}', "channel", "{x} appears twice"),
        ('{channel: "' + "a." * 100 + 'b", exchange: x}', "channel", "longer than 200 bytes"),
        ("{channel: 12, exchange: x}", "channel", "must be a channel pattern"),
        ('{channel: "", exchange: x}', "channel", "must be a channel pattern"),
        ('{channel: "a.{x}", exchange: ""}', "exchange", "not the default one"),
        ('{channel: "a.{x}", exchange: 7}', "exchange", "must name a RabbitMQ exchange"),
        ('{channel: "a.{x}", exchange: amq.topic}', "exchange", "reserved"),
        ('{channel: "a.{x}", exchange: AMQ.direct}', "exchange", "reserved"),
        ('{channel: "a.{x}", exchange: "a b"}', "exchange", "bad exchange name"),
        ('{channel: "a.{x}", exchange: "a/b"}', "exchange", "bad exchange name"),
        ('{channel: "a.{x}", exchange: ' + "e" * 128 + "}", "exchange", "longer than 127"),
        ('{channel: "a.{x}", exchange: x, subscribe: anyone}', "subscribe", "must be a list"),
        (
            '{channel: "a.{x}", exchange: x, subscribe: [rol:member]}',
            "subscribe",
            "unknown condition 'rol:member'",
        ),
        ('{channel: "a.{x}", exchange: x, subscribe: [Anyone]}', "subscribe", "unknown condition"),
        ('{channel: "a.{x}", exchange: x, subscribe: ["role:"]}', "subscribe", "unknown condition"),
        (
            '{channel: "a.{x}", exchange: x, subscribe: ["role:a b"]}',
            "subscribe",
            "unknown condition",
        ),
        ('{channel: "a.{x}", exchange: x, subscribe: [7]}', "subscribe", "must be a string"),
        (
            '{channel: "a.{x}", exchange: x, publish: [role: member]}',
            "publish",
            "did you mean 'role:member'",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: ["claim:sub={user}"]}',
            "subscribe",
            "placeholder {user} is not in the channel pattern",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: [{all: [anyone, "claim:t={y}"]}]}',
            "subscribe",
            "placeholder {y}",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: ["claim:sub={x"]}',
            "subscribe",
            "bad claim value",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: ["claim:sub=a b"]}',
            "subscribe",
            "bad claim value",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: ["claim:sub="]}',
            "subscribe",
            "unknown condition",
        ),
        ('{channel: "a.{x}", exchange: x, subscribe: [{all: []}]}', "subscribe", "non-empty list"),
        (
            '{channel: "a.{x}", exchange: x, subscribe: [{all: anyone}]}',
            "subscribe",
            "non-empty list",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: [{any: [anyone]}]}',
            "subscribe",
            "unknown condition",
        ),
        (
            '{channel: "a.{x}", exchange: x, subscribe: [{all: [anyone], x: 1}]}',
            "subscribe",
            "unknown condition",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publsh: "1/second"}}',
            "limits.publsh",
            "did you mean 'publish'",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publish: "0/second"}}',
            "limits.publish",
            "more than 0",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publish: "-1/second"}}',
            "limits.publish",
            "must be a rate",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publish: "10/fortnight"}}',
            "limits.publish",
            "must be a rate",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publish: 10}}',
            "limits.publish",
            "must be a rate",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publish: "1e9/second"}}',
            "limits.publish",
            "must be a rate",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {burst: 5}}',
            "limits.burst",
            "needs a 'publish' rate",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {publish: "1/second", burst: 0}}',
            "limits.burst",
            "from 1 to",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {max_bytes: -1}}',
            "limits.max_bytes",
            "from 1 to",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {max_bytes: true}}',
            "limits.max_bytes",
            "from 1 to",
        ),
        (
            '{channel: "a.{x}", exchange: x, limits: {max_bytes: 1.5}}',
            "limits.max_bytes",
            "from 1 to",
        ),
        ('{channel: "a.{x}", exchange: x, limits: [1]}', "limits", "must be a mapping"),
        ('{channel: "a.{x}", exchange: x, history: -1}', "history", "from 0 to 1000000"),
        ('{channel: "a.{x}", exchange: x, history: 1000001}', "history", "from 0 to"),
        ('{channel: "a.{x}", exchange: x, history: "100"}', "history", "from 0 to"),
        ('{channel: "a.{x}", exchange: x, history: yes}', "history", "from 0 to"),
    ],
)
def test_rule_validation_errors_name_file_line_rule_and_field(
    rule: str, field: str, message: str
) -> None:
    text = rules('{channel: "ok.{x}", exchange: ok}', rule)  # the bad rule is rule 2, line 4
    with pytest.raises(PolicyError) as caught:
        parse_policy_files({"10-chat.yaml": text}, base="policies")
    error = caught.value
    assert (error.file, error.line, error.rule, error.field) == (
        "policies/10-chat.yaml",
        4,
        2,
        field,
    )
    assert str(error).startswith("policies/10-chat.yaml:4: rule 2")
    assert f"field '{field}': " in str(error)
    assert message in str(error)


def test_error_names_the_pattern_and_the_line_of_the_field() -> None:
    text = """\
        version: 1
        rules:
          - channel: "ok.{x}"
            exchange: ok
          - channel: "chat.{room}"
            exchange: chat

            subscribe: [rol:member]
        """
    with pytest.raises(PolicyError) as caught:
        one_file(text, name="10-chat.yaml")
    assert str(caught.value) == (
        "10-chat.yaml:8: rule 2 (chat.{room}): field 'subscribe': unknown condition "
        "'rol:member' (expected anyone, nobody, role:NAME, scope:NAME, claim:NAME=VALUE "
        "or {all: [...]})"
    )


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        ("", 1, None, "the file is empty"),
        ("# only a comment\n", 1, None, "the file is empty"),
        ("- a\n", 1, None, "must be a mapping"),
        ("just words\n", 1, None, "must be a mapping"),
        ("rules: []\n", 1, "version", "missing top-level 'version'"),
        ("version: 1\n", 1, "rules", "missing top-level 'rules'"),
        ("version: 2\nrules: []\n", 1, "version", "must be 1"),
        ("version: '1'\nrules: []\n", 1, "version", "must be 1"),
        ("version: true\nrules: []\n", 1, "version", "must be 1"),
        ("version: 1\nrules: []\nrule: []\n", 3, "rule", "did you mean 'rules'"),
        ("version: 1\nrules: {channel: a}\n", 2, "rules", "must be a list of rules"),
        ("version: 1\nrules:\n", 2, "rules", "must be a list of rules"),
        ("version: 1\nrules: []\nrules: []\n", 3, None, "duplicate key 'rules'"),
        ("version: 1\n1: x\nrules: []\n", 2, None, "keys must be plain words"),
        ("version: 1\nrules: [\n", 3, None, "not valid YAML"),
        ("version: 1\nrules: []\n---\nversion: 1\n", 3, None, "not valid YAML"),
        ("version: 1\nrules:\n  - just a string\n", 3, None, "a rule must be a mapping"),
    ],
)
def test_file_validation_errors(text: str, line: int, field: str | None, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy_files({"10-x.yaml": text})
    error = caught.value
    assert (error.file, error.line, error.field) == ("10-x.yaml", line, field)
    assert str(error).startswith(f"10-x.yaml:{line}: ")
    assert message in str(error)


def test_duplicate_keys_in_a_rule_are_refused() -> None:
    text = (
        "version: 1\nrules:\n  - channel: a\n    exchange: x\n    subscribe: [anyone]\n"
        "    subscribe: [nobody]\n"
    )
    with pytest.raises(PolicyError, match=r"^10-x.yaml:6: rule 1: duplicate key 'subscribe'"):
        parse_policy_files({"10-x.yaml": text})


def test_one_bad_file_rejects_the_whole_set() -> None:
    with pytest.raises(PolicyError, match=r"^20-bad.yaml:3: rule 1"):
        parse_policy_files({"10-good.yaml": SPEC_EXAMPLE, "20-bad.yaml": rules("{channel: a}")})


def test_zero_rules_is_valid_but_denies_all() -> None:
    policies = parse_policy_files({"10-empty.yaml": "version: 1\nrules: []\n"})
    assert policies.rules == () and policies.files == ("10-empty.yaml",)
    assert not policies.decide(ALICE, "subscribe", "chat.lobby").allowed


def test_too_many_rules() -> None:
    text = rules(*(f'{{channel: "r{n}", exchange: x}}' for n in range(policy.MAX_RULES + 1)))
    with pytest.raises(PolicyError, match="more than 1000 rules"):
        parse_policy_files({"10-x.yaml": text})


# ---------------------------------------------------------------- hostile YAML


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run hostile-input tests with both the C parser and the pure-Python fallback."""
    if request.param == "pure-python":
        monkeypatch.setattr(policy, "_Loader", yaml.SafeLoader)
    elif not hasattr(yaml, "CSafeLoader"):
        pytest.skip("libyaml not installed")


BILLION_LAUGHS = """\
version: 1
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
rules: *i
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('!!python/object/apply:os.system ["echo pwned"]\n', "YAML tags"),
        ("version: 1\nrules: !!python/object/new:builtins.list [[]]\n", "YAML tags"),
        ("version: 1\nrules:\n  - channel: !!python/name:os.system\n", "YAML tags"),
        ("version: !custom 1\nrules: []\n", "YAML tags"),
        ("version: !!int 1\nrules: []\n", "YAML tags"),
        ("version: 1\nrules: !!set {a, b}\n", "YAML tags"),
        (BILLION_LAUGHS, "anchors and aliases"),
        ("version: 1\nrules:\n  - &r {channel: a, exchange: x}\n  - *r\n", "anchors and aliases"),
        ("version: 1\nrules:\n  - {<<: {channel: a}, exchange: x}\n", "cannot read the value"),
        # libyaml stops this one itself, at depth 1000
        ("version: 1\nrules: " + "[" * 10_000 + "]" * 10_000 + "\n", "levels deep|nesting depth"),
        ("version: 1\nrules:\n  - {" + "a: {" * 50 + "}" * 51 + "\n", "levels deep"),
        ("version: 1\nrules: [" + "1, " * 60_000 + "1]\n", "more than 50000 YAML values"),
        (
            "version: 1\nrules:\n  - {channel: a, exchange: x, history: " + "9" * 5000 + "}\n",
            "cannot read the value",
        ),
        ("version: 1\nrules: []\nx: \x00\n", "character #x0000 is not allowed"),
        ("version: 1\nrules: []\n" + "#" * (policy.MAX_FILE_BYTES + 1), "larger than"),
    ],
)
def test_hostile_yaml_is_refused_quickly(yaml_loader: None, text: str, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(PolicyError, match=message):
        parse_policy_files({"10-evil.yaml": text})
    assert time.perf_counter() - started < 5


def test_an_oversized_channel_value_is_refused(yaml_loader: None) -> None:
    text = rules('{channel: "' + "a" * 500_000 + '", exchange: x}')
    with pytest.raises(PolicyError, match="longer than 200 bytes"):
        parse_policy_files({"10-evil.yaml": text})


def test_error_messages_do_not_echo_huge_input() -> None:
    text = rules('{channel: "a.{x}", exchange: x, subscribe: ["' + "r" * 100_000 + '"]}')
    with pytest.raises(PolicyError) as caught:
        parse_policy_files({"10-evil.yaml": text})
    assert len(str(caught.value)) < 400


# ---------------------------------------------------------------- lint


def lint_texts(policies: PolicySet) -> list[str]:
    return [str(w) for w in policies.lint()]


def test_lint_finds_a_shadowed_rule() -> None:
    policies = parse_policy_files(
        {
            "10-a.yaml": rules(
                '{channel: "chat.{room}", exchange: chat, subscribe: [anyone]}',
                '{channel: "chat.lobby", exchange: chat, subscribe: [role:member]}',
            ),
            "20-b.yaml": rules(
                '{channel: "chat.{other}", exchange: chat, subscribe: [anyone]}',
                '{channel: "chat.{room}.log", exchange: chat, subscribe: [anyone]}',
            ),
        }
    )
    warnings = policies.lint()
    assert [(w.file, w.line, w.rule) for w in warnings] == [
        ("10-a.yaml", 4, "10-a.yaml#2 (chat.lobby)"),
        ("20-b.yaml", 3, "20-b.yaml#1 (chat.{other})"),
    ]
    assert all("can never match: rule 10-a.yaml#1 (chat.{room})" in w.text for w in warnings)
    assert str(warnings[0]).startswith("10-a.yaml:4: rule 10-a.yaml#2 (chat.lobby): can never")


@pytest.mark.parametrize(
    ("first", "second", "shadowed"),
    [
        ("a.{x}", "a.b", True),
        ("a.b", "a.b", True),
        ("{x}.{y}", "a.b", True),
        ("{x}.b", "a.{y}", False),  # a.c matches only the second
        ("a.b", "a.{x}", False),  # the specific rule first: the usual, correct order
        ("a.{x}", "a.{x}.c", False),
        ("a.{x}.c", "a.b.c", True),
        ("a.{x}.c", "a.b.d", False),
    ],
)
def test_lint_shadow_table(first: str, second: str, shadowed: bool) -> None:
    policies = one_file(
        rules(
            f'{{channel: "{first}", exchange: x, subscribe: [anyone]}}',
            f'{{channel: "{second}", exchange: x, subscribe: [anyone]}}',
        )
    )
    assert any("can never match" in text for text in lint_texts(policies)) is shadowed


def test_lint_shadow_check_stays_fast_with_many_rules() -> None:
    text = rules(
        *(
            f'{{channel: "a.{{x}}.c{n}", exchange: x, subscribe: [anyone]}}'
            for n in range(policy.MAX_RULES)
        )
    )
    policies = one_file(text)
    started = time.perf_counter()
    assert policies.lint() == []
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    "conditions",
    [
        "",
        "subscribe: [], publish: [],",
        "subscribe: [nobody], publish: [nobody],",
        "subscribe: [{all: [anyone, nobody]}], publish: [nobody, nobody],",
    ],
)
def test_lint_finds_a_rule_nobody_can_use(conditions: str) -> None:
    policies = one_file(rules(f'{{{conditions} channel: "a.{{x}}", exchange: x}}'))
    (warning,) = policies.lint()
    assert (warning.file, warning.line) == ("10-test.yaml", 3)
    assert warning.rule == "10-test.yaml#1 (a.{x})"
    assert "nobody may subscribe or publish" in warning.text


def test_lint_warns_about_unlimited_open_publishing() -> None:
    policies = one_file(rules('{channel: "a.{x}", exchange: x, publish: [anyone]}'))
    assert ["anyone may publish" in text for text in lint_texts(policies)] == [True]
    limited = one_file(
        rules('{channel: "a.{x}", exchange: x, publish: [anyone], limits: {publish: "1/second"}}')
    )
    assert limited.lint() == []


def test_lint_warns_about_an_empty_set() -> None:
    (warning,) = parse_policy_files({}).lint()
    assert "no rules" in warning.text


def test_lint_is_quiet_on_the_spec_example() -> None:
    assert parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE}).lint() == []


# ---------------------------------------------------------------- explain


def test_explain_renders_the_deciding_rule_and_each_condition() -> None:
    policies = parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE})
    explanation = policies.explain(BOB, "subscribe", "tenant.acme.feed")
    assert not explanation.allowed
    assert explanation.decision == policies.decide(BOB, "subscribe", "tenant.acme.feed")
    (check,) = explanation.checks
    assert (check.condition, check.passed) == ("all of", False)
    assert [(c.condition, c.passed) for c in check.children] == [
        ("role:member", True),
        ("claim:tenant={tenant}", False),
    ]
    text = explanation.render()
    assert "rule: 10-spec.yaml#2 at 10-spec.yaml:12, channel 'tenant.{tenant}.feed'" in text
    assert "bindings: tenant=acme" in text
    assert "    [no]  all of\n" in text
    assert "          [yes] role:member  (roles: member)\n" in text
    assert "          [no]  claim:tenant={tenant}  (needs 'acme', token has 'globex')\n" in text
    assert text.endswith(
        "verdict: DENIED (rule 10-spec.yaml#2 tenant.{tenant}.feed: no condition holds)"
    )


def test_explain_an_allowed_request_and_every_condition_evaluated() -> None:
    policies = one_file(
        rules('{channel: "p.{t}", exchange: p, publish: [role:member, "scope:publish", nobody]}')
    )
    explanation = policies.explain(ALICE, "publish", "p.news")
    assert explanation.allowed
    assert [(c.condition, c.passed) for c in explanation.checks] == [
        ("role:member", True),
        ("scope:publish", False),
        ("nobody", False),
    ]
    text = explanation.render()
    assert "[yes] role:member" in text and "[no]  scope:publish  (scopes: none)" in text
    assert "verdict: ALLOWED (rule 10-test.yaml#1 p.{t}: role:member)" in text


def test_explain_when_no_rule_matches() -> None:
    explanation = parse_policy_files({}).explain(ALICE, "subscribe", "chat.lobby")
    assert explanation.checks == () and explanation.decision.rule is None
    assert "rule: none matches (default deny)" in explanation.render()
    assert "verdict: DENIED (no rule matches)" in explanation.render()


# ---------------------------------------------------------------- digest


def test_digest_follows_meaning_not_formatting() -> None:
    base = parse_policy_files({"10-spec.yaml": SPEC_EXAMPLE}).digest
    assert len(base) == 64 and int(base, 16) >= 0
    commented = "# a comment\n" + SPEC_EXAMPLE.replace("    history: 1000", "    history:  1000")
    assert parse_policy_files({"10-spec.yaml": commented}).digest == base
    changed = SPEC_EXAMPLE.replace("history: 1000", "history: 999")
    assert parse_policy_files({"10-spec.yaml": changed}).digest != base
    renamed = parse_policy_files({"11-spec.yaml": SPEC_EXAMPLE}).digest
    assert renamed != base


# ---------------------------------------------------------------- the folder


def test_load_policy_set_reads_yaml_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "20-b.yaml").write_text(rules('{channel: "b.{x}", exchange: b}'))
    (tmp_path / "10-a.yaml").write_text(rules('{channel: "a.{x}", exchange: a}'))
    (tmp_path / "30-c.yml").write_text("not: read")
    (tmp_path / ".#10-a.yaml").write_text("editor lock file: not read")
    (tmp_path / "README.md").write_text("not read")
    policies = load_policy_set(tmp_path)
    assert policies.files == ("10-a.yaml", "20-b.yaml")
    assert [r.pattern for r in policies.rules] == ["a.{x}", "b.{x}"]


def test_load_policy_set_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text(rules('{channel: "a.{x}", exchange: amq.fanout}'))
    with pytest.raises(PolicyError, match=rf"^{tmp_path}/10-a.yaml:3: rule 1 \(a.{{x}}\)"):
        load_policy_set(tmp_path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p / "10-a.yaml").write_bytes(b"#" * (policy.MAX_FILE_BYTES + 1)), "larger"),
        (lambda p: (p / "10-a.yaml").write_bytes(b"version: 1\nrules: [\xff]\n"), "not UTF-8"),
        (lambda p: (p / "10-a.yaml").mkdir(), "not a regular file"),
    ],
)
def test_load_policy_set_refuses_unreadable_files(tmp_path: Path, make: Any, message: str) -> None:
    make(tmp_path)
    with pytest.raises(PolicyError, match=message):
        load_policy_set(tmp_path)


def test_load_policy_set_needs_the_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policies folder"):
        load_policy_set(tmp_path / "missing")


def test_an_empty_folder_denies_everything(tmp_path: Path) -> None:
    policies = load_policy_set(tmp_path)
    assert policies.rules == () and len(policies.lint()) == 1


# ---------------------------------------------------------------- the shipped examples


def test_shipped_policies_load_and_are_lint_clean() -> None:
    policies = load_policy_set(SHIPPED)
    assert policies.files == ("10-chat.yaml", "20-inbox.yaml", "30-tenants.yaml")
    assert policies.lint() == []
    assert policies.exchanges() == frozenset({"chat", "notify", "feeds", "public", "demo"})


@pytest.mark.parametrize(
    ("principal", "action", "channel", "allowed"),
    [
        (ALICE, "publish", "chat.lobby", True),
        (EVE, "subscribe", "chat.lobby", False),
        (EVE, "subscribe", "public.news", True),
        (EVE, "publish", "public.news", False),
        (who("svc", scope="read publish"), "publish", "public.news", True),
        (ALICE, "publish", "public.news", True),
        (EVE, "publish", "demo.anything", True),
        (EVE, "subscribe", "user.eve.inbox", True),
        (EVE, "subscribe", "user.alice.inbox", False),
        (EVE, "publish", "user.eve.inbox", False),
        (ALICE, "subscribe", "tenant.acme.feed", True),
        (ALICE, "subscribe", "tenant.globex.feed", False),
        (who("mallory", tenant="acme"), "subscribe", "tenant.acme.feed", False),
        (ALICE, "publish", "tenant.acme.feed", False),
        (ALICE, "subscribe", "admin.secrets", False),
    ],
)
def test_shipped_policies_decide_as_documented(
    principal: Principal, action: Any, channel: str, allowed: bool
) -> None:
    assert load_policy_set(SHIPPED).decide(principal, action, channel).allowed is allowed


def test_shipped_policies_have_limits_on_open_rules() -> None:
    policies = load_policy_set(SHIPPED)
    demo = policies.rule_for("demo.x")
    assert demo is not None and demo[0].limits.publish_per_second is not None
    assert demo[0].publish == (Anyone(),) and demo[0].limits.max_bytes
    public = policies.rule_for("public.news")
    assert public is not None and public[0].publish == (Scope("publish"), Role("member"))

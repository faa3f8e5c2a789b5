"""Presence in policy rules (spec section 11): `presence` and `presence_events`."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from gateway.policy.rules import PolicyError, PolicySet, Principal, parse_policy_files


def who(sub: str = "alice", roles: tuple[str, ...] = ()) -> Principal:
    claims: dict[str, Any] = {"sub": sub, "roles": list(roles)}
    return Principal(sub, frozenset(roles), frozenset(), claims)


def one_rule(extra: str) -> PolicySet:
    text = textwrap.dedent(
        """\
        version: 1
        rules:
          - channel: "room.{room}"
            exchange: rooms
            subscribe: [role:member]
            publish: [role:member]
        """
    )
    return parse_policy_files({"10-room.yaml": text + textwrap.indent(extra, "    ")})


@pytest.mark.parametrize(
    ("extra", "principal", "allowed"),
    [
        ("", who(roles=("member",)), False),  # default: nobody
        ("presence: [role:member]\n", who(roles=("member",)), True),
        ("presence: [role:member]\n", who(roles=("guest",)), False),
        ("presence: [nobody]\n", who(roles=("member",)), False),
        ('presence: ["claim:sub={room}"]\n', who("lobby"), True),
        ('presence: ["claim:sub={room}"]\n', who("bob"), False),
    ],
)
def test_presence_is_decided_like_subscribe_and_defaults_to_nobody(
    extra: str, principal: Principal, allowed: bool
) -> None:
    decision = one_rule(extra).decide(principal, "presence", "room.lobby")
    assert decision.allowed is allowed


def test_presence_events_default_off_and_can_be_turned_on() -> None:
    assert one_rule("").rules[0].presence_events is False
    assert one_rule("presence_events: true\n").rules[0].presence_events is True


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ("presence_events: yes please\n", "presence_events", "must be true or false"),
        ("presence_events: 1\n", "presence_events", "must be true or false"),
        ("presence: role:member\n", "presence", "must be a list of conditions"),
        ('presence: ["role:"]\n', "presence", "role"),
        ('presence: ["claim:sub={user}"]\n', "presence", "placeholder {user}"),
        ("presense: [anyone]\n", "presense", "did you mean 'presence'"),
    ],
)
def test_presence_fields_are_validated(extra: str, field: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        one_rule(extra)
    assert caught.value.field == field
    assert message in str(caught.value)


def test_lint_warns_about_open_presence_and_events_nobody_can_receive() -> None:
    texts = [w.text for w in one_rule("presence: [anyone]\n").lint()]
    assert "anyone may list who is subscribed (presence: [anyone])" in texts
    text = textwrap.dedent(
        """\
        version: 1
        rules:
          - channel: "room.{room}"
            exchange: rooms
            subscribe: [nobody]
            publish: [role:member]
            presence_events: true
        """
    )
    texts = [w.text for w in parse_policy_files({"10.yaml": text}).lint()]
    assert "presence_events is on but nobody may subscribe to receive them" in texts


def test_presence_changes_the_digest() -> None:
    assert one_rule("").digest != one_rule("presence: [role:member]\n").digest
    assert one_rule("").digest != one_rule("presence_events: true\n").digest


def test_explain_presence_names_each_condition() -> None:
    policies = one_rule("presence: [role:admin, role:member]\n")
    text = policies.explain(who(roles=("member",)), "presence", "room.lobby").render()
    assert "presence is allowed when any one holds" in text
    assert "[yes] role:member" in text
    assert "verdict: ALLOWED" in text

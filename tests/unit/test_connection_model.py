"""The connection model's decisions without I/O: Gate, Session and Node.

Like websockets' sans-I/O protocol tests: the core is driven with plain
values through a recording ``Transport`` and a stand-in broker (the real one
is tested against RabbitMQ in tests/integration), and every answer, close
and traffic event is read back. Real policies, real limiter (local buckets),
real token verifier (HS256).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import orjson
import pytest

from gateway.auth.principal import AuthError, Principal
from gateway.auth.tokens import TokenVerifier
from gateway.broker.broker import Delivery
from gateway.config import JwtSettings, LimitSettings, Settings
from gateway.core.gate import Denied, Gate, Refused
from gateway.core.node import Node
from gateway.core.session import Session
from gateway.core.transport import SendBuffer, Subscriber, Transport, TransportKind, send_each
from gateway.devtools.devtokens import mint_token
from gateway.limits.limiter import Slot
from gateway.limits.restrictions import Rule as Restriction
from gateway.policy.rules import parse_policy_files
from gateway.protocol.codes import CLOSE_AUTH, CLOSE_BANNED, CLOSE_POLICY
from gateway.protocol.frames import Auth, FrameError, Ping, Publish, Subscribe, Unsubscribe
from gateway.telemetry.events import TrafficEvent

POLICIES = """\
version: 1
rules:
  - channel: "chat.{room}"
    exchange: t.chat
    subscribe: [role:member]
    publish: [role:member]
    limits: {max_bytes: 16}
    history: 10
  - channel: "secret.{x}"
    exchange: t.secret
    subscribe: [role:admin]
    publish: [nobody]
"""
REVOKED = POLICIES.replace("subscribe: [role:member]", "subscribe: [role:admin]")
JWT = JwtSettings(algorithms=("HS256",), secret=secrets.token_hex(32), leeway_seconds=0)


class RecordingTransport:
    """A Transport that keeps what the core wrote and how it closed."""

    kind: TransportKind = "stomp"

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.reading = True

    def send(self, frame: bytes) -> bool:
        self.frames.append(orjson.loads(frame))
        return True

    def send_many(self, frames: list[bytes]) -> int:
        return sum(1 for frame in frames if self.send(frame))

    def pending(self) -> tuple[int, int]:
        return 0, 0

    def close(self, code: int, reason: str) -> asyncio.Task[None] | None:
        self.closed = (code, reason)
        return None

    async def close_flooded(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def stop_reading(self) -> None:
        self.reading = False

    @property
    def open(self) -> bool:
        return self.closed is None


class StandInBroker:
    """What the node asks of its broker, answered at once."""

    user = "guest"
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes]] = []
        self.followed: list[str] = []

    async def follow(self, exchange: str) -> None:
        self.followed.append(exchange)

    async def unfollow(self, exchange: str) -> None:
        pass

    def position(self, exchange: str) -> int | None:
        return 41

    async def declare(self, exchanges: Iterable[str]) -> None:
        pass

    def send(self, exchange: str, channel: str, body: bytes, props: bytes) -> asyncio.Future[None]:
        self.sent.append((exchange, channel, body))
        confirm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        confirm.set_result(None)
        return confirm

    async def close(self) -> None:
        pass


class Parts:
    def __init__(self, **limits: Any) -> None:
        settings = Settings(jwt=JWT, limits=replace(LimitSettings(), **limits))
        self.node = Node(settings, parse_policy_files({"p.yaml": POLICIES}))
        self.broker = StandInBroker()
        self.node.broker = self.broker  # type: ignore[assignment]
        self.verifier = TokenVerifier(JWT)
        self.gate = Gate(self.node, self.verifier)
        self.events: list[TrafficEvent] = []
        self.node.events.subscribe(self.events.append)

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(e.kind, e.detail) for e in self.events]

    def session(self, sub: str = "ann", roles: tuple[str, ...] = ("member",)) -> Session:
        self.transport = RecordingTransport()
        principal = who(sub, roles)
        session = Session(self.gate, self.transport, principal, "10.0.0.1")
        self.node.sessions.add(session)
        return session


def who(sub: str, roles: tuple[str, ...] = ()) -> Principal:
    return Principal.from_claims({"sub": sub, "roles": list(roles)})


def token(sub: str = "ann", roles: tuple[str, ...] = ("member",), ttl: float = 600) -> str:
    return mint_token(JWT, sub=sub, roles=list(roles), ttl_seconds=ttl)


# --- Gate: who may connect -------------------------------------------------------


async def test_admit_lets_an_address_in_and_gives_a_slot_back() -> None:
    parts = Parts(max_connections_per_address=1)
    slot = await parts.gate.admit("10.0.0.1")
    assert isinstance(slot, Slot)
    again = await parts.gate.admit("10.0.0.1")
    assert isinstance(again, Refused) and again.reason == "rate_limited"
    assert (again.http_status, again.limit is not None) == (429, True)
    parts.gate.release(slot)
    assert isinstance(await parts.gate.admit("10.0.0.1"), Slot)
    assert parts.kinds() == [("rate_limited", "connections_per_address")]


async def test_a_banned_address_is_refused_before_any_limit() -> None:
    parts = Parts()
    parts.node.restrictions.add(Restriction("address", "10.0.0.9", "ban", 2e9))
    refused = await parts.gate.admit("10.0.0.9")
    assert isinstance(refused, Refused)
    assert (refused.reason, refused.http_status, refused.close_code) == ("banned", 403, 4403)
    assert parts.kinds() == [("banned", "403")]


@pytest.mark.parametrize(
    ("credentials", "reason"),
    [
        ("not-a-jwt", "malformed"),
        (AuthError("malformed", "Authorization must be 'Bearer <token>'"), "malformed"),
        (AuthError("missing"), "missing"),
    ],
)
async def test_a_refused_token_is_recorded_against_the_address(
    credentials: str | AuthError, reason: str
) -> None:
    parts = Parts(auth_failures_burst=1, auth_failures_per_minute_per_address=0.001)
    await parts.verifier.start()
    refused = await parts.gate.authenticate(credentials, "10.0.0.2", "stomp")
    assert isinstance(refused, Refused)
    assert (refused.reason, refused.auth_reason) == ("unauthorized", reason)
    assert (refused.http_status, refused.close_code) == (401, CLOSE_AUTH)
    assert parts.kinds() == [("auth_failed", reason)]
    # The failure counted: the address's next connection is refused.
    assert isinstance(await parts.gate.admit("10.0.0.2"), Refused)


async def test_a_valid_token_is_a_principal_with_an_auth_ok_event() -> None:
    parts = Parts()
    await parts.verifier.start()
    principal = await parts.gate.authenticate(token("bob"), "10.0.0.3", "frame")
    assert isinstance(principal, Principal) and principal.sub == "bob"
    assert parts.kinds() == [("auth_ok", "frame")]


async def test_admit_user_refuses_a_banned_user_and_one_over_its_cap() -> None:
    parts = Parts(max_connections_per_user=1)
    ann = who("ann")
    eve = who("eve")
    parts.node.restrictions.add(Restriction("user", "eve", "ban", 2e9))
    banned = await parts.gate.admit_user(eve, None)
    assert isinstance(banned, Refused) and banned.close_code == CLOSE_BANNED
    assert isinstance(await parts.gate.admit_user(ann, None), Slot)
    capped = await parts.gate.admit_user(ann, None)
    assert isinstance(capped, Refused) and capped.reason == "too_many_connections"
    assert (capped.close_code, capped.http_status) == (CLOSE_POLICY, 429)
    assert parts.kinds() == [("banned", "4403"), ("rate_limited", "connections_per_user")]


@pytest.mark.parametrize(
    ("roles", "channel", "allowed", "rule"),
    [
        (("member",), "chat.a", True, None),
        (("member",), "secret.a", False, "secret.{x}"),
        (("admin",), "secret.a", True, None),
        (("member",), "nowhere", False, None),
    ],
)
def test_may_subscribe_is_the_policy_decision(
    roles: tuple[str, ...], channel: str, allowed: bool, rule: str | None
) -> None:
    parts = Parts()
    principal = who("ann", roles)
    decision = parts.gate.may_subscribe(principal, channel, "10.0.0.1", "s1")
    assert isinstance(decision, Denied) is not allowed
    if isinstance(decision, Denied):
        assert decision.message == f"not allowed to subscribe to {channel}"
        (event,) = parts.events
        assert (event.kind, event.channel, event.session) == ("denied", channel, "s1")
        assert (event.rule is not None) == (rule is not None)
    else:
        assert parts.events == []


# --- Session: requests ----------------------------------------------------------


async def test_a_subscribe_joins_the_node_and_is_acked_with_the_stream_position() -> None:
    parts = Parts()
    session = parts.session()
    await session.handle_command(Subscribe(1, "chat.a", None), 40)
    assert parts.transport.frames == [{"type": "ack", "id": 1, "seq": 41}]
    assert session.subscriptions == {"chat.a": "t.chat"}
    assert parts.broker.followed == ["t.chat"]
    assert parts.kinds()[-1] == ("subscribe", None)


@pytest.mark.parametrize(
    ("commands", "answer"),
    [
        ([Subscribe(1, "secret.a", None)], ("forbidden", "not allowed to subscribe to secret.a")),
        (
            [Subscribe(1, "chat.a", None), Subscribe(2, "chat.a", 5)],
            ("bad_request", "already subscribed to chat.a; unsubscribe first"),
        ),
        (
            [Subscribe(1, "chat.a", None), Subscribe(2, "chat.b", None)],
            ("forbidden", "at most 1 channels per connection"),
        ),
        ([Publish(3, "secret.a", b"1")], ("forbidden", "not allowed to publish to secret.a")),
        ([Publish(3, "chat.a", b'"' + b"x" * 20 + b'"')], ("too_large", None)),
        ([FrameError("bad_request", "frame is not valid JSON", 7)], ("bad_request", None)),
        ([Auth(token("mallory"), 4)], ("unauthorized", None)),
    ],
)
async def test_a_refused_request_is_answered_with_its_error_code(
    commands: list[Any], answer: tuple[str, str | None]
) -> None:
    parts = Parts(max_channels_per_connection=1)
    await parts.verifier.start()
    session = parts.session()
    for command in commands:
        await session.handle_command(command, 30)
    error = parts.transport.frames[-1]
    assert error["type"] == "error"
    assert error["code"] == answer[0]
    if answer[1] is not None:
        assert error["message"] == answer[1]
    assert parts.transport.closed is None


async def test_a_publish_goes_to_the_broker_and_is_acked_after_its_confirm() -> None:
    parts = Parts()
    session = parts.session()
    await session.handle_command(Publish(9, "chat.a", b'"hi"'), 30)
    await asyncio.sleep(0)  # the confirm callback, then the batched answers
    await asyncio.sleep(0)
    assert parts.broker.sent == [("t.chat", "chat.a", b'"hi"')]
    assert parts.transport.frames == [{"type": "ack", "id": 9}]
    assert ("publish", None) in parts.kinds()


async def test_a_publish_while_shutting_down_is_unavailable_and_not_sent() -> None:
    parts = Parts()
    session = parts.session()
    parts.node.shutting_down = True
    await session.handle_command(Publish(9, "chat.a", b"1"), 30)
    assert parts.broker.sent == []
    assert parts.transport.frames[-1]["code"] == "unavailable"


async def test_ping_pong_and_unsubscribe_ack() -> None:
    parts = Parts()
    session = parts.session()
    await session.handle_command(Subscribe(1, "chat.a", None), 30)
    await session.handle_command(Ping("p"), 10)
    await session.handle_command(Unsubscribe(2, "chat.a"), 30)
    assert [f["type"] for f in parts.transport.frames] == ["ack", "pong", "ack"]
    assert session.subscriptions == {}
    assert len(parts.node.hub) == 0


async def test_too_many_rate_limited_answers_close_with_4429_and_stop_reading() -> None:
    parts = Parts(frames_per_second=0.001, frames_burst=1, rate_limited_strikes_before_close=2)
    session = parts.session()
    for n in range(4):
        await session.handle_command(Ping(n), 10)
    assert parts.transport.reading is False
    assert parts.transport.closed == (4429, "rate limits broken too often")
    codes = [f.get("code") for f in parts.transport.frames]
    # The pong, two rate_limited answers, then the third refusal closes instead.
    assert codes == [None, "rate_limited", "rate_limited"]


# --- what a reload ends, what a refresh changes, what a ban closes -------------------


async def test_a_reload_ends_what_the_new_policies_no_longer_allow() -> None:
    parts = Parts()
    session = parts.session()
    await session.handle_command(Subscribe(1, "chat.a", None), 30)
    ended = await parts.node.swap_policies(parse_policy_files({"p.yaml": REVOKED}))
    assert ended == 1
    assert session.subscriptions == {}
    assert list(parts.node.hub.subscribers("chat.a")) == []
    assert parts.transport.frames[-1] == {
        "type": "error",
        "code": "forbidden",
        "message": "subscription to chat.a ended: no longer allowed",
        "channel": "chat.a",
    }
    assert parts.kinds()[-1] == ("denied", "subscribe")


async def test_a_refresh_with_fewer_roles_ends_subscriptions_it_no_longer_allows() -> None:
    parts = Parts()
    await parts.verifier.start()
    session = parts.session(roles=("member", "admin"))
    await session.handle_command(Subscribe(1, "secret.a", None), 30)
    await session.handle_command(Auth(token("ann", ("member",)), 2), 300)
    assert session.subscriptions == {}
    assert [f["type"] for f in parts.transport.frames] == ["ack", "error", "ack"]


async def test_a_ban_names_the_connections_of_every_transport_it_closes() -> None:
    parts = Parts()
    ann, bob = parts.session("ann"), parts.session("bob")
    assert list(parts.gate.banned_subscribers("user", "ann")) == [ann]
    assert set(parts.gate.banned_subscribers("address", "10.0.0.1")) == {ann, bob}
    assert list(parts.gate.banned_subscribers("user", "carol")) == []


# --- Node: the fan-out --------------------------------------------------------------


class Buffer:
    def __init__(self, takes: bool) -> None:
        self.takes = takes
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return self.takes

    def pending(self) -> tuple[int, int]:
        return 0, 0


def test_send_each_counts_the_buffers_that_took_the_frame() -> None:
    buffers: list[SendBuffer] = [Buffer(True), Buffer(False), Buffer(True)]
    assert send_each(buffers, b"x") == 2


async def test_a_delivery_is_encoded_once_for_every_subscriber_and_counted() -> None:
    parts = Parts()
    first, second = parts.session("ann"), parts.session("bob")
    sessions: list[Subscriber] = [first, second]
    for session in sessions:
        await parts.node.add_subscriber(session, "chat.a", "t.chat")
    transports = [s.outbox for s in (first, second)]
    parts.node.deliver(Delivery("t.chat", "chat.a", 42, b'{"n":1}', "carl", 1000))
    for transport in transports:
        assert isinstance(transport, RecordingTransport)
        assert transport.frames[-1]["seq"] == 42
    assert parts.node.latest_seq("chat.a", "t.chat") == 42
    parts.node.deliver(Delivery("t.chat", "chat.a", 43, b"\xff", None, 1000))
    assert parts.node.dropped_messages == 1  # neither JSON nor UTF-8


def test_a_transport_satisfies_the_protocol() -> None:
    transport: Transport = RecordingTransport()
    assert transport.open and transport.kind == "stomp"

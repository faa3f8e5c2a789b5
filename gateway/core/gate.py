"""Who may connect, who they are, what they may subscribe to: the decisions of every transport.

A transport asks the ``Gate`` in this order, and words each ``Refused`` on its
own wire (the WebSocket handshake as an HTTP status or a close code, SSE as
an HTTP status, STOMP as an ``ERROR`` frame):

1. ``connected(address, kind)`` (the connect event), then ``admit(address)``:
   a banned address, then the connect limits of the address (connect rate,
   failed authentications, strikeouts, concurrent connections). Before any
   token work.
2. ``authenticate(token, address, how)``: the JWT; a refusal is counted
   against the address (``failed authentications``).
3. ``admit_user(principal, address)``: a banned user, then the user's
   concurrent connections.
4. ``may_subscribe(...)`` per channel: the policies (a ``Session`` asks it
   for every ``subscribe``; SSE for the channels of its URL).

and, later, ``revoke(subscriber)`` after a reload or a refresh ends what the
policies no longer allow, and ``banned_subscribers`` names what a ban closes.
Each step emits its traffic events (connect, banned, rate_limited,
auth_failed, auth_ok, denied) exactly as before, so metrics, audit and the
anomaly detector see one behaviour whatever the transport. The gate does no
I/O of its own beyond what the limiter and the verifier do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.auth.principal import AuthError, Principal
from gateway.limits.limiter import Refusal, Slot
from gateway.policy.rules import Rule
from gateway.protocol.codes import CLOSE_AUTH, CLOSE_BANNED, CLOSE_POLICY
from gateway.telemetry.events import TrafficEvent

if TYPE_CHECKING:
    from gateway.auth.tokens import TokenVerifier
    from gateway.core.node import Node
    from gateway.core.transport import Subscriber, TransportKind

log = logging.getLogger("rabbitgate.gate")

RefusedReason = Literal["banned", "rate_limited", "unauthorized", "too_many_connections"]


@dataclass(frozen=True, slots=True)
class Refused:
    """The gate said no; the transport words it (see ``http_status``, ``close_code``)."""

    reason: RefusedReason
    message: str
    # The limit that refused, with its Retry-After (rate_limited, too_many_connections).
    limit: Refusal | None = None
    # Why a token was refused (unauthorized): AuthError.reason, for logs only.
    auth_reason: str | None = None

    @property
    def http_status(self) -> int:
        """What a refusal before the connection is open answers (handshake, SSE request)."""
        return {"banned": 403, "rate_limited": 429, "unauthorized": 401}.get(self.reason, 429)

    @property
    def close_code(self) -> int:
        """What an open connection is closed with (after a WebSocket upgrade, a STOMP CONNECT)."""
        match self.reason:
            case "banned":
                return CLOSE_BANNED
            case "unauthorized":
                return CLOSE_AUTH
            case _:
                return CLOSE_POLICY  # too many connections: the contract's 1008


@dataclass(frozen=True, slots=True)
class Denied:
    """The policies refused a subscribe or publish; ``rule`` is the deciding rule's label."""

    channel: str
    rule: str | None
    action: Literal["subscribe", "publish", "presence"] = "subscribe"

    @property
    def message(self) -> str:
        if self.action == "presence":
            # The same words whether a rule matched or not: reveals nothing.
            return f"not allowed to see presence of {self.channel}"
        return f"not allowed to {self.action} to {self.channel}"


class Gate:
    def __init__(self, node: Node, verifier: TokenVerifier) -> None:
        self.node = node
        self.verifier = verifier

    # --- before any token work ----------------------------------------------

    def connected(self, address: str | None, kind: TransportKind) -> None:
        """A connection (or SSE request) from ``address`` reached the gateway."""
        self.node.events.emit(TrafficEvent("connect", address, detail=_connect_detail(kind)))

    async def admit(self, address: str | None) -> Slot | None | Refused:
        """A new connection from ``address``: its address slot (give it back with
        ``release``; None when the cap is off), or why not."""
        node = self.node
        if node.restrictions.banned("address", address):
            node.events.emit(TrafficEvent("banned", address, detail="403"))
            return Refused("banned", "banned")
        admitted = await node.limiter.admit_connection(address)
        if isinstance(admitted, Refusal):
            node.events.emit(TrafficEvent("rate_limited", address, detail=admitted.limit))
            return Refused("rate_limited", "too many requests", limit=admitted)
        return admitted

    def release(self, slot: Slot | None) -> None:
        """Give back a slot of ``admit`` or ``admit_user`` (None: nothing held)."""
        self.node.limiter.release(slot)

    # --- authentication -----------------------------------------------------

    async def authenticate(
        self, token: str | AuthError, address: str | None, how: str
    ) -> Principal | Refused:
        """Verify ``token`` (or record the AuthError the transport met reading
        the credentials, such as a malformed header). ``how`` is the auth_ok
        event's detail: header, frame, sse, stomp."""
        node = self.node
        try:
            if isinstance(token, AuthError):
                raise token
            principal = await self.verifier.verify(token)
        except AuthError as exc:
            log.info("%s authentication refused: %s", how, exc.reason)
            node.events.emit(TrafficEvent("auth_failed", address, detail=exc.reason))
            await node.limiter.record_auth_failure(address)
            return Refused("unauthorized", str(exc), auth_reason=exc.reason)
        node.events.emit(TrafficEvent("auth_ok", address, principal.sub, detail=how))
        return principal

    async def admit_user(self, principal: Principal, address: str | None) -> Slot | Refused:
        """The authenticated user's slot (``release`` it when the connection ends), or why not."""
        node = self.node
        if node.restrictions.banned("user", principal.sub):
            node.events.emit(TrafficEvent("banned", address, principal.sub, detail="4403"))
            return Refused("banned", "banned")
        slot = await node.limiter.admit_user(principal.sub)
        if isinstance(slot, Refusal):
            refused = TrafficEvent("rate_limited", address, principal.sub, detail=slot.limit)
            node.events.emit(refused)
            return Refused("too_many_connections", "too many connections", limit=slot)
        # The tenant's connections (gateway/limits/tenants.py), refused as the user cap is.
        tenant = await node.limiter.admit_tenant(principal)
        if isinstance(tenant, Refusal):
            node.limiter.release(slot)
            refused = TrafficEvent("rate_limited", address, principal.sub, detail=tenant.limit)
            node.events.emit(refused)
            return Refused("too_many_connections", "too many connections", limit=tenant)
        if tenant is not None:
            # Given back with the user's slot, whichever transport releases it.
            slot = Slot(slot.kind, slot.key, slot.member, linked=(tenant,))
        return slot

    # --- requests -------------------------------------------------------------

    def may_subscribe(
        self, principal: Principal, channel: str, address: str | None, session: str | None = None
    ) -> Rule | Denied:
        """The rule that allows ``principal`` to subscribe to ``channel``, or a Denied
        (with its ``denied`` event emitted)."""
        return self._may("subscribe", principal, channel, address, session)

    def may_publish(
        self, principal: Principal, channel: str, address: str | None, session: str | None = None
    ) -> Rule | Denied:
        """The rule that allows ``principal`` to publish to ``channel``, or a Denied."""
        return self._may("publish", principal, channel, address, session)

    def may_see_presence(
        self, principal: Principal, channel: str, address: str | None, session: str | None = None
    ) -> Rule | Denied:
        """The rule whose ``presence`` conditions let ``principal`` list ``channel``'s
        subscribers, or a Denied that says the same whatever the reason."""
        return self._may("presence", principal, channel, address, session)

    def _may(
        self,
        action: Literal["subscribe", "publish", "presence"],
        principal: Principal,
        channel: str,
        address: str | None,
        session: str | None,
    ) -> Rule | Denied:
        decision = self.node.policies.decide(principal, action, channel)
        rule = decision.rule
        if decision.allowed and rule is not None:
            return rule
        label = _label(rule)
        denied = TrafficEvent(
            "denied", address, principal.sub, session, channel=channel, detail=action, rule=label
        )
        self.node.events.emit(denied)
        return Denied(channel, label, action)

    # --- what a reload ends, what a ban closes ----------------------------------

    def revoke(self, subscriber: Subscriber) -> list[str]:
        """End the subscriptions of ``subscriber`` the policies in force (and its
        current token) no longer allow: out of the hub at once, so nothing more of
        them is delivered, each with its ``denied`` event. Returns their channels;
        the transport tells the client in its own words."""
        node = self.node
        ended = []
        subscriptions = subscriber.subscriptions
        for channel, decision in node.policies.revoked(subscriber.principal, subscriptions):
            del subscriptions[channel]
            node.remove_subscriber(subscriber, channel)
            subscriber.emit(
                "denied", channel=channel, detail="subscribe", rule=_label(decision.rule)
            )
            ended.append(channel)
        return ended

    def banned_subscribers(self, kind: str, key: str) -> Iterator[Subscriber]:
        """The live connections a ban of ``kind`` ("user" or "address") ``key`` closes
        (with 4403), of every transport."""
        for subscriber in list(self.node.sessions):
            who = subscriber.principal.sub if kind == "user" else subscriber.address
            if who == key:
                yield subscriber


def _connect_detail(kind: TransportKind) -> str | None:
    # A WebSocket connect has no detail (as before the other transports came).
    return None if kind == "websocket" else kind


def _label(rule: Rule | None) -> str | None:
    return None if rule is None else rule.label

"""The operator's ``Connections`` service across every gateway process sharing Redis.

With ``redis_url`` set (every ``serve --workers N`` fleet has it, and so do
several gateways sharing the rate limits), the console, the JSON endpoints
and the CLI act on every process through this service, whichever process's
admin listener they reach. Without it, ``LocalConnections`` covers the one
process, as it says in its answers.

**Why Redis and not RabbitMQ.** The fleet already depends on Redis for what
must hold across processes (caps, rate limits, presence), and an operator
ban is one more such thing: it must also hold on a process that starts after
it, which a hash in Redis gives at once (every process reads it at start and
every few seconds), where a broker would need a retained message or a
re-announcement protocol. A sorted set of live processes, each refreshing its
own expiry, says which processes should answer, so a list waits for exactly
those and no longer than ``control.deadline_seconds``, and a dead process is
named as not answering until its entry lapses (``presence_ttl_seconds``).
Requests go out on one pub/sub channel; each process answers on the asker's
own channel.

Redis keys (``control.prefix``, default ``rabbitgate:control``):

* ``PREFIX:processes``: sorted set, member ``host/pid``, score its expiry (ms);
* ``PREFIX:bans``: hash, one signed entry per operator ban;
* ``PREFIX:requests``: the channel every process listens on;
* ``PREFIX:reply:host/pid``: the channel a process gets its answers on.

**Trust.** Whoever can publish on that Redis server can kick and ban. With
``control.key`` every message and stored ban is signed (HMAC-SHA256,
control_messages.py) and carries its time; a message that is unsigned,
signed with another key, stale or malformed is ignored and counted
(``rabbitgate_control_messages_ignored_total{reason}``), never acted on.

Each action writes one audit record, on the process that was asked, with the
total closed on every process. The decisions (who should answer, when a
gathering is done, merging the answers, validating a peer's request) are
pure functions at the top, unit-tested; the class below is the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import Settings
from gateway.operations.connections import (
    CLOSE_BANNED,
    CLOSE_POLICY,
    ConnectionFilter,
    ConnectionsRequestError,
    LocalConnections,
    checked_kick,
    checked_seconds,
    checked_subject,
    checked_text,
    close_reason,
    process_name,
    record,
)
from gateway.operations.control_messages import MAX_SKEW_SECONDS, Ignored, open_message, seal
from gateway.telemetry.metrics import Metrics

log = logging.getLogger("rabbitgate.control")

OPS = ("list", "kick", "ban", "unban")
# Named in the answer when Redis cannot be asked who else is alive.
UNREACHABLE = "the other processes (Redis unreachable)"


# --- decisions (pure) -------------------------------------------------------


def alive_processes(registry: Iterable[tuple[str, float]], now_ms: float, me: str) -> list[str]:
    """The other processes whose registry entry has not expired."""
    return sorted({name for name, expires in registry if expires > now_ms and name != me})


@dataclass
class Gathering:
    """The answers to one request, by process; done once every expected one answered."""

    expected: frozenset[str]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, process: str, answer: dict[str, Any]) -> None:
        self.answers[process] = answer
        if self.expected <= self.answers.keys():
            self.done.set()


def not_answering(gathering: Gathering) -> list[str]:
    return sorted(gathering.expected - gathering.answers.keys())


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def merge_lists(
    own: Mapping[str, Any], answers: Mapping[str, Mapping[str, Any]], missing: Iterable[str]
) -> dict[str, Any]:
    """One list of every process: ``own`` (this process's) with the others' answers.

    Rows in connection order (``since``) whatever their process; channels
    summed over processes; bans joined (the latest end wins); each process
    that did not answer is a ``processes`` entry with ``"answered": false``.
    """
    processes = _dicts(own.get("processes"))
    rows = _dicts(own.get("connections"))
    channel_lists = [_dicts(own.get("channels"))]
    ban_lists = [_dicts(own.get("bans"))]
    for name in sorted(answers):
        answer = answers[name]
        processes += _dicts(answer.get("processes")) or [{"process": name, "connections": 0}]
        rows += _dicts(answer.get("connections"))
        channel_lists.append(_dicts(answer.get("channels")))
        ban_lists.append(_dicts(answer.get("bans")))
    processes += [{"process": name, "answered": False} for name in sorted(missing)]
    return {
        "process": own.get("process"),
        "processes": processes,
        "connections": sorted(rows, key=_since),
        "channels": merge_channels(channel_lists),
        "bans": merge_bans(ban_lists),
    }


def _since(row: Mapping[str, Any]) -> float:
    since = row.get("since")
    return float(since) if isinstance(since, int | float) else 0.0


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def merge_channels(lists: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    subscribers: dict[str, float] = {}
    rates: dict[str, float] = {}
    for items in lists:
        for item in items:
            channel = item.get("channel")
            if not isinstance(channel, str):
                continue
            subscribers[channel] = subscribers.get(channel, 0) + _number(item.get("subscribers"))
            rates[channel] = rates.get(channel, 0.0) + _number(item.get("messages_per_second"))
    return [
        {
            "channel": channel,
            "subscribers": int(n),
            "messages_per_second": round(rates[channel], 3),
        }
        for channel, n in sorted(subscribers.items(), key=lambda item: (-item[1], item[0]))
    ]


def merge_bans(lists: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    until: dict[tuple[str, str], float] = {}
    for items in lists:
        for ban in items:
            kind, key = ban.get("kind"), ban.get("key")
            if isinstance(kind, str) and isinstance(key, str):
                until[(kind, key)] = max(until.get((kind, key), 0.0), _number(ban.get("until")))
    return [{"kind": k, "key": v, "until": end} for (k, v), end in sorted(until.items())]


def reached(me: str, gathering: Gathering) -> list[dict[str, Any]]:
    """The ``processes`` of an action's answer: who did it, who did not answer."""
    return [{"process": name, "answered": True} for name in [me, *sorted(gathering.answers)]] + [
        {"process": name, "answered": False} for name in not_answering(gathering)
    ]


def _optional_text(message: Mapping[str, Any], name: str) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise ConnectionsRequestError(f"{name}: text")
    return value


@dataclass(frozen=True)
class Request:
    """A request from another process, validated."""

    op: str
    id: str
    sender: str
    args: dict[str, Any]


def checked_request(message: Mapping[str, Any]) -> Request | None:
    """The request a peer sent, or None when it is not one we would have sent."""
    op, ident, sender = message.get("op"), message.get("id"), message.get("from")
    if op not in OPS or not isinstance(ident, str) or not 0 < len(ident) <= 64:
        return None
    if not isinstance(sender, str) or not 0 < len(sender) <= 300:
        return None
    try:
        args: dict[str, Any]
        if op == "list":
            args = {"where": ConnectionFilter(*(_optional_text(message, n) for n in FILTER))}
        elif op == "kick":
            session, user = _optional_text(message, "session"), _optional_text(message, "user")
            shown = checked_kick(session, user, message.get("shown"))
            args = {"session": session, "user": user, "shown": shown}
        else:
            kind, key = checked_subject(message.get("kind"), message.get("key"))
            args = {"kind": kind, "key": key}
            if op == "ban":
                until = _number(message.get("until"))
                checked_seconds(until - time.time())  # no ban ended or longer than 30 days
                # The asker's end as is: the stored entry has the same one (see _sync_bans).
                args["until"] = until
                args["shown"] = checked_text(message.get("shown"), "shown")
    except ConnectionsRequestError:
        return None
    return Request(str(op), ident, sender, args)


FILTER = ("user", "address", "channel")


class SeenRequests:
    """Request ids acted on within the time a message is taken (MAX_SKEW_SECONDS
    either way): a captured, signed request replayed in that time is refused."""

    def __init__(self, keep_seconds: float = 2 * MAX_SKEW_SECONDS) -> None:
        self._keep = keep_seconds
        self._seen: dict[str, float] = {}

    def first_time(self, ident: str, now: float) -> bool:
        # Kept in the order seen, so the first one is the first to expire.
        if self._seen and next(iter(self._seen.values())) < now:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
        if ident in self._seen:
            return False
        self._seen[ident] = now + self._keep
        return True


def checked_ban_entry(message: Mapping[str, Any], now: float) -> tuple[str, str, float, str] | None:
    """A stored ban (kind, key, until, shown) still in force, or None."""
    try:
        kind, key = checked_subject(message.get("kind"), message.get("key"))
        shown = checked_text(message.get("shown", ""), "shown")
    except ConnectionsRequestError:
        return None
    until = _number(message.get("until"))
    return (kind, key, until, shown) if until > now else None


# --- I/O ----------------------------------------------------------------------


class FleetConnections:
    """``Connections`` over every live process: this one directly, the others by Redis."""

    def __init__(self, local: LocalConnections, settings: Settings, metrics: Metrics) -> None:
        assert settings.redis_url is not None
        self.local = local
        self.me = process_name()
        control = settings.control
        self._key = control.key.encode() if control.key else None
        self._deadline = control.deadline_seconds
        self._ttl = settings.presence_ttl_seconds
        self._processes = f"{control.prefix}:processes"
        self._bans = f"{control.prefix}:bans"
        self._requests = f"{control.prefix}:requests"
        self._reply_prefix = f"{control.prefix}:reply:"
        self._reply = self._reply_prefix + self.me
        self._ignored = metrics.control_ignored
        timeout = settings.limits.redis_timeout_seconds
        self.redis = aioredis.from_url(
            settings.redis_url,
            socket_timeout=max(timeout, 1.0),  # a list answer may be megabytes
            socket_connect_timeout=max(timeout, 1.0),
        )
        self._waiting: dict[str, Gathering] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        # Bumped by every ban or unban made here: a sync of the bans read
        # before it must not undo it.
        self._changes = 0
        self._reachable = True  # logged once when it changes, not every retry
        self._seen = SeenRequests()

    def _redis_down(self, exc: BaseException) -> None:
        if self._reachable:
            self._reachable = False
            log.warning(
                "operator control: Redis unreachable (%s); lists and actions cover"
                " this process only until it is back",
                type(exc).__name__,
            )

    def _redis_up(self) -> None:
        if not self._reachable:
            self._reachable = True
            log.info("operator control: Redis reachable again")

    # --- life ---------------------------------------------------------------

    async def start(self) -> None:
        """Register, take the fleet's bans, listen. Redis down: retried in the background."""
        if self._key is None:
            # Said once at start, where the operator looks: the channel works
            # unsigned (processes of a fleet may run without a key), but then
            # it is open to anyone who can write to that Redis.
            log.warning(
                "control.key is not set: anyone who can publish on the Redis server of "
                "redis_url can disconnect and ban users through the operator's control "
                "channel; set control.key (RABBITGATE_CONTROL_KEY), the same on every process"
            )
        self._tasks = [
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._keep_alive()),
        ]
        # Subscribed before the first heartbeat: once other processes see this
        # one, it hears their requests. Redis down: no more than 2 s of delay.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 2)
        await self._heartbeat()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(self._processes, self.me)
        await self.redis.aclose()

    async def _keep_alive(self) -> None:
        every = min(self._ttl / 3, 5.0)
        while True:
            await asyncio.sleep(every)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        now_ms = time.time() * 1000
        try:
            await self.redis.zadd(self._processes, {self.me: now_ms + self._ttl * 1000})
            await self.redis.zremrangebyscore(self._processes, "-inf", now_ms)
            await self._sync_bans()
            self._redis_up()
        except (RedisError, OSError) as exc:
            self._redis_down(exc)

    async def _sync_bans(self) -> None:
        """Make this process's operator bans those stored in Redis (missed messages,
        bans made before it started, bans lifted elsewhere)."""
        changes = self._changes
        stored = await self.redis.hgetall(self._bans)
        if changes != self._changes:
            return  # a ban or unban here meanwhile: the next sync sees it
        now = time.time()
        wanted: dict[tuple[str, str], tuple[float, str]] = {}
        expired = []
        for name, raw in stored.items():
            # A stored ban is read as long as it lasts: its age is no reason to drop it.
            message = open_message(self._key, raw, max_skew=None)
            if isinstance(message, Ignored):
                self._ignored.labels(message.reason).inc()
                continue
            entry = checked_ban_entry(message, now)
            if entry is None:
                expired.append(name)
                continue
            kind, key, until, shown = entry
            wanted[(kind, key)] = (until, shown)
        if expired:
            await self.redis.hdel(self._bans, *expired)
        restrictions = self.local.node.restrictions
        current = {(k, v): until for k, v, until in restrictions.operator_bans()}
        for (kind, key), (until, shown) in wanted.items():
            if current.get((kind, key)) != until:
                self.local.apply_ban(kind, key, until, shown)
        for kind, key in current.keys() - wanted.keys():
            self.local.apply_unban(kind, key)

    # --- listening ------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self._requests, self._reply)
                self._listening.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._on_message_safely(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                self._redis_down(exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _on_message_safely(self, channel: bytes, data: bytes) -> None:
        """One message; whatever goes wrong with it, the listener goes on."""
        try:
            await self._on_message(channel, data)
        except (RedisError, OSError):
            raise  # the connection: _listen subscribes again
        except Exception as exc:  # a bug must not end the fleet's control channel
            log.warning("operator control: a message failed (%s: %s)", type(exc).__name__, exc)

    async def _on_message(self, channel: bytes, data: bytes) -> None:
        message = open_message(self._key, data)
        if isinstance(message, Ignored):
            self._ignored.labels(message.reason).inc()
            return
        if channel.decode(errors="replace") == self._reply:
            ident, process, answer = (
                message.get("id"),
                message.get("process"),
                message.get("answer"),
            )
            gathering = self._waiting.get(ident) if isinstance(ident, str) else None
            if isinstance(process, str) and isinstance(answer, dict) and gathering is not None:
                gathering.add(process, answer)
            elif not (isinstance(process, str) and isinstance(answer, dict)):
                self._ignored.labels("malformed").inc()
            return  # an answer after its deadline: nothing waits for it any more
        if message.get("from") == self.me:
            return  # our own request: done here directly
        request = checked_request(message)
        if request is None:
            self._ignored.labels("malformed").inc()
            return
        if not self._seen.first_time(f"{request.sender} {request.id}", time.time()):
            self._ignored.labels("stale").inc()  # a replay of a request done already
            return
        answer = await self._serve(request)
        reply = seal(self._key, {"id": request.id, "process": self.me, "answer": answer})
        await self.redis.publish(self._reply_prefix + request.sender, reply)

    async def _serve(self, request: Request) -> dict[str, Any]:
        """Do what another process asked, here (its audit record is the asker's)."""
        args = request.args
        match request.op:
            case "list":
                return await self.local.list(args["where"])
            case "kick":
                return {
                    "closed": self.local.close_sessions(
                        args["session"], args["user"], args["shown"]
                    )
                }
            case "ban":
                self._changes += 1
                closed = self.local.apply_ban(
                    args["kind"], args["key"], args["until"], args["shown"]
                )
                return {"closed": closed}
            case _:
                self._changes += 1
                return {"lifted": self.local.apply_unban(args["kind"], args["key"])}

    # --- asking -----------------------------------------------------------------

    async def _ask(self, op: str, **args: Any) -> Gathering | None:
        """Every other live process's answer within the deadline; None: Redis unreachable."""
        ident = uuid.uuid4().hex
        try:
            registry = cast(
                "list[tuple[bytes, float]]",
                await self.redis.zrange(self._processes, 0, -1, withscores=True),
            )
            expected = alive_processes(
                ((name.decode(errors="replace"), score) for name, score in registry),
                time.time() * 1000,
                self.me,
            )
            gathering = Gathering(frozenset(expected))
            if not expected:
                return gathering
            self._waiting[ident] = gathering
            request = {"op": op, "id": ident, "from": self.me, **args}
            await self.redis.publish(self._requests, seal(self._key, request))
        except (RedisError, OSError) as exc:
            self._waiting.pop(ident, None)
            self._redis_down(exc)
            return None
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gathering.done.wait(), self._deadline)
        finally:
            self._waiting.pop(ident, None)
        return gathering

    def _processes_of(self, gathering: Gathering | None) -> list[dict[str, Any]]:
        if gathering is None:
            return [
                {"process": self.me, "answered": True},
                {"process": UNREACHABLE, "answered": False},
            ]
        return reached(self.me, gathering)

    @staticmethod
    def _closed(gathering: Gathering | None) -> int:
        if gathering is None:
            return 0
        return sum(int(_number(a.get("closed"))) for a in gathering.answers.values())

    # --- the Connections service --------------------------------------------------

    async def list(self, where: ConnectionFilter) -> dict[str, Any]:
        own = await self.local.list(where)
        filters = {"user": where.user, "address": where.address, "channel": where.channel}
        gathering = await self._ask("list", **filters)
        if gathering is None:
            return merge_lists(own, {}, [UNREACHABLE])
        return merge_lists(own, gathering.answers, not_answering(gathering))

    async def kick(
        self, operator: str, *, session: str | None, user: str | None, reason: str
    ) -> dict[str, Any]:
        reason = checked_kick(session, user, reason)
        shown = close_reason("disconnected by an operator", reason)
        here = self.local.close_sessions(session, user, shown)
        gathering = await self._ask("kick", session=session, user=user, shown=shown)
        closed = here + self._closed(gathering)
        processes = self._processes_of(gathering)
        target = f"session {session}" if session is not None else f"user {user}"
        record(operator, "kick", target, reason, closed=closed, processes=_names(processes))
        return {"closed": closed, "code": CLOSE_POLICY, "reason": shown, "processes": processes}

    async def ban(
        self, operator: str, kind: object, key: object, seconds: object, reason: object
    ) -> dict[str, Any]:
        kind, key = checked_subject(kind, key)
        length = checked_seconds(seconds)
        reason = checked_text(reason, "reason")
        until = time.time() + length
        shown = close_reason("banned by an operator", reason)
        entry = {"kind": kind, "key": key, "until": until, "shown": shown}
        self._changes += 1
        try:
            # Stored first: a process starting now finds it there if it misses the message.
            await self.redis.hset(self._bans, f"{kind}\n{key}", seal(self._key, entry))
        except (RedisError, OSError):
            raise ConnectionsRequestError(
                "the shared store (Redis) is unreachable: nothing was banned"
            ) from None
        here = self.local.apply_ban(kind, key, until, shown)
        gathering = await self._ask("ban", kind=kind, key=key, until=until, shown=shown)
        closed = here + self._closed(gathering)
        processes = self._processes_of(gathering)
        record(
            operator, "ban", f"{kind} {key}", reason,
            closed=closed, seconds=length, processes=_names(processes),
        )  # fmt: skip
        return {"until": until, "closed": closed, "code": CLOSE_BANNED, "processes": processes}

    async def unban(
        self, operator: str, kind: object, key: object, reason: object
    ) -> dict[str, Any]:
        kind, key = checked_subject(kind, key)
        reason = checked_text(reason, "reason")
        self._changes += 1
        try:
            stored = await self.redis.hdel(self._bans, f"{kind}\n{key}")
        except (RedisError, OSError):
            raise ConnectionsRequestError(
                "the shared store (Redis) is unreachable: nothing was unbanned"
            ) from None
        lifted = self.local.apply_unban(kind, key) or bool(stored)
        gathering = await self._ask("unban", kind=kind, key=key)
        if gathering is not None:
            lifted = lifted or any(a.get("lifted") is True for a in gathering.answers.values())
        processes = self._processes_of(gathering)
        record(operator, "unban", f"{kind} {key}", reason, processes=_names(processes))
        return {"lifted": lifted, "processes": processes}


def _names(processes: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        "answered": [p["process"] for p in processes if p["answered"]],
        "not_answering": [p["process"] for p in processes if not p["answered"]],
    }

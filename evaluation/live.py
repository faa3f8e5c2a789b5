"""Labelled traffic against the real gateway: normal clients and injected attacks.

``run_scenario`` starts an in-process ``Gateway`` (real TLS, real signed
tokens, the real RabbitMQ, the detector on) and drives it with:

* a population of normal chat-like users, each from its own loopback address
  (127.0.1.N; a few share one, as behind a NAT, a few have a second device):
  Poisson publishing at rates from 0.05 to 1.5 a second with bursts of
  typing, message sizes like chat text, a few rooms, now and then a room
  change, a forbidden channel, a malformed frame, a token refresh, a
  reconnect, an expired token;
* attackers of each kind, each on subjects of its own:
  ``credential_stuffing`` (one address, many invalid tokens),
  ``channel_scanning`` (one user subscribing to channel after channel, most
  refused), ``regular_bot`` (publishes at a fixed interval, one template),
  ``large_payloads`` (bursts of 8-48 KiB messages),
  ``token_many_addresses`` (one user's token used from 8-12 addresses at once).

Linux routes all of 127.0.0.0/8 to loopback, so each client binds its socket
to its own 127.x.y.z (``local_addr``) and the gateway sees distinct peers.

The detector first learns for ``warmup_windows`` windows of normal traffic
only; then the attacks start at a window boundary and both populations run
for ``attack_windows`` windows. Every scored subject-window of that second
phase is labelled: the subject an attack is *about* (the address for
credential stuffing, the user for the others) is a positive of its kind; the
other subjects the attackers touched (their own addresses) are left out; the
rest are the normal windows. ``metrics`` turns this into precision, recall
and false-positive rate per attack kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import random
import secrets
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from anomaly.alerts import iso
from anomaly.detector import Scored
from anomaly.settings import AnomalySettings

log = logging.getLogger("rabbitgate.evaluation")

ATTACK_KINDS = (
    "credential_stuffing",
    "channel_scanning",
    "regular_bot",
    "large_payloads",
    "token_many_addresses",
)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOMS = 8

_POLICY = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [role:member]
    publish: [role:member]
    limits: {{max_bytes: 60000}}
  - channel: "user.{{user}}.inbox"
    exchange: {p}.notify
    subscribe: ["claim:sub={{user}}"]
    publish: [nobody]
  - channel: "tenant.{{tenant}}.feed"
    exchange: {p}.feeds
    subscribe: [{{all: ["role:member", "claim:tenant={{tenant}}"]}}]
    publish: [nobody]
"""
_EXCHANGE_KINDS = ("chat", "notify", "feeds")


@dataclass(frozen=True)
class ScenarioConfig:
    window_seconds: float = 5.0
    long_window_windows: int = 4
    warmup_windows: int = 24
    attack_windows: int = 12
    normal_users: int = 50
    attackers_per_kind: int = 3
    kinds: tuple[str, ...] = ATTACK_KINDS
    false_alerts_per_10k_subject_hours: float = 1.0
    seed: int = 7
    amqp_url: str = AMQP_URL


@dataclass
class Labels:
    """Which subjects belong to which attack kind, and which to leave out."""

    positives: dict[tuple[str, str], str] = field(default_factory=dict)  # subject -> kind
    excluded: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class ScenarioResult:
    config: ScenarioConfig
    decisions: list[Scored]  # every decision of the attack phase
    labels: Labels
    alerts: list[dict[str, Any]]
    seconds: float
    loop_lag: list[float] = field(default_factory=list)  # sorted, seconds
    model: Any = None  # the AnomalyModel the attack phase was scored with


# --- metrics (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    kind: str
    windows: int
    flagged: int
    precision: float | None
    recall: float | None
    fpr: float | None


def label_of(decision: Scored, labels: Labels) -> str | None:
    """The attack kind of a decision's subject, "normal", or None (left out)."""
    window = decision.window
    subject = (window.subject_kind, window.key)
    if subject in labels.positives:
        return labels.positives[subject]
    if subject in labels.excluded or window.overflow:
        return None
    return "normal"


def metrics(
    decisions: list[Scored], labels: Labels, short_key: str, mode: str = "either"
) -> list[Row]:
    """Per attack kind: its windows, flagged, precision, recall; then the normal row.

    The unit is one subject in one short window. ``mode`` says what flags it:
    ``"short"`` its short-window decision, ``"long"`` the decision of the long
    window covering it, ``"either"`` (the detector's answer) one of the two.
    Each kind is scored as its own binary problem against the normal windows:
    precision = TP / (TP + flagged normal windows), recall = TP / windows of
    the kind, FPR = flagged normal windows / normal windows (the same for all).
    """
    long_flags: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for decision in decisions:
        if not decision.key.endswith(short_key) and decision.flagged:
            w = decision.window
            long_flags.setdefault((w.subject_kind, w.key), []).append((w.start, w.end))
    counts: dict[str, list[int]] = {}
    for decision in decisions:
        if not decision.key.endswith(short_key):
            continue
        kind = label_of(decision, labels)
        if kind is None:
            continue
        w = decision.window
        middle = (w.start + w.end) / 2
        by_long = any(a <= middle < b for a, b in long_flags.get((w.subject_kind, w.key), ()))
        flagged = {"short": decision.flagged, "long": by_long}.get(
            mode, decision.flagged or by_long
        )
        tally = counts.setdefault(kind, [0, 0])
        tally[0] += 1
        tally[1] += int(flagged)
    normal_windows, false_positives = counts.get("normal", [0, 0])
    fpr = false_positives / normal_windows if normal_windows else None
    rows = []
    for kind in sorted(k for k in counts if k != "normal"):
        windows, hits = counts[kind]
        precision = hits / (hits + false_positives) if hits + false_positives else None
        rows.append(Row(kind, windows, hits, precision, hits / windows, fpr))
    rows.append(Row("normal", normal_windows, false_positives, None, None, fpr))
    return rows


def format_table(rows: list[Row]) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    lines = [
        "| attack kind | windows | flagged | precision | recall | FPR (normal) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.kind} | {row.windows} | {row.flagged} | {pct(row.precision)} | "
            f"{pct(row.recall)} | {pct(row.fpr)} |"
        )
    return "\n".join(lines)


# --- clients ----------------------------------------------------------------


class Peer:
    """One client connection from a chosen source address; reads everything sent to it."""

    _ids = itertools.count(1)

    def __init__(self, env: ClientEnv, address: str) -> None:
        self.env = env
        self.address = address
        self.ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None

    async def open(self, token: str | None, *, header: bool = True) -> bool:
        """Connect and authenticate; False when refused (any way)."""
        headers = {"Authorization": f"Bearer {token}"} if header and token else None
        try:
            self.ws = await connect(
                f"wss://localhost:{self.env.port}/ws",
                ssl=self.env.client_ssl,
                additional_headers=headers,
                subprotocols=["rabbitgate.v1"],  # type: ignore[list-item]
                local_addr=(self.address, 0),
                open_timeout=10,
                max_queue=None,
                max_size=None,
            )
            if not header and token:
                await self.ws.send(json.dumps({"type": "auth", "token": token}))
            welcome = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        except (InvalidStatus, WebSocketException, OSError, TimeoutError, ValueError):
            await self.close()
            return False
        if welcome.get("type") != "welcome":
            await self.close()
            return False
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return True

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(WebSocketException, OSError):
            async for _ in self.ws:
                pass
        self.close_code = self.ws.close_code

    @property
    def open_now(self) -> bool:
        return self.ws is not None and self._reader is not None and not self._reader.done()

    async def send(self, **frame: Any) -> bool:
        if not self.open_now:
            return False
        assert self.ws is not None
        try:
            await self.ws.send(json.dumps(frame))
        except (WebSocketException, OSError):
            return False
        return True

    async def subscribe(self, channel: str) -> bool:
        return await self.send(type="subscribe", id=next(self._ids), channel=channel)

    async def unsubscribe(self, channel: str) -> bool:
        return await self.send(type="unsubscribe", id=next(self._ids), channel=channel)

    async def publish(self, channel: str, data: Any) -> bool:
        return await self.send(type="publish", id=next(self._ids), channel=channel, data=data)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


# --- the environment: a real gateway with the detector on -------------------


class Environment:
    """A gateway on 127.0.0.1 with its own certificates, secret, policies and data dir."""

    def __init__(self, config: ScenarioConfig, data_dir: Path | None = None) -> None:
        self.config = config
        self.prefix = f"eval{uuid.uuid4().hex[:8]}"
        self._tmp = tempfile.TemporaryDirectory(prefix="rabbitgate-eval-")
        self.root = Path(self._tmp.name)
        self.data_dir = data_dir or self.root / "anomaly"
        self.gateway: Any = None
        self.ca_cert = ""
        self.port = 0

    async def __aenter__(self) -> Environment:
        from gateway.app import Gateway
        from gateway.config import JwtSettings, LimitSettings, Settings, TlsSettings
        from gateway.devtools.devcerts import make_dev_certificates
        from gateway.policy.rules import load_policy_set

        certs = make_dev_certificates(self.root / "certs")
        policies = self.root / "policies"
        policies.mkdir()
        (policies / "10-eval.yaml").write_text(_POLICY.format(p=self.prefix))
        self.jwt = JwtSettings(
            algorithms=("HS256",), secret=secrets.token_hex(32), issuer="eval", audience="eval"
        )
        c = self.config
        anomaly = AnomalySettings(
            enabled=True,
            data_dir=self.data_dir,
            window_seconds=c.window_seconds,
            long_window_windows=c.long_window_windows,
            warmup_windows=c.warmup_windows,
            false_alerts_per_10k_subject_hours=c.false_alerts_per_10k_subject_hours,
            retrain_interval_seconds=0,
            exchange=f"{self.prefix}.alerts",
        )
        settings = Settings(
            host="127.0.0.1",
            port=0,
            tls=TlsSettings(enabled=True, cert_file=certs.server_cert, key_file=certs.server_key),
            amqp_url=c.amqp_url,
            policies_dir=policies,
            policy_watch=False,
            jwt=self.jwt,
            limits=LimitSettings(idle_timeout_seconds=0),
            stream_max_bytes=64 * 1024 * 1024,
            admin_port=0,
            sse_port=None,
            log_format="text",
            anomaly=anomaly,
        )
        self.gateway = Gateway(settings, load_policy_set(policies))
        await self.gateway.start()
        self.port = self.gateway.port
        self.ca_cert = str(certs.ca_cert)
        return self

    async def __aexit__(self, *exc: object) -> None:
        import aio_pika

        try:
            if self.gateway is not None:
                await self.gateway.stop()
        finally:
            with contextlib.suppress(Exception):
                connection = await aio_pika.connect(self.config.amqp_url)
                async with connection:
                    channel = await connection.channel()
                    for kind in _EXCHANGE_KINDS:
                        await channel.queue_delete(f"rabbitgate.stream.{self.prefix}.{kind}")
                        await channel.exchange_delete(f"{self.prefix}.{kind}")
                    await channel.exchange_delete(f"{self.prefix}.alerts")
            self._tmp.cleanup()

    @property
    def detector(self) -> Any:
        return self.gateway.anomaly.detector


class ClientEnv:
    """What the clients need, in the client process: the port, the CA, the token key."""

    def __init__(self, port: int, ca_cert: str, jwt: Any) -> None:
        from gateway.devtools.devcerts import client_ssl_context

        self.port = port
        self.client_ssl = client_ssl_context(Path(ca_cert))
        self.jwt = jwt

    def token(self, sub: str, ttl: float = 3600, **claims: Any) -> str:
        from gateway.devtools.devtokens import mint_token

        return mint_token(self.jwt, sub=sub, roles=["member"], ttl_seconds=ttl, extra=claims)

    def forged_token(self, sub: str) -> str:
        """A well-formed token signed with the wrong key (what stuffing lists hold)."""
        from gateway.devtools.devtokens import mint_token

        wrong = replace(self.jwt, secret=secrets.token_hex(32))
        return mint_token(wrong, sub=sub, roles=["member"], ttl_seconds=3600)


# --- behaviours -------------------------------------------------------------

Stop = Callable[[], bool]


def _chat_text(rng: random.Random) -> dict[str, Any]:
    length = max(1, min(1500, int(rng.lognormvariate(3.6, 0.9))))
    words = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(length))
    data: dict[str, Any] = {"text": words}
    if rng.random() < 0.1:
        data["reply_to"] = rng.randrange(10**6)
    return data


async def _sleep_until(stop: Stop, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not stop() and time.monotonic() < end:
        await asyncio.sleep(min(0.5, end - time.monotonic()))


async def normal_user(
    env: ClientEnv, name: str, addresses: list[str], rng: random.Random, stop: Stop
) -> None:
    """A person chatting: sessions of varied length, Poisson messages with bursts."""
    rate = 10 ** rng.uniform(-1.3, 0.2)  # 0.05 .. 1.6 messages/s
    listener = rng.random() < 0.15
    rooms = rng.sample(range(ROOMS), rng.randint(1, 3))
    while not stop():
        address = addresses[0] if len(addresses) == 1 or rng.random() < 0.7 else addresses[1]
        peer = Peer(env, address)
        if rng.random() < 0.03:  # an expired token first, as after a laptop's sleep
            await peer.open(env.token(name, ttl=-120))
            await peer.close()
            peer = Peer(env, address)
        if not await peer.open(env.token(name), header=rng.random() < 0.8):
            await _sleep_until(stop, 2)
            continue
        for room in rooms:
            await peer.subscribe(f"chat.room{room}")
        await peer.subscribe(f"user.{name}.inbox")
        session_end = time.monotonic() + rng.expovariate(1 / 60)
        while not stop() and time.monotonic() < session_end and peer.open_now:
            wait = rng.expovariate(rate / (20 if listener else 1))
            await _sleep_until(stop, wait)
            if stop():
                break
            draw = rng.random()
            room = rng.choice(rooms)
            if draw < 0.85:
                burst = 1 if rng.random() < 0.7 else rng.randint(2, 5)
                for _ in range(burst):
                    await peer.publish(f"chat.room{room}", _chat_text(rng))
                    if burst > 1:
                        await asyncio.sleep(rng.uniform(0.4, 2.5))
            elif draw < 0.92:
                other = rng.randrange(ROOMS)
                await peer.subscribe(f"chat.room{other}")
                if other not in rooms and rng.random() < 0.5:
                    await peer.unsubscribe(f"chat.room{other}")
            elif draw < 0.95:
                await peer.subscribe(rng.choice(["tenant.acme.feed", f"user.{name}x.inbox"]))
            elif draw < 0.97:
                await peer.send(type="auth", id=next(Peer._ids), token=env.token(name))
            elif draw < 0.98:
                await peer.send(type="publish", channel="chat..bad", data=1)
            else:
                await peer.send(type="ping", id=next(Peer._ids))
        await peer.close()
        await _sleep_until(stop, rng.uniform(0.5, 6))


async def credential_stuffing(
    env: ClientEnv, address: str, rng: random.Random, stop: Stop, rate: float
) -> None:
    """Many invalid tokens from one address (the gateway refuses each: 401, 4401, then 429)."""
    while not stop():
        peer = Peer(env, address)
        victim = f"user{rng.randrange(10**5)}"
        await peer.open(env.forged_token(victim), header=rng.random() < 0.6)
        await peer.close()
        await _sleep_until(stop, rng.uniform(0.5, 1.5) / rate)


async def channel_scanning(
    env: ClientEnv, name: str, address: str, rng: random.Random, stop: Stop, rate: float
) -> None:
    """Subscribe to one guessed channel after another: inboxes, feeds, rooms."""
    while not stop():
        peer = Peer(env, address)
        if not await peer.open(env.token(name)):
            await _sleep_until(stop, 1)
            continue
        joined: list[str] = []
        while not stop() and peer.open_now:
            guess = rng.random()
            if guess < 0.5:
                channel = f"user.user{rng.randrange(10**4)}.inbox"
            elif guess < 0.8:
                channel = f"tenant.t{rng.randrange(10**3)}.feed"
            else:
                channel = f"chat.r{rng.randrange(10**4)}"
                joined.append(channel)
            await peer.subscribe(channel)
            if len(joined) > 20:
                await peer.unsubscribe(joined.pop(0))
            await _sleep_until(stop, rng.uniform(0.6, 1.4) / rate)
        await peer.close()


async def regular_bot(
    env: ClientEnv, name: str, address: str, rng: random.Random, stop: Stop, interval: float
) -> None:
    """Publishes at a fixed interval, to the millisecond; prices change, so sizes vary a little."""
    peer = Peer(env, address)
    while not stop() and not await peer.open(env.token(name)):
        await _sleep_until(stop, 1)
    await peer.subscribe("chat.room0")
    loop = asyncio.get_running_loop()
    due = loop.time()
    count = 0
    while not stop() and peer.open_now:
        count += 1
        price = round(rng.uniform(1, 5000), rng.randint(0, 2))
        await peer.publish("chat.room0", {"text": "deal of the minute", "price": price, "n": count})
        due += interval
        await asyncio.sleep(max(0.0, due - loop.time()))
    await peer.close()


async def large_payloads(
    env: ClientEnv, name: str, address: str, rng: random.Random, stop: Stop
) -> None:
    """Chat-like, but in bursts of large messages (8-48 KiB)."""
    peer = Peer(env, address)
    while not stop() and not await peer.open(env.token(name)):
        await _sleep_until(stop, 1)
    await peer.subscribe("chat.room1")
    while not stop() and peer.open_now:
        for _ in range(rng.randint(3, 8)):
            size = rng.randint(8 * 1024, 48 * 1024)
            await peer.publish("chat.room1", {"blob": secrets.token_hex(size // 2)})
            await asyncio.sleep(rng.uniform(0.05, 0.3))
        await _sleep_until(stop, rng.uniform(1.0, 3.0))
    await peer.close()


async def token_many_addresses(
    env: ClientEnv, name: str, addresses: list[str], rng: random.Random, stop: Stop
) -> None:
    """One user's token, stolen and used from many addresses at once."""
    token = env.token(name)

    async def one(address: str) -> None:
        while not stop():
            peer = Peer(env, address)
            if await peer.open(token):
                await peer.subscribe(f"chat.room{rng.randrange(ROOMS)}")
                end = time.monotonic() + rng.uniform(3, 15)
                while not stop() and time.monotonic() < end and peer.open_now:
                    await _sleep_until(stop, rng.expovariate(0.3))
                    await peer.publish(f"chat.room{rng.randrange(ROOMS)}", _chat_text(rng))
                await peer.close()
            await _sleep_until(stop, rng.uniform(0.5, 3))

    await asyncio.gather(*(one(address) for address in addresses))


# --- the run ----------------------------------------------------------------


@dataclass(frozen=True)
class Attacker:
    """One attacker: its kind, the subjects it uses, its pace, its random seed."""

    kind: str
    name: str | None  # the user it authenticates as (None: none, stuffing)
    addresses: tuple[str, ...]
    pace: float  # attempts or subscribes a second; the bot's interval in seconds
    seed: int


def plan_attackers(config: ScenarioConfig) -> list[Attacker]:
    """The attackers of a run, deterministic from the config (both processes agree)."""
    rng = random.Random(config.seed * 7919)
    found = []
    for i in range(config.attackers_per_kind):
        plan = {
            "credential_stuffing": (None, (f"127.0.2.{10 + i}",), (0.7, 1.5, 3.0)[i % 3]),
            "channel_scanning": (f"scanner{i}", (f"127.0.2.{40 + i}",), (1.0, 2.0, 4.0)[i % 3]),
            "regular_bot": (f"bot{i}", (f"127.0.2.{70 + i}",), (1.0, 0.7, 0.5)[i % 3]),
            "large_payloads": (f"uploader{i}", (f"127.0.2.{100 + i}",), 1.0),
            "token_many_addresses": (
                f"stolen{i}",
                tuple(f"127.0.3.{10 + 20 * i + j}" for j in range(8 + (i * 2) % 5)),
                0.3,
            ),
        }
        for kind in config.kinds:
            name, addresses, pace = plan[kind]
            found.append(Attacker(kind, name, addresses, pace, rng.randrange(2**31)))
    return found


def labels_for(attackers: list[Attacker]) -> Labels:
    """Positives: the subject each attack is about; excluded: the others it touched."""
    labels = Labels()
    for a in attackers:
        if a.kind == "credential_stuffing":
            labels.positives[("address", a.addresses[0])] = a.kind
        else:
            assert a.name is not None
            labels.positives[("user", a.name)] = a.kind
            labels.excluded.update(("address", address) for address in a.addresses)
    return labels


@dataclass(frozen=True)
class ClientPlan:
    """Everything a client process needs (picklable)."""

    port: int
    ca_cert: str
    jwt: Any
    config: ScenarioConfig
    attackers: tuple[Attacker, ...]
    normal_users: bool = True  # this process also runs the normal population


# The bots' regularity is what is measured: they get a process of their own, so
# that other clients' TLS handshakes (CPU in the same event loop) do not jitter
# them, as a real bot on its own machine would not be.
TIMED_KINDS = ("regular_bot",)


def client_process(plan: ClientPlan, attack: Any, stop: Any) -> None:
    """Entry of the client process: normal users now, attackers once ``attack`` is set."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_drive_clients(plan, attack, stop))


async def _drive_clients(plan: ClientPlan, attack: Any, stop_event: Any) -> None:
    env = ClientEnv(plan.port, plan.ca_cert, plan.jwt)
    config = plan.config
    rng = random.Random(config.seed)

    def stop() -> bool:
        return bool(stop_event.is_set())

    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Awaitable[None]) -> None:
        tasks.append(asyncio.ensure_future(coro))

    # Normal users: one address each, a few share (NAT), a few have two devices.
    for n in range(config.normal_users if plan.normal_users else 0):
        host = n if n % 7 != 3 else n - 1  # every 7th shares its neighbour's address
        addresses = [f"127.0.1.{10 + host}"]
        if n % 6 == 5:
            addresses.append(f"127.0.4.{10 + n}")
        spawn(normal_user(env, f"person{n}", addresses, random.Random(rng.random()), stop))
    while not attack.is_set() and not stop():
        await asyncio.sleep(0.02)
    for a in plan.attackers:
        r = random.Random(a.seed)
        if a.kind == "credential_stuffing":
            spawn(credential_stuffing(env, a.addresses[0], r, stop, a.pace))
        elif a.kind == "channel_scanning":
            spawn(channel_scanning(env, str(a.name), a.addresses[0], r, stop, a.pace))
        elif a.kind == "regular_bot":
            spawn(regular_bot(env, str(a.name), a.addresses[0], r, stop, a.pace))
        elif a.kind == "large_payloads":
            spawn(large_payloads(env, str(a.name), a.addresses[0], r, stop))
        elif a.kind == "token_many_addresses":
            spawn(token_many_addresses(env, str(a.name), list(a.addresses), r, stop))
    while not stop():
        await asyncio.sleep(0.1)
    await asyncio.wait(tasks, timeout=20)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _measure_lag(samples: list[float], stop: asyncio.Event) -> None:
    """How late the gateway's event loop wakes up (what skews event timestamps)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.05)
        samples.append(loop.time() - before - 0.05)


async def run_scenario(
    config: ScenarioConfig, progress: Callable[[str], None] | None = None
) -> ScenarioResult:
    """Warm up on normal traffic, then inject the attacks; every decision labelled.

    The gateway runs here; the clients run in child processes (the bots in
    one of their own), so that the event timestamps the gateway takes reflect
    its own event loop and not the clients' work. The attack phase starts and ends on long-window
    boundaries, so ``attack_windows`` must be a multiple of ``long_window_windows``.
    """
    if config.long_window_windows and config.attack_windows % config.long_window_windows:
        raise ValueError("attack_windows must be a multiple of long_window_windows")
    say = progress or (lambda _: None)
    started = time.monotonic()
    attackers = plan_attackers(config)
    labels = labels_for(attackers)
    context = multiprocessing.get_context("spawn")
    attack, stop = context.Event(), context.Event()
    async with Environment(config) as env:
        detector = env.detector
        decisions: list[Scored] = []
        detector.listeners.append(lambda scored: decisions.extend(scored))
        timed = tuple(a for a in attackers if a.kind in TIMED_KINDS)
        others = tuple(a for a in attackers if a.kind not in TIMED_KINDS)
        plans = [ClientPlan(env.port, env.ca_cert, env.jwt, config, others)]
        if timed:
            plans.append(ClientPlan(env.port, env.ca_cert, env.jwt, config, timed, False))
        processes = [
            context.Process(
                target=client_process, args=(plan, attack, stop), name="rabbitgate-eval-clients"
            )
            for plan in plans
        ]
        for process in processes:
            process.start()
        lag: list[float] = []
        measuring = asyncio.Event()
        try:
            say(
                f"gateway on port {env.port}; {config.normal_users} normal users (client "
                f"pids {', '.join(str(p.pid) for p in processes)}); learning for "
                f"{config.warmup_windows} windows of {config.window_seconds:g} s"
            )
            while detector.learning or detector.windows_closed < config.warmup_windows:
                await asyncio.sleep(0.2)
                if not all(p.is_alive() for p in processes):
                    raise RuntimeError("a client process died")

            def boundary() -> int:
                if config.long_window_windows:
                    return int(detector.long_windows_closed)
                return int(detector.windows_closed)

            # Start the attacks right after a (long) window boundary: whole windows.
            closed = boundary()
            while boundary() == closed:
                await asyncio.sleep(0.02)
            seconds = config.window_seconds
            t0 = math.floor(time.time() / seconds) * seconds  # the boundary just passed
            t1 = t0 + config.attack_windows * seconds
            attack.set()
            lag_task = asyncio.get_running_loop().create_task(_measure_lag(lag, measuring))
            say(f"model trained; attacks injected for {config.attack_windows} windows")
            while not decisions or max(d.window.end for d in decisions) < t1 - 0.5:
                await asyncio.sleep(0.2)
            measuring.set()
            await lag_task
        finally:
            stop.set()
            for process in processes:
                await asyncio.to_thread(process.join, 30)
                if process.is_alive():
                    process.terminate()  # a client process this run started
                    await asyncio.to_thread(process.join, 5)
        attack_decisions = [
            d for d in decisions if d.window.start >= t0 - 0.5 and d.window.end <= t1 + 0.5
        ]
        assert detector.store is not None
        alerts = await asyncio.to_thread(detector.store.find, limit=10_000)
        model = detector.model
    return ScenarioResult(
        config, attack_decisions, labels, alerts, time.monotonic() - started, sorted(lag), model
    )


def alert_lines(result: ScenarioResult) -> list[str]:
    """Alerts (incidents), not windows: how many landed on normal subjects in the
    attack phase, per subject-hour, and which attacks got one."""
    c = result.config
    short_key = f"@{c.window_seconds:g}s"
    normal_windows = sum(
        1
        for d in result.decisions
        if d.key.endswith(short_key) and label_of(d, result.labels) == "normal"
    )
    subject_hours = normal_windows * c.window_seconds / 3600.0
    phase_start = min((d.window.start for d in result.decisions), default=0.0)
    on_normal = []
    alerted: set[tuple[str, str]] = set()
    for alert in result.alerts:
        subject = alert["subject"]
        key = (subject["kind"], str(subject.get(subject["kind"]) or ""))
        if key in result.labels.positives:
            alerted.add(key)
        elif key not in result.labels.excluded and alert.get("last_seen", "") >= iso(phase_start):
            on_normal.append(alert)
    rate = len(on_normal) / subject_hours * 10_000 if subject_hours else 0.0
    lines = [
        f"Alerts on normal subjects in the attack phase: {len(on_normal)}"
        f" ({normal_windows} normal subject-windows = {subject_hours:.2f} subject-hours;"
        f" {rate:.0f} per 10k subject-hours).",
        f"Attack subjects with an alert: {len(alerted)} of {len(result.labels.positives)}.",
    ]
    for alert in on_normal[:10]:
        subject = alert["subject"]
        reasons = "; ".join(r["text"] for r in alert["reasons"][:2])
        lines.append(f"  on {subject['kind']} {subject.get(subject['kind'])}: {reasons}")
    return lines


def report(result: ScenarioResult) -> str:
    """The evaluation tables as Markdown: by either window, then each length alone."""
    c = result.config
    short_key = f"@{c.window_seconds:g}s"
    long_seconds = c.window_seconds * c.long_window_windows
    parts = [
        f"Flagged in its {c.window_seconds:g} s window or the {long_seconds:g} s window covering it"
        " (unit: one subject in one short window):",
        "",
        format_table(metrics(result.decisions, result.labels, short_key)),
    ]
    if c.long_window_windows:
        for mode, title in (
            ("short", f"{c.window_seconds:g} s windows alone"),
            ("long", f"{long_seconds:g} s windows alone"),
        ):
            parts += [
                "",
                f"{title}:",
                "",
                format_table(metrics(result.decisions, result.labels, short_key, mode)),
            ]
    parts += ["", *alert_lines(result)]
    parts += [
        "",
        f"{c.normal_users} normal users, {c.attackers_per_kind} attackers per kind, "
        f"{c.warmup_windows} warm-up + {c.attack_windows} attack windows, "
        f"budget {c.false_alerts_per_10k_subject_hours:g} per 10k subject-hours, seed {c.seed}; "
        f"{len(result.alerts)} alerts raised; {result.seconds:.0f} s wall time.",
    ]
    if result.loop_lag:
        lag = result.loop_lag
        p50, p99 = lag[len(lag) // 2], lag[min(len(lag) - 1, int(len(lag) * 0.99))]
        parts.append(
            f"Gateway event-loop lag during the attack phase (what blurs event timestamps): "
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {lag[-1] * 1000:.0f} ms."
        )
    return "\n".join(parts)

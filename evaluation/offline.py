"""The offline evaluation: synthetic traffic through the detector's own code, no network.

``python -m evaluation.offline --seed 1`` simulates, in event time, a
population of normal users (10,000 by default) and the five attack kinds, and
drives with it exactly what the live detector runs: ``WindowAggregator`` (the
worker's aggregation), ``Worker.process`` (vectors, long window, model,
scores, explanations, warm-up fitting with the alert budget) and
``IncidentBook`` (one alert per subject and episode). Only the clock is
simulated: no gateway, no sockets, no RabbitMQ, so hours of traffic take
minutes.

The run:

1. a baseline of ``baseline_hours`` (default 1 h) of normal traffic: the
   worker warms up on it and fits the model, as a gateway without a model does;
2. ``hours`` (default 2 h) of normal traffic plus attackers (10 of each kind
   by default), each starting at a random moment and lasting
   ``attack_windows`` windows.

The second phase also holds normal behaviour the baseline never showed (the
detector was not tuned on it): sessions half as long (more ends and starts),
users hopping rooms, users idle for minutes in a session and then back, and a
gateway restart half-way, after which every connected user reconnects within
15 s.

Counted: a *false alert* is a new incident on a subject no attacker used; a
subject-hour is 3600 / window_seconds scored windows of one subject (an idle
subject makes no window); an attacker is *detected* when an incident on the
subject its attack is about (the address for credential stuffing, the user
otherwise) starts while it attacks (or in the window after); *detect windows*
counts the windows from the one the attack started in to the one that raised
the alert, both included. The last line of the output is
``false_alerts_per_10k_subject_hours=F min_recall=R max_detect_windows=W``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from anomaly.features import WindowAggregator
from anomaly.incidents import Change, IncidentBook, IncidentPolicy
from anomaly.settings import AnomalySettings
from anomaly.worker import Worker
from gateway.telemetry.events import TrafficEvent

ATTACK_KINDS = (
    "credential_stuffing",
    "channel_scanning",
    "regular_bot",
    "large_payloads",
    "token_many_addresses",
)
START = 1_800_000_000.0  # simulated epoch seconds (the clock is ours)


@dataclass(frozen=True)
class OfflineConfig:
    users: int = 10_000
    baseline_hours: float = 1.0
    hours: float = 2.0
    window_seconds: float = 60.0
    long_window_windows: int = 10
    attackers_per_kind: int = 10
    attack_windows: int = 10
    seed: int = 1
    false_alerts_per_10k_subject_hours: float = 1.0
    restart_at: float = 0.5  # share of the second phase at which the gateway restarts
    persist_min: int = AnomalySettings.persist_min
    persist_windows: int = AnomalySettings.persist_windows


# --- normal users -------------------------------------------------------------


def _size(rng: random.Random) -> int:
    return max(2, min(1500, int(rng.lognormvariate(3.6, 0.9))))


class NormalUser:
    """One person: sessions from one or two devices, Poisson messages with bursts."""

    __slots__ = (
        "name",
        "addresses",
        "rate",
        "rooms",
        "online",
        "session",
        "devices",
        "session_end",
        "next_start",
        "next_publish",
        "hopper",
        "idler",
        "sessions",
    )

    def __init__(self, n: int, addresses: list[str], rng: random.Random) -> None:
        self.name = f"u{n}"
        self.addresses = addresses
        self.rate = 10 ** rng.uniform(-2.7, -0.8)  # 0.002 .. 0.16 messages a second
        self.rooms = [f"chat.room{r}" for r in rng.sample(range(40), rng.randint(1, 3))]
        self.online = False
        self.session = ""
        self.devices: list[str] = []
        self.session_end = 0.0
        self.next_start = START + rng.uniform(0, 1200)
        self.next_publish = math.inf
        self.hopper = rng.random() < 0.05  # eval phase only: changes rooms every few minutes
        self.idler = rng.random() < 0.10  # eval phase only: idle for minutes within a session
        self.sessions = 0


@dataclass
class Phase:
    """How the population behaves in a phase (the baseline or the evaluation)."""

    session_minutes: float
    offline_minutes: float
    untuned: bool  # the behaviours the baseline never showed


BASELINE = Phase(session_minutes=30.0, offline_minutes=10.0, untuned=False)
EVALUATION = Phase(session_minutes=15.0, offline_minutes=5.0, untuned=True)


class Population:
    def __init__(self, users: int, rng: random.Random) -> None:
        self.rng = rng
        self.users: list[NormalUser] = []
        nat = 0
        n = 0
        while n < users:
            if rng.random() < 0.15:  # a NAT: 2 .. 40 users behind one address
                size = min(users - n, int(2 + rng.paretovariate(1.3)) if rng.random() < 0.9 else 40)
                size = max(1, min(size, 40))
                address = f"10.1.{nat // 250}.{nat % 250}"
                nat += 1
                members = [[address] for _ in range(size)]
            else:
                members = [[f"10.0.{n // 250}.{n % 250}"]]
            for addresses in members:
                if rng.random() < 0.05:  # a second device (a phone) on its own address
                    addresses = [*addresses, f"10.2.{n // 250}.{n % 250}"]
                self.users.append(NormalUser(n, addresses, rng))
                n += 1

    def window(self, t0: float, t1: float, phase: Phase, out: list[TrafficEvent]) -> None:
        rng = self.rng
        for user in self.users:
            if not user.online:
                if user.next_start < t1:
                    self._start(user, max(t0, user.next_start), phase, out)
                else:
                    continue
            self._publishes(user, t1, phase, out)
            self._extras(user, t0, t1, phase, out)
            if user.session_end < t1:
                self._end(user, user.session_end, out)
                user.next_start = user.session_end + rng.expovariate(
                    1 / (60 * phase.offline_minutes)
                )
                if user.next_start < t1:  # a quick reconnect within the window
                    self._start(user, user.next_start, phase, out)
                    self._publishes(user, t1, phase, out)

    def _start(self, user: NormalUser, at: float, phase: Phase, out: list[TrafficEvent]) -> None:
        rng = self.rng
        user.online = True
        user.sessions += 1
        user.session = f"{user.name}.{user.sessions}"
        two = len(user.addresses) > 1 and rng.random() < 0.6
        user.devices = list(user.addresses) if two else [user.addresses[0]]
        for address in user.devices:
            if rng.random() < 0.03:  # an expired token first, as after a laptop's sleep
                out.append(TrafficEvent("connect", address, at=at - 0.5))
                out.append(TrafficEvent("auth_failed", address, detail="expired", at=at - 0.4))
            out.append(TrafficEvent("connect", address, at=at))
            out.append(TrafficEvent("auth_ok", address, user.name, user.session, at=at + 0.05))
            for k, room in enumerate([*user.rooms, f"user.{user.name}.inbox"]):
                out.append(
                    TrafficEvent(
                        "subscribe", address, user.name, user.session, room, at=at + 0.1 + k * 0.02
                    )
                )
        user.session_end = at + rng.expovariate(1 / (60 * phase.session_minutes))
        user.next_publish = at + rng.expovariate(user.rate)

    def _end(self, user: NormalUser, at: float, out: list[TrafficEvent]) -> None:
        for address in user.devices:
            out.append(TrafficEvent("closed", address, user.name, user.session, at=at))
        user.online = False
        user.next_publish = math.inf

    def _publishes(
        self, user: NormalUser, t1: float, phase: Phase, out: list[TrafficEvent]
    ) -> None:
        rng = self.rng
        end = min(t1, user.session_end)
        while user.next_publish < end:
            at = user.next_publish
            address = user.devices[0] if len(user.devices) == 1 else rng.choice(user.devices)
            room = rng.choice(user.rooms)
            burst = 1 if rng.random() < 0.75 else rng.randint(2, 5)
            for _ in range(burst):
                out.append(
                    TrafficEvent(
                        "publish", address, user.name, user.session, room, _size(rng), at=at
                    )
                )
                at += rng.uniform(0.5, 3.0)
            gap = rng.expovariate(user.rate)
            if phase.untuned and user.idler and rng.random() < 0.2:
                gap += rng.uniform(180, 1200)  # away from the keyboard for minutes
            user.next_publish = at + gap

    def _extras(
        self, user: NormalUser, t0: float, t1: float, phase: Phase, out: list[TrafficEvent]
    ) -> None:
        """The rare events of a session: room changes, a refused channel, a bad frame."""
        rng = self.rng
        at = rng.uniform(t0, t1)
        if at >= user.session_end:
            return
        address = user.devices[0]
        draw = rng.random()
        hop = 0.3 if phase.untuned and user.hopper else 0.02
        if draw < hop:
            new = f"chat.room{rng.randrange(40)}"
            old = rng.choice(user.rooms)
            out.append(TrafficEvent("unsubscribe", address, user.name, user.session, old, at=at))
            out.append(
                TrafficEvent("subscribe", address, user.name, user.session, new, at=at + 0.2)
            )
            user.rooms[user.rooms.index(old)] = new
        elif draw < hop + 0.004:
            channel = rng.choice(["tenant.acme.feed", f"user.{user.name}x.inbox"])
            out.append(
                TrafficEvent(
                    "denied", address, user.name, user.session, channel, detail="subscribe", at=at
                )
            )
        elif draw < hop + 0.006:
            out.append(
                TrafficEvent(
                    "malformed", address, user.name, user.session, detail="bad_request", at=at
                )
            )
        elif draw < hop + 0.03:
            out.append(
                TrafficEvent("auth_ok", address, user.name, user.session, detail="refresh", at=at)
            )

    def restart(self, at: float, out: list[TrafficEvent], phase: Phase) -> None:
        """A gateway restart: every connection closes; everyone is back within 15 s."""
        rng = self.rng
        for user in self.users:
            if user.online:
                self._end(user, at + rng.uniform(0, 0.5), out)
                self._start(user, at + rng.uniform(1, 15), phase, out)


# --- attackers ------------------------------------------------------------------


@dataclass
class Attacker:
    kind: str
    name: str | None
    addresses: list[str]
    start: float
    end: float
    pace: float
    rng: random.Random
    next_at: float = 0.0
    state: dict[str, float] = field(default_factory=dict)

    @property
    def subject(self) -> tuple[str, str]:
        """The subject the attack is about."""
        if self.kind == "credential_stuffing":
            return ("address", self.addresses[0])
        assert self.name is not None
        return ("user", self.name)

    def touched(self) -> set[tuple[str, str]]:
        found = {("address", a) for a in self.addresses}
        if self.name is not None:
            found.add(("user", self.name))
        return found

    def window(self, t0: float, t1: float, out: list[TrafficEvent]) -> None:
        lo, hi = max(t0, self.start), min(t1, self.end)
        if lo >= hi:
            return
        getattr(self, f"_{self.kind}")(lo, hi, out)

    def _credential_stuffing(self, lo: float, hi: float, out: list[TrafficEvent]) -> None:
        address = self.addresses[0]
        at = max(self.next_at, lo)
        while at < hi:
            out.append(TrafficEvent("connect", address, at=at))
            out.append(TrafficEvent("auth_failed", address, detail="bad_signature", at=at + 0.01))
            at += self.rng.expovariate(self.pace)
        self.next_at = at

    def _session(self, address: str, at: float, out: list[TrafficEvent], room: str) -> None:
        assert self.name is not None
        out.append(TrafficEvent("connect", address, at=at))
        out.append(TrafficEvent("auth_ok", address, self.name, f"{self.name}.s", at=at + 0.05))
        out.append(
            TrafficEvent("subscribe", address, self.name, f"{self.name}.s", room, at=at + 0.1)
        )

    def _channel_scanning(self, lo: float, hi: float, out: list[TrafficEvent]) -> None:
        address, name = self.addresses[0], self.name
        if not self.state:
            self._session(address, lo, out, "chat.room0")
            self.state["on"] = 1
            self.next_at = lo + 1
        at = max(self.next_at, lo)
        while at < hi:
            guess = self.rng.random()
            if guess < 0.7:
                channel = f"user.user{self.rng.randrange(10**4)}.inbox"
                out.append(TrafficEvent("denied", address, name, f"{name}.s", channel, at=at))
            else:
                channel = f"chat.r{self.rng.randrange(10**4)}"
                out.append(TrafficEvent("subscribe", address, name, f"{name}.s", channel, at=at))
            at += self.rng.uniform(0.6, 1.4) / self.pace
        self.next_at = at

    def _regular_bot(self, lo: float, hi: float, out: list[TrafficEvent]) -> None:
        address, name = self.addresses[0], self.name
        if not self.state:
            self._session(address, lo, out, "chat.room0")
            self.state["on"] = 1
            self.next_at = lo + 0.5
        at = max(self.next_at, lo)
        while at < hi:
            size = 58 + self.rng.randint(0, 8)  # a template, prices varying its size a little
            jitter = self.rng.gauss(0, 0.005)  # the gateway's clock: a few ms
            out.append(
                TrafficEvent(
                    "publish", address, name, f"{name}.s", "chat.room0", size, at=at + jitter
                )
            )
            at += self.pace
        self.next_at = at

    def _large_payloads(self, lo: float, hi: float, out: list[TrafficEvent]) -> None:
        address, name = self.addresses[0], self.name
        if not self.state:
            self._session(address, lo, out, "chat.room1")
            self.state["on"] = 1
            self.next_at = lo + 1
        at = max(self.next_at, lo)
        while at < hi:
            for _ in range(self.rng.randint(3, 8)):
                size = self.rng.randint(8 * 1024, 48 * 1024)
                out.append(
                    TrafficEvent("publish", address, name, f"{name}.s", "chat.room1", size, at=at)
                )
                at += self.rng.uniform(0.05, 0.3)
            at += self.rng.uniform(5, 30) / self.pace
        self.next_at = at

    def _token_many_addresses(self, lo: float, hi: float, out: list[TrafficEvent]) -> None:
        """One stolen token used from every address at once, as people would use it:
        sessions of a minute or two, a message every ten seconds or so."""
        name = self.name
        rng = self.rng
        for k, address in enumerate(self.addresses):
            key = f"next{k}"
            at = max(self.state.get(key, lo + rng.uniform(0, 20)), lo)
            while at < hi:
                self._session(address, at, out, f"chat.room{rng.randrange(40)}")
                stay = at + rng.uniform(20, 120)
                t = at + rng.expovariate(self.pace)
                while t < min(stay, hi):
                    out.append(
                        TrafficEvent(
                            "publish", address, name, f"{name}.s", "chat.room2", _size(rng), at=t
                        )
                    )
                    t += rng.expovariate(self.pace)
                at = stay + rng.uniform(1, 10)
            self.state[key] = at


def plan_attackers(config: OfflineConfig, rng: random.Random, t_start: float) -> list[Attacker]:
    w = config.window_seconds
    total = int(config.hours * 3600 / w)
    found = []
    for kind in ATTACK_KINDS:
        for i in range(config.attackers_per_kind):
            first = rng.randrange(3, max(4, total - config.attack_windows - 2))
            start = t_start + first * w + rng.uniform(0, w)
            end = start + config.attack_windows * w
            r = random.Random(rng.random())
            base = f"{kind[:5]}{i}"
            if kind == "credential_stuffing":
                found.append(
                    Attacker(kind, None, [f"10.9.1.{i}"], start, end, rng.uniform(0.2, 2.0), r)
                )
            elif kind == "channel_scanning":
                found.append(
                    Attacker(kind, base, [f"10.9.2.{i}"], start, end, rng.uniform(0.2, 2.0), r)
                )
            elif kind == "regular_bot":
                found.append(
                    Attacker(kind, base, [f"10.9.3.{i}"], start, end, rng.uniform(1.0, 8.0), r)
                )
            elif kind == "large_payloads":
                found.append(Attacker(kind, base, [f"10.9.4.{i}"], start, end, 1.0, r))
            else:
                addresses = [f"10.9.{10 + i}.{j}" for j in range(rng.randint(4, 12))]
                pace = rng.uniform(0.05, 0.2)  # publishes a second, per address
                found.append(Attacker(kind, base, addresses, start, end, pace, r))
    return found


# --- the run --------------------------------------------------------------------


@dataclass
class KindResult:
    kind: str
    attackers: int = 0
    detected: int = 0
    detect_windows: list[int] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.attackers if self.attackers else 1.0


@dataclass
class Result:
    config: OfflineConfig
    normal_windows: int  # scored subject-windows of normal subjects (short windows)
    false_alerts: list[Change]
    kinds: dict[str, KindResult]
    alerts: int
    updates: int
    suppressed: int
    seconds: float
    events: int
    misses: list[str]
    thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def subject_hours(self) -> float:
        return self.normal_windows * self.config.window_seconds / 3600.0

    @property
    def false_alerts_per_10k(self) -> float:
        return len(self.false_alerts) / self.subject_hours * 10_000 if self.subject_hours else 0.0

    @property
    def min_recall(self) -> float:
        return min(k.recall for k in self.kinds.values())

    @property
    def max_detect_windows(self) -> int:
        return max((max(k.detect_windows, default=0) for k in self.kinds.values()), default=0)


def run(config: OfflineConfig, progress: Callable[[str], None] | None = None) -> Result:
    say = progress or (lambda _: None)
    began = time.monotonic()
    rng = random.Random(config.seed)
    w = config.window_seconds
    population = Population(config.users, random.Random(rng.random()))
    baseline_windows = int(config.baseline_hours * 3600 / w)
    eval_windows = int(config.hours * 3600 / w)
    with tempfile.TemporaryDirectory(prefix="rabbitgate-offline-") as tmp:
        settings = AnomalySettings(
            enabled=True,
            data_dir=Path(tmp),
            window_seconds=w,
            long_window_windows=config.long_window_windows,
            warmup_windows=baseline_windows,
            retrain_interval_seconds=0,
            false_alerts_per_10k_subject_hours=config.false_alerts_per_10k_subject_hours,
            persist_min=config.persist_min,
            persist_windows=max(config.persist_min, config.persist_windows),
        )
        worker = Worker(settings)
        worker.load()
        book = IncidentBook(
            IncidentPolicy(
                w,
                settings.incident_quiet_windows * w,
                settings.suppress_seconds,
                settings.persist_min,
                settings.persist_windows,
            )
        )
        aggregator = WindowAggregator(settings.max_subjects, start=START)
        t = START
        events_total = 0
        for index in range(baseline_windows):
            out: list[TrafficEvent] = []
            population.window(t, t + w, BASELINE, out)
            out.sort(key=_at)
            for event in out:
                aggregator.add(event)
            events_total += len(out)
            worker.process(aggregator.swap(t + w), False)
            t += w
            if index % 10 == 9:
                say(f"baseline: {index + 1}/{baseline_windows} windows, {events_total} events")
        if worker.model is None:
            raise RuntimeError("the baseline was too small to train on")
        t_eval = t
        thresholds = {
            key: (keyed.threshold, keyed.persist_threshold)
            for key, keyed in worker.model.keys.items()
        }
        attackers = plan_attackers(config, random.Random(rng.random()), t_eval)
        by_subject = {a.subject: a for a in attackers}
        touched = set().union(*(a.touched() for a in attackers)) if attackers else set()
        kinds = {kind: KindResult(kind) for kind in ATTACK_KINDS if config.attackers_per_kind}
        for a in attackers:
            kinds[a.kind].attackers += 1
        detected: dict[tuple[str, str], int] = {}
        restart = t_eval + round(config.restart_at * eval_windows) * w + w / 3
        normal_windows = 0
        false_alerts: list[Change] = []
        counts = {"new": 0, "update": 0, "suppressed": 0}
        for index in range(eval_windows):
            out = []
            population.window(t, t + w, EVALUATION, out)
            if t <= restart < t + w:
                population.restart(restart, out, EVALUATION)
            for attacker in attackers:
                attacker.window(t, t + w, out)
            out.sort(key=_at)
            for event in out:
                aggregator.add(event)
            events_total += len(out)
            state = aggregator.swap(t + w)
            for table, kind in ((state.users, "user"), (state.addresses, "address")):
                normal_windows += sum(
                    1 for key, s in table.items() if (kind, key) not in touched and s.active()
                )
            outcome = worker.process(state, False)
            changes = book.observe(d.finding() for d in outcome.scored)
            changes += book.expire(t + w)
            for change in changes:
                if change.kind in counts:
                    counts[change.kind] += 1
                if change.kind != "new":
                    continue
                subject = change.incident.subject
                found = by_subject.get(subject)
                if found is not None:
                    if subject not in detected and found.start < t + w <= found.end + w:
                        detected[subject] = index - int((found.start - t_eval) // w) + 1
                elif subject not in touched:
                    false_alerts.append(change)
            t += w
            if index % 10 == 9:
                say(
                    f"evaluation: {index + 1}/{eval_windows} windows, {events_total} events,"
                    f" {counts['new']} alerts ({len(false_alerts)} on normal subjects)"
                )
    misses = []
    for a in attackers:
        windows = detected.get(a.subject)
        if windows is None:
            misses.append(
                f"{a.kind} {a.subject[0]} {a.subject[1]} (pace {a.pace:.2f}) not detected"
            )
        else:
            kinds[a.kind].detected += 1
            kinds[a.kind].detect_windows.append(windows)
    return Result(
        config,
        normal_windows,
        false_alerts,
        kinds,
        counts["new"],
        counts["update"],
        counts["suppressed"],
        time.monotonic() - began,
        events_total,
        misses,
        thresholds,
    )


def _at(event: TrafficEvent) -> float:
    return event.at


def report(result: Result) -> str:
    c = result.config
    lines = [
        f"seed {c.seed}: {c.users} normal users, {c.baseline_hours:g} h baseline +"
        f" {c.hours:g} h evaluated, {c.window_seconds:g} s windows"
        f" (long: {c.long_window_windows}), budget {c.false_alerts_per_10k_subject_hours:g}"
        f" false alerts per 10k subject-hours; {result.events} events in {result.seconds:.0f} s",
        "",
        "| attack kind | attackers | detected | recall | detect windows (max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in result.kinds.values():
        lines.append(
            f"| {kind.kind} | {kind.attackers} | {kind.detected} | {kind.recall:.2f} |"
            f" {max(kind.detect_windows, default=0)} |"
        )
    lines += [
        "",
        f"normal subject-windows {result.normal_windows}"
        f" ({result.subject_hours:.0f} subject-hours);"
        f" false alerts {len(result.false_alerts)}; alerts {result.alerts},"
        f" updates {result.updates}, suppressed {result.suppressed}",
    ]
    for key, (single, persist) in sorted(result.thresholds.items()):
        lines.append(f"  {key}: single-window threshold {single:.3f}, persistence {persist:.3f}")
    for change in result.false_alerts[:20]:
        incident = change.incident
        how = "one window" if change.finding is not None and change.finding.strong else "k of n"
        lines.append(
            f"  false alert ({how}): {incident.subject[0]} {incident.subject[1]}"
            f" score {incident.score:.3f} ({', '.join(incident.reasons)})"
        )
    for miss in result.misses:
        lines.append(f"  miss: {miss}")
    lines.append(
        f"false_alerts_per_10k_subject_hours={result.false_alerts_per_10k:.2f}"
        f" min_recall={result.min_recall:.2f} max_detect_windows={result.max_detect_windows}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.offline", description=__doc__)
    defaults = OfflineConfig()
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--baseline-hours", type=float, default=defaults.baseline_hours)
    parser.add_argument("--hours", type=float, default=defaults.hours)
    parser.add_argument("--window", type=float, default=defaults.window_seconds)
    parser.add_argument("--long-windows", type=int, default=defaults.long_window_windows)
    parser.add_argument("--attackers", type=int, default=defaults.attackers_per_kind)
    parser.add_argument("--budget", type=float, default=defaults.false_alerts_per_10k_subject_hours)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--persist",
        nargs=2,
        type=int,
        metavar=("K", "N"),
        default=(defaults.persist_min, defaults.persist_windows),
        help="an alert from K anomalous windows of the last N (1 1: single windows only)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    config = OfflineConfig(
        users=args.users,
        baseline_hours=args.baseline_hours,
        hours=args.hours,
        window_seconds=args.window,
        long_window_windows=args.long_windows,
        attackers_per_kind=args.attackers,
        seed=args.seed,
        false_alerts_per_10k_subject_hours=args.budget,
        persist_min=args.persist[0],
        persist_windows=args.persist[1],
    )
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    print(report(run(config, progress)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

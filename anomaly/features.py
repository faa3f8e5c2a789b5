"""Traffic events -> one feature vector per subject per time window (pure, no I/O).

``WindowAggregator.add`` is the event-bus sink's whole cost on the hot path:
O(1) per event (a dict lookup per subject, counters, running sums, sets capped
in size). ``swap`` hands the finished window's state over in O(1); turning it
into vectors (``subject_windows``) is done elsewhere, off the event loop.

Each event counts for up to two subjects: its user (the verified ``sub``) and
its client address. Memory is bounded: at most ``max_subjects`` subjects of
each kind per window; any further subject's events are counted into one
``OVERFLOW`` subject of that kind, which the detector reports by itself (an
attacker cycling through addresses cannot grow the table).

``payload_entropy``: events carry sizes, never bodies (``gateway/telemetry/events.py``),
so this is the Shannon entropy, in bits, of the distribution of payload
*sizes* in the window. A bot replaying one template scores near 0; people
typing messages of varied length score 1.5-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from gateway.telemetry.events import TrafficEvent

SubjectKind = Literal["user", "address"]

FEATURES: tuple[str, ...] = (
    "publish_rate",  # publishes per second
    "bytes_rate",  # published body bytes per second
    "mean_payload",  # bytes
    "max_payload",  # bytes
    "interarrival_mean",  # seconds between publishes (the window length when < 2 publishes)
    "interarrival_cv",  # std / mean of those gaps (1.0 when < 5; trimmed from 8: see trimmed())
    "distinct_channels",  # channels subscribed, published, unsubscribed or denied
    "subscribe_ratio",  # subscribes / (subscribes + publishes); 0 when neither
    "denials",  # requests the policies refused
    "auth_failures",  # tokens refused
    "rate_limited",  # requests a rate limit refused
    "malformed",  # frames refused as bad_request / too_large
    "reconnects",  # connections opened (address: handshakes; user: authentications)
    "distinct_addresses",  # addresses a user came from (1 for an address subject)
    "distinct_users",  # users seen from an address (1 for a user subject)
    "payload_entropy",  # bits, over payload sizes (see module docstring)
)

OVERFLOW = "*overflow*"
# Caps of the per-subject sets: a value at the cap means "at least this many".
MAX_CHANNELS = 64
MAX_OTHERS = 64
MAX_SIZES = 64
MAX_EVIDENCE = 20  # security decisions kept per subject and window, for the alert
# Fewer intervals than this say nothing about regularity: with 3 exponential
# (Poisson) gaps, 1.2% of samples have cv < 0.1; with 5, 0.02%.
MIN_INTERVALS = 5
# From this many intervals on, the cv leaves out the largest and the smallest
# gaps: a stall (of the gateway's event loop, of the network) shows up as one
# long gap and one short catch-up gap, and would hide a metronome. One of each
# from 8 gaps, two from 12, three from 16 (``trimmed``); Poisson gaps trimmed
# so still have cv < 0.1 at most 0.04% of the time (simulated).
TRIM_FROM = 8
MAX_TRIM = 3


def trimmed(intervals: int) -> int:
    """How many of the smallest, and of the largest, gaps the cv leaves out."""
    if intervals < TRIM_FROM:
        return 0
    return min(MAX_TRIM, 1 + (intervals - TRIM_FROM) // 4)


_OTHER_SIZE = -1  # histogram bucket for sizes beyond MAX_SIZES distinct ones
# Events that say nothing about behaviour: a subject whose window held only
# these (a connection that ended) would be an empty, misleading vector.
_NO_SIGNAL = frozenset({"closed", "banned"})


class SubjectState:
    """Running aggregates of one subject in one window; mergeable (long windows)."""

    __slots__ = (
        "publishes",
        "bytes",
        "max_payload",
        "subscribes",
        "denials",
        "auth_failures",
        "rate_limited",
        "malformed",
        "reconnects",
        "first_publish",
        "last_publish",
        "intervals",
        "interval_sum",
        "interval_sumsq",
        "low_gaps",
        "high_gaps",
        "channels",
        "others",
        "sizes",
        "user",
        "address",
        "session",
        "evidence",
    )

    def __init__(self) -> None:
        self.publishes = 0
        self.bytes = 0
        self.max_payload = 0
        self.subscribes = 0
        self.denials = 0
        self.auth_failures = 0
        self.rate_limited = 0
        self.malformed = 0
        self.reconnects = 0
        self.first_publish = 0.0
        self.last_publish = 0.0
        self.intervals = 0
        self.interval_sum = 0.0
        self.interval_sumsq = 0.0
        # Tuples and dicts of strings rather than lists and sets: the collector
        # stops tracking them, and a window holds thousands of subjects that
        # live long enough to reach the oldest generation (full collections
        # would then scan them all, holding up the event loop).
        self.low_gaps: tuple[float, ...] = ()  # the MAX_TRIM smallest gaps, ascending
        self.high_gaps: tuple[float, ...] = ()  # the MAX_TRIM largest gaps, ascending
        self.channels: dict[str, None] = {}
        self.others: dict[str, None] = {}  # addresses of a user, users of an address
        self.sizes: dict[int, int] = {}
        self.user: str | None = None  # last seen (the "other" side of the subject)
        self.address: str | None = None
        self.session: str | None = None
        # The window's first security decisions, for the alert (never a token:
        # events carry none): (kind, channel, detail, address or user).
        self.evidence: tuple[tuple[str | None, ...], ...] = ()

    def add(self, event: TrafficEvent, other: str | None, count_reconnect: bool) -> None:
        session = event.session
        if session is not None:
            self.session = session
        if other is not None:
            others = self.others
            if other not in others and len(others) < MAX_OTHERS:
                others[other] = None
            if count_reconnect:
                self.user = other
            else:
                self.address = other
        kind = event.kind
        if kind == "publish":
            size = event.size
            self.publishes += 1
            self.bytes += size
            if size > self.max_payload:
                self.max_payload = size
            at = event.at
            if self.publishes == 1:
                self.first_publish = at
            else:
                gap = at - self.last_publish
                if gap < 0:  # events from two processes' clocks; never negative
                    gap = 0.0
                self.intervals += 1
                self.interval_sum += gap
                self.interval_sumsq += gap * gap
                self._extremes(gap)
            self.last_publish = at
            sizes = self.sizes
            if size in sizes:
                sizes[size] += 1
            elif len(sizes) < MAX_SIZES:
                sizes[size] = 1
            else:
                sizes[_OTHER_SIZE] = sizes.get(_OTHER_SIZE, 0) + 1
            self._channel(event.channel)
        elif kind == "subscribe":
            self.subscribes += 1
            self._channel(event.channel)
        elif kind == "unsubscribe":
            self._channel(event.channel)
        elif kind == "denied":
            self.denials += 1
            self._channel(event.channel)
            self._evidence(event, other)
        elif kind == "auth_failed":
            self.auth_failures += 1
            self._evidence(event, other)
        elif kind == "rate_limited":
            self.rate_limited += 1
            self._evidence(event, other)
        elif kind == "malformed":
            self.malformed += 1
            self._evidence(event, other)
        elif kind == "connect":
            if count_reconnect:
                self.reconnects += 1
        elif kind == "auth_ok":
            if not count_reconnect and event.detail != "refresh":
                self.reconnects += 1

    def _evidence(self, event: TrafficEvent, other: str | None) -> None:
        if len(self.evidence) < MAX_EVIDENCE:
            self.evidence = (*self.evidence, (event.kind, event.channel, event.detail, other))

    def _extremes(self, gap: float) -> None:
        low, high = self.low_gaps, self.high_gaps
        if len(low) < MAX_TRIM or gap < low[-1]:
            self.low_gaps = tuple(sorted((*low, gap)))[:MAX_TRIM]
        if len(high) < MAX_TRIM or gap > high[0]:
            self.high_gaps = tuple(sorted((*high, gap)))[-MAX_TRIM:]

    def active(self) -> bool:
        """Did the subject do anything the features count (not only refresh a token)?"""
        return bool(
            self.publishes
            or self.subscribes
            or self.denials
            or self.auth_failures
            or self.rate_limited
            or self.malformed
            or self.reconnects
            or self.channels
        )

    def _channel(self, channel: str | None) -> None:
        if channel is not None and len(self.channels) < MAX_CHANNELS:
            self.channels[channel] = None

    def merge(self, later: SubjectState) -> None:
        """Fold ``later`` (the same subject, the next window) into this state."""
        if later.publishes:
            if self.publishes:
                gap = max(0.0, later.first_publish - self.last_publish)
                self.intervals += 1
                self.interval_sum += gap
                self.interval_sumsq += gap * gap
                self._extremes(gap)
            else:
                self.first_publish = later.first_publish
            self.last_publish = later.last_publish
        for name in (
            "publishes",
            "bytes",
            "subscribes",
            "denials",
            "auth_failures",
            "rate_limited",
            "malformed",
            "reconnects",
            "intervals",
            "interval_sum",
            "interval_sumsq",
        ):
            setattr(self, name, getattr(self, name) + getattr(later, name))
        self.max_payload = max(self.max_payload, later.max_payload)
        self.low_gaps = tuple(sorted(self.low_gaps + later.low_gaps))[:MAX_TRIM]
        self.high_gaps = tuple(sorted(self.high_gaps + later.high_gaps))[-MAX_TRIM:]
        _union_capped(self.channels, later.channels, MAX_CHANNELS)
        _union_capped(self.others, later.others, MAX_OTHERS)
        for size, count in later.sizes.items():
            if size in self.sizes or len(self.sizes) < MAX_SIZES:
                self.sizes[size] = self.sizes.get(size, 0) + count
            else:
                self.sizes[_OTHER_SIZE] = self.sizes.get(_OTHER_SIZE, 0) + count
        self.user = later.user or self.user
        self.address = later.address or self.address
        self.session = later.session or self.session
        self.evidence = (*self.evidence, *later.evidence)[:MAX_EVIDENCE]


def _union_capped(into: dict[str, None], other: dict[str, None], cap: int) -> None:
    for item in other:
        if len(into) >= cap:
            return
        into[item] = None


@dataclass
class WindowState:
    """What one window saw, per subject; owned by whoever ``swap`` handed it to."""

    start: float
    end: float = 0.0
    users: dict[str, SubjectState] = field(default_factory=dict)
    addresses: dict[str, SubjectState] = field(default_factory=dict)


@dataclass(frozen=True)
class SubjectWindow:
    subject_kind: SubjectKind
    user: str | None
    address: str | None
    session: str | None
    start: float
    end: float
    features: dict[str, float]
    overflow: bool = False  # the OVERFLOW subject: more subjects than max_subjects
    evidence: tuple[tuple[str | None, ...], ...] = ()  # (kind, channel, detail, other)

    @property
    def key(self) -> str:
        """The subject's identity: the user for a user window, else the address."""
        return (self.user if self.subject_kind == "user" else self.address) or ""

    def vector(self) -> list[float]:
        return [self.features[name] for name in FEATURES]


class WindowAggregator:
    """Feeds a window's per-subject state; ``add`` is the event sink.

    Not thread-safe: ``add`` and ``swap`` must run on one thread (the event
    loop). After ``swap`` the returned state is no longer touched here, so
    another thread may read it.
    """

    def __init__(self, max_subjects: int = 10_000, *, start: float = 0.0) -> None:
        self.max_subjects = max_subjects
        self._state = WindowState(start)

    def add(self, event: TrafficEvent) -> None:
        if event.kind in _NO_SIGNAL:
            return
        state = self._state
        user = event.user
        address = event.address
        if user is not None:
            table = state.users
            subject = table.get(user)
            if subject is None:
                if len(table) >= self.max_subjects:
                    user = OVERFLOW
                subject = table.get(user)
                if subject is None:
                    subject = table[user] = SubjectState()
            subject.add(event, address, False)
        if address is not None:
            table = state.addresses
            subject = table.get(address)
            if subject is None:
                if len(table) >= self.max_subjects:
                    address = OVERFLOW
                subject = table.get(address)
                if subject is None:
                    subject = table[address] = SubjectState()
            subject.add(event, event.user, True)

    def swap(self, now: float) -> WindowState:
        """End the current window at ``now`` and start the next one; O(1)."""
        done = self._state
        done.end = now
        self._state = WindowState(now)
        return done

    def close_window(self, now: float) -> list[SubjectWindow]:
        return subject_windows(self.swap(now))


def merge_states(
    into: WindowState,
    later: WindowState,
    max_subjects: int,
    pause: Callable[[], None] | None = None,
    every: int = 256,
) -> WindowState:
    """Fold ``later`` into ``into`` (longer window); returns ``into``.

    ``pause`` is called after every ``every`` subjects (a worker thread hands
    the GIL back to the event loop there)."""
    done = 0
    for mine, theirs in ((into.users, later.users), (into.addresses, later.addresses)):
        for key, state in theirs.items():
            done += 1
            if pause is not None and done % every == 0:
                pause()
            if key not in mine and len(mine) >= max_subjects:
                key = OVERFLOW
            if key in mine:
                mine[key].merge(state)
            else:
                copy = SubjectState()
                copy.merge(state)
                mine[key] = copy
    into.end = later.end
    return into


def subject_windows(state: WindowState, nominal: float | None = None) -> list[SubjectWindow]:
    """One ``SubjectWindow`` per subject of the window (pure; run it off the loop).

    ``nominal``: the configured window length. Rates use the measured length;
    the gap reported when fewer than two publishes were seen is the nominal one,
    so that a window closed a few milliseconds late does not look unusual.
    """
    return list(iter_subject_windows(state, nominal))


def iter_subject_windows(
    state: WindowState, nominal: float | None = None
) -> Iterator[SubjectWindow]:
    """``subject_windows`` one at a time (a caller in a thread can pause between)."""
    seconds = max(state.end - state.start, 1e-3)
    nominal = seconds if nominal is None else nominal
    for kind, table in (("user", state.users), ("address", state.addresses)):
        for key, subject in table.items():
            overflow = key == OVERFLOW
            if not overflow and not subject.active():
                continue  # only refreshes: nothing to judge (an all-default vector)
            if kind == "user":
                user, address = (None if overflow else key), subject.address
            else:
                user, address = subject.user, (None if overflow else key)
            yield SubjectWindow(
                kind,  # type: ignore[arg-type]
                user,
                address,
                subject.session,
                state.start,
                state.end,
                feature_vector(subject, kind, seconds, nominal),  # type: ignore[arg-type]
                overflow,
                subject.evidence,
            )


def feature_vector(
    subject: SubjectState, kind: SubjectKind, seconds: float, nominal: float | None = None
) -> dict[str, float]:
    publishes = subject.publishes
    if subject.intervals >= 1:
        mean_gap = subject.interval_sum / subject.intervals
    else:
        mean_gap = seconds if nominal is None else nominal
    cv = 1.0
    count, total, squares = subject.intervals, subject.interval_sum, subject.interval_sumsq
    trim = trimmed(count)
    if trim:
        dropped = subject.low_gaps[:trim] + subject.high_gaps[-trim:]  # tuples
        count -= 2 * trim
        total -= sum(dropped)
        squares -= sum(gap * gap for gap in dropped)
    if subject.intervals >= MIN_INTERVALS and total > 0:
        mean = total / count
        variance = squares / count - mean * mean
        cv = math.sqrt(max(variance, 0.0)) / mean
    requests = subject.subscribes + publishes
    others = float(len(subject.others))
    return {
        "publish_rate": publishes / seconds,
        "bytes_rate": subject.bytes / seconds,
        "mean_payload": subject.bytes / publishes if publishes else 0.0,
        "max_payload": float(subject.max_payload),
        "interarrival_mean": mean_gap,
        "interarrival_cv": cv,
        "distinct_channels": float(len(subject.channels)),
        "subscribe_ratio": subject.subscribes / requests if requests else 0.0,
        "denials": float(subject.denials),
        "auth_failures": float(subject.auth_failures),
        "rate_limited": float(subject.rate_limited),
        "malformed": float(subject.malformed),
        "reconnects": float(subject.reconnects),
        "distinct_addresses": others if kind == "user" else 1.0,
        "distinct_users": others if kind == "address" else 1.0,
        "payload_entropy": entropy_bits(subject.sizes.values()),
    }


def entropy_bits(counts: Iterable[int]) -> float:
    """Shannon entropy (bits) of a histogram given as its counts."""
    values = [c for c in counts if c > 0]
    total = sum(values)
    if total <= 1:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in values) + 0.0

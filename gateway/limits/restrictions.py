"""Bans and throttles that the anomaly detector's responses put on a subject.

``Node.restrictions`` is checked at three places, each O(1) and a no-op
while nothing is restricted:

* the handshake: a banned address is refused with HTTP 403 (no token work);
* after authentication: a banned user is closed with 4403;
* each publish and subscribe: a throttled user or address gets ``rate_limited``
  beyond ``per_second`` requests a second.

Plain state over times passed in; the detector (``anomaly/detector.py``)
fills it and keeps it in step with the alert store, where restrictions are
kept durably.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.limits.buckets import TokenBucket
from gateway.limits.limiter import Refusal


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  # "user" or "address"
    key: str
    mode: str  # "ban" or "throttle"
    until: float  # epoch seconds


class Restrictions:
    def __init__(self, throttle_per_second: float = 1.0) -> None:
        self.throttle_per_second = throttle_per_second
        self._bans: dict[tuple[str, str], float] = {}
        self._throttles: dict[tuple[str, str], float] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        # An operator's bans (`rabbitgate connections ban`), kept apart from the
        # detector's, which ``replace`` swaps wholesale at every sync.
        self._operator_bans: dict[tuple[str, str], float] = {}

    def __bool__(self) -> bool:
        return bool(self._bans or self._throttles or self._operator_bans)

    def operator_ban(self, kind: str, key: str, until: float) -> None:
        self._operator_bans[(kind, key)] = until

    def operator_unban(self, kind: str, key: str) -> bool:
        """Lift an operator's ban; False when there was none."""
        return self._operator_bans.pop((kind, key), None) is not None

    def operator_bans(self, now: float | None = None) -> list[tuple[str, str, float]]:
        now = time.time() if now is None else now
        return [(k, v, until) for (k, v), until in self._operator_bans.items() if until > now]

    def replace(self, rules: Iterable[Rule]) -> None:
        """Put exactly ``rules`` in force (buckets of throttles kept go on counting)."""
        bans: dict[tuple[str, str], float] = {}
        throttles: dict[tuple[str, str], float] = {}
        for rule in rules:
            table = bans if rule.mode == "ban" else throttles
            key = (rule.kind, rule.key)
            table[key] = max(table.get(key, 0.0), rule.until)
        self._bans = bans
        self._throttles = throttles
        self._buckets = {k: b for k, b in self._buckets.items() if k in throttles}

    def add(self, rule: Rule) -> None:
        table = self._bans if rule.mode == "ban" else self._throttles
        key = (rule.kind, rule.key)
        table[key] = max(table.get(key, 0.0), rule.until)

    def banned(self, kind: str, key: str | None, now: float | None = None) -> bool:
        if not (self._bans or self._operator_bans) or key is None:
            return False
        until = max(self._bans.get((kind, key), 0.0), self._operator_bans.get((kind, key), 0.0))
        return until > (time.time() if now is None else now)

    def throttle(
        self, user: str | None, address: str | None, now: float | None = None
    ) -> Refusal | None:
        """Charge one request of a throttled subject; a Refusal when over its rate."""
        if not self._throttles:
            return None
        now = time.time() if now is None else now
        for key in (("user", user), ("address", address)):
            if key[1] is None:
                continue
            until = self._throttles.get(key)  # type: ignore[arg-type]
            if until is None or until <= now:
                continue
            bucket = self._buckets.get(key)  # type: ignore[arg-type]
            if bucket is None:
                rate = self.throttle_per_second
                bucket = self._buckets[key] = TokenBucket(rate, max(1.0, rate))  # type: ignore[index]
            allowed, retry_after = bucket.take(now)
            if not allowed:
                return Refusal("anomaly_throttle", retry_after)
        return None

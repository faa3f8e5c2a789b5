"""Token buckets as plain values: a rate, a burst, and the time you pass in.

A bucket holds at most ``burst`` tokens and starts full; it gains
``rate_per_second`` tokens a second; a request costing ``cost`` tokens is
admitted when that many are there. This is the bucket Envoy and Centrifugo
use, kept here as GCRA (the generic cell rate algorithm): one number per
bucket, the *theoretical arrival time* ``tat``, from which the tokens follow
as ``burst - (tat - now) * rate``. Same admissions as counting tokens, less
state, and a bucket with ``tat <= now`` is exactly a new (full) one, which is
what lets ``BucketTable`` drop it without changing any answer.

Nothing here reads a clock or touches asyncio: callers pass ``now`` (seconds,
any monotonic origin), so tests drive a known rate and burst with an injected
clock and check exact admitted counts. ``gateway/limits/limiter.py`` runs the same
algorithm in Redis (milliseconds) when the limits are shared between gateway
processes.

Why not the ``limits`` package here: it has no token bucket (two pull requests
adding one were closed unmerged), and its window strategies answer
differently: a fixed window admits up to twice the limit across a boundary, a
moving window keeps one timestamp per admitted request, a sliding window
counter approximates. A burst on top of a steady rate is what clients need.
"""

from __future__ import annotations

import math
from collections import OrderedDict

# A request arriving this close before its token is due is admitted: float
# sums of 1/rate drift by far less, and exact boundaries stay exact.
TOLERANCE_SECONDS = 1e-6


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_second``; starts full."""

    __slots__ = ("interval", "tolerance", "tat")

    def __init__(self, rate_per_second: float, burst: float) -> None:
        if not rate_per_second > 0 or not burst >= 1:
            raise ValueError("a token bucket needs rate_per_second > 0 and burst >= 1")
        self.interval = 1.0 / rate_per_second  # seconds per token
        self.tolerance = self.interval * burst  # how far ``tat`` may run ahead of now
        self.tat = -math.inf  # full

    @property
    def rate_per_second(self) -> float:
        return 1.0 / self.interval

    @property
    def burst(self) -> float:
        return self.tolerance / self.interval

    def take(self, now: float, cost: float = 1) -> tuple[bool, float]:
        """Take ``cost`` tokens if they are there.

        Returns ``(True, 0.0)`` when admitted (the tokens are gone), otherwise
        ``(False, retry_after)``: seconds until ``cost`` tokens will be there
        (``math.inf`` when ``cost`` is more than the bucket ever holds). A
        refused request takes nothing.
        """
        allowed, retry_after, new_tat = self._decide(now, cost)
        if allowed:
            self.tat = new_tat
        return allowed, retry_after

    def charge(self, now: float, cost: float) -> None:
        """Take ``cost`` tokens whatever is there, into debt if need be: for a
        cost known only after the work was done (a replay's messages read).
        Nothing is admitted until the debt is paid back at the bucket's rate."""
        self.tat = max(self.tat, now) + cost * self.interval

    def check(self, now: float, cost: float = 1) -> tuple[bool, float]:
        """What ``take`` would answer, without taking anything."""
        allowed, retry_after, _ = self._decide(now, cost)
        return allowed, retry_after

    def tokens(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (between 0 and ``burst``)."""
        return max(0.0, (self.tolerance - max(0.0, self.tat - now)) / self.interval)

    def is_full(self, now: float) -> bool:
        """True when the bucket is indistinguishable from a new one."""
        return self.tat <= now

    def _decide(self, now: float, cost: float) -> tuple[bool, float, float]:
        if cost * self.interval > self.tolerance + TOLERANCE_SECONDS:
            return False, math.inf, self.tat
        new_tat = max(self.tat, now) + cost * self.interval
        allow_at = new_tat - self.tolerance
        if now + TOLERANCE_SECONDS < allow_at:
            return False, allow_at - now, self.tat
        return True, 0.0, new_tat


class BucketTable:
    """Token buckets by key (an address, a user and rule), bounded in size.

    An attacker with many addresses or user names must not grow memory
    without bound. Full buckets carry no information and are dropped freely
    (a few are checked on every call, oldest use first). When the table is
    still at ``max_size``, the least recently used bucket is dropped even if
    not full: that key starts over with a full bucket, a small leak in
    the limit traded for bounded memory (``evicted`` counts these).
    """

    def __init__(self, max_size: int = 50_000) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.evicted = 0
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def take(
        self, key: str, rate_per_second: float, burst: float, now: float, cost: float = 1
    ) -> tuple[bool, float]:
        """``TokenBucket.take`` on the bucket of ``key`` (created full if absent).

        ``rate_per_second`` and ``burst`` apply when the bucket is created or
        when they changed (a policy reload): the tokens left carry over.
        """
        bucket = self._bucket(key, rate_per_second, burst, now)
        return bucket.take(now, cost)

    def charge(
        self, key: str, rate_per_second: float, burst: float, now: float, cost: float
    ) -> None:
        """``TokenBucket.charge`` on the bucket of ``key`` (created full if absent)."""
        self._bucket(key, rate_per_second, burst, now).charge(now, cost)

    def check(
        self, key: str, rate_per_second: float, burst: float, now: float, cost: float = 1
    ) -> tuple[bool, float]:
        """``TokenBucket.check`` for ``key``; creates nothing."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return TokenBucket(rate_per_second, burst).check(now, cost)
        return bucket.check(now, cost)

    def _bucket(self, key: str, rate: float, burst: float, now: float) -> TokenBucket:
        self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_size:
                _, oldest = self._buckets.popitem(last=False)
                if not oldest.is_full(now):
                    self.evicted += 1
            bucket = self._buckets[key] = TokenBucket(rate, burst)
        else:
            self._buckets.move_to_end(key)
            if not math.isclose(bucket.interval, 1.0 / rate) or not math.isclose(
                bucket.burst, burst
            ):
                # A policy reload: the tokens there are carry over (up to the new burst).
                tokens = bucket.tokens(now)
                bucket = self._buckets[key] = TokenBucket(rate, burst)
                if tokens < burst:
                    bucket.tat = now + (burst - tokens) * bucket.interval
        return bucket

    def _sweep(self, now: float, budget: int = 2) -> None:
        # O(1) per call: look at the least recently used few, drop the full ones.
        for _ in range(budget):
            if not self._buckets:
                return
            key, bucket = next(iter(self._buckets.items()))
            if not bucket.is_full(now):
                return
            del self._buckets[key]

"""Fleet events: a window in which most subjects reconnect at once (pure).

When a gateway restarts, or a network path flaps, every connected client
reconnects within seconds: each user opens a connection, authenticates and
subscribes to its rooms again, and a NAT address with 40 users behind it opens
40 connections in one window. Judged one subject at a time, each of those
windows looks like a burst of session starts far beyond the baseline; judged
as a population, it is one event that touched everybody.

``MassReconnect.observe`` compares the share of a window's user subjects that
(re)connected with the shares of recent ordinary windows. A window whose share
is both ``factor`` times the usual one and ``margin`` above it is a fleet
event: there, the session-start features of the subjects that reconnected are
held to the baseline's range (``clip_session_start``), so the restart itself
alerts nobody while everything else (denials, payloads, rates, regularity,
addresses of a user) is still judged. The price: for one window, a burst of
connections or refused tokens hidden in the crowd is judged only by its other
features; the next window judges it whole.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from statistics import median

import numpy as np

from anomaly.features import FEATURES, SubjectWindow

# What a session start moves: connections, a token expired meanwhile, rooms joined again.
SESSION_START = ("reconnects", "auth_failures", "distinct_channels", "subscribe_ratio")
_COLUMNS = [FEATURES.index(name) for name in SESSION_START]
_RECONNECTS = FEATURES.index("reconnects")


class MassReconnect:
    def __init__(
        self, history: int = 60, factor: float = 3.0, margin: float = 0.25, min_subjects: int = 20
    ) -> None:
        self.factor = factor
        self.margin = margin
        self.min_subjects = min_subjects
        self._shares: deque[float] = deque(maxlen=history)

    def observe(self, windows: Sequence[SubjectWindow]) -> bool:
        """Is this (short) window a fleet-wide reconnect? Learns from the others."""
        users = [w for w in windows if w.subject_kind == "user" and not w.overflow]
        if len(users) < self.min_subjects:
            return False
        share = sum(1 for w in users if w.features["reconnects"] > 0) / len(users)
        if len(self._shares) >= 5:
            usual = median(self._shares)
            if share >= usual * self.factor and share >= usual + self.margin:
                return True
        self._shares.append(share)
        return False


def clip_session_start(rows: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """``rows`` with the session-start features of reconnected subjects held to
    ``ceiling`` (the baseline's largest values, per feature)."""
    out = np.array(rows, dtype=np.float64, copy=True)
    reconnected = out[:, _RECONNECTS] > 0
    for column in _COLUMNS:
        out[reconnected, column] = np.minimum(out[reconnected, column], ceiling[column])
    return out

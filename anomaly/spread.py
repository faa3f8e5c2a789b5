"""Addresses of a user over its last few windows (pure).

A stolen token used from several machines shows up in ``distinct_addresses``
only in the windows in which every one of them happened to do something; at
a message every 20 s per address, a 60 s window often sees three of four.
``AddressSpread`` keeps, per user, the addresses of its last ``windows`` short
windows, so the union is the count that says "one token, many hands". The
model's plain rule (``anomaly/model.py``, ``STEPS``) is applied to it: two
more addresses than any baseline window had is out of range by itself.

Memory: one small tuple per user and window (addresses are capped at
``MAX_OTHERS`` per window); users not seen for ``windows`` windows are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

from anomaly.features import OVERFLOW, SubjectState


class AddressSpread:
    def __init__(self, windows: int = 3) -> None:
        self.windows = windows
        self._index = 0
        self._recent: dict[str, list[tuple[int, tuple[str, ...]]]] = {}

    def observe(self, users: Mapping[str, SubjectState]) -> dict[str, int]:
        """One short window's user states -> distinct addresses over the last windows."""
        self._index += 1
        oldest = self._index - self.windows
        counts: dict[str, int] = {}
        for user, state in users.items():
            if user == OVERFLOW or not state.others:
                continue
            seen = [entry for entry in self._recent.get(user, ()) if entry[0] > oldest]
            seen.append((self._index, tuple(state.others)))
            self._recent[user] = seen
            counts[user] = len({a for _, addresses in seen for a in addresses})
        if self._index % self.windows == 0:  # forget users gone quiet
            self._recent = {u: s for u, s in self._recent.items() if s and s[-1][0] > oldest}
        return counts

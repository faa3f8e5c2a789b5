"""Durations as operators type them: ``600``, ``90s``, ``10m``, ``2h``, ``1d``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"([0-9]{1,9})\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds; ValueError with one line for anything else (no sign, no fraction)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError("duration: a number of seconds, or with m, h or d, such as 10m, 2h, 1d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]

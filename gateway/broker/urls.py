"""The nodes of ``amqp_url``: the order in which a gateway tries a cluster's
nodes, and how many replicas a history stream gets.

Pure functions, no I/O: ``gateway/broker/broker.py`` does the connecting.
Checking and redacting a URL are the configuration's (``gateway/config.py``),
re-exported here for the broker's callers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.config import redacted, url_problem

__all__ = ["connect_order", "default_cluster_size", "redacted", "stream_filtering", "url_problem"]


def connect_order(
    urls: Sequence[str], current: str | None = None, rng: random.Random | None = None
) -> list[str]:
    """The nodes to try, in random order, the one just lost last.

    Random so that a fleet of gateways losing the same node spreads over the
    others instead of all moving to the next one in the list; the lost node
    last so that a node that is down is tried only once the others failed.
    """
    order = list(urls)
    (rng or random).shuffle(order)
    if current is not None and current in order and len(order) > 1:
        order.remove(current)
        order.append(current)
    return order


def default_cluster_size(urls: Sequence[str], configured: int | None) -> int:
    """Replicas of a history stream: the setting, or the smaller of 3 and the nodes."""
    if configured is not None:
        return configured
    return max(1, min(3, len(set(urls))))


def stream_filtering(version: str | None) -> bool:
    """Whether a RabbitMQ of this version filters stream reads (3.13 and later)."""
    if not version:
        return False
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            return False
        parts.append(int(digits))
    return tuple(parts) >= (3, 13)

"""The broker URLs of ``amqp_url``: checking them, hiding their passwords,
and the order in which a gateway tries the nodes of a cluster.

Pure functions, no I/O: ``gateway/broker.py`` does the connecting.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from yarl import URL

SCHEMES = frozenset({"amqp", "amqps"})


def redacted(url: str) -> str:
    """The AMQP URL without its password, for logs and errors."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a RabbitMQ node, or None when it can."""
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError) as exc:
        # yarl's reasons ("Port out of range 0-65535") never quote the URL;
        # anything that might is left out.
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return f"not a URL ({reason})" if reason and "@" not in reason else "not a URL"
    if parsed.scheme not in SCHEMES:
        return "must start with amqp:// or amqps://"
    if not parsed.host:
        return "has no host"
    if port is not None and not 0 < port < 65536:
        return f"port {port} is out of range"
    return None


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

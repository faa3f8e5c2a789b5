"""Who the client is when its connection came through a trusted proxy.

Behind a load balancer or reverse proxy every connection's peer is the proxy,
so every per-address defense (connect rate, failed authentications, the
per-address connection cap, bans, the anomaly detector's address subjects)
would lump all clients together under the proxy's address. ``trusted_proxies``
names the networks whose ``X-Forwarded-For`` is believed.

The client is the right-most address of ``X-Forwarded-For`` that is not itself
a trusted proxy (nginx's ``real_ip_recursive``): each trusted hop appended the
address it saw, while everything left of the first untrusted one was written
by the client and proves nothing. A peer that is not a trusted proxy is the
client, whatever it sends. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from gateway.config import Network, parse_networks

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Hops read from the right of X-Forwarded-For: more trusted proxies in a row
# than this is a misconfiguration, and the rest would be the client's anyway.
MAX_HOPS = 16


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        """Raises ValueError naming the first entry that is not an address or network."""
        self.networks: tuple[Network, ...] = parse_networks(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | None) -> bool:
        """Is ``address`` (a peer's) one of the trusted proxies?"""
        if not self.networks or address is None:
            return False
        parsed = _parse(address)
        return parsed is not None and self._trusted(parsed)

    def client_address(self, peer: str | None, forwarded_for: Sequence[str]) -> str | None:
        """The client's address: ``peer`` unless it is a trusted proxy that forwarded one.

        ``forwarded_for``: every ``X-Forwarded-For`` header value, in order.
        A hop that is not an address ends the walk at the last good one.
        """
        if not self.trusts(peer):
            return peer
        hops = [hop for value in forwarded_for for hop in value.split(",")]
        client = peer
        for hop in reversed(hops[-MAX_HOPS:]):
            address = _parse(hop)
            if address is None:
                break
            client = str(address)
            if not self._trusted(address):
                break
        return client

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def _parse(text: str) -> Address | None:
    """An address as a proxy writes it: ``1.2.3.4``, ``1.2.3.4:567``,
    ``2001:db8::1`` or ``[2001:db8::1]:567``. IPv4-mapped IPv6 counts as IPv4."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address

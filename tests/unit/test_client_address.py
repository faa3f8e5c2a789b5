"""Whose X-Forwarded-For is believed, and which hop is the client (core/client_address.py)."""

from __future__ import annotations

import pytest

from gateway.core.client_address import MAX_HOPS, TrustedProxies

PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # No proxy in front: the peer is the client, whatever it claims.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        # One trusted proxy: the address it appended.
        ("10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        ("192.0.2.1", ["198.51.100.1"], "198.51.100.1"),
        # A client that forges the header only adds hops to the left.
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
        # Chains of trusted proxies are walked through.
        ("10.1.2.3", ["198.51.100.1, 10.9.9.9, 10.8.8.8"], "198.51.100.1"),
        # Every hop trusted: the left-most one is the best there is.
        ("10.1.2.3", ["10.9.9.9, 10.8.8.8"], "10.9.9.9"),
        # A trusted proxy that forwarded nothing: the proxy itself.
        ("10.1.2.3", [], "10.1.2.3"),
        ("10.1.2.3", [""], "10.1.2.3"),
        # Garbage ends the walk at the last good hop, never becomes the address.
        ("10.1.2.3", ["unknown"], "10.1.2.3"),
        ("10.1.2.3", ["198.51.100.1, <script>, 10.9.9.9"], "10.9.9.9"),
        ("10.1.2.3", ["198.51.100.1, 999.1.1.1"], "10.1.2.3"),
        # Ports and IPv6 as proxies write them; mapped IPv4 counts as IPv4.
        ("10.1.2.3", ["198.51.100.1:51234"], "198.51.100.1"),
        ("10.1.2.3", ["[2001:db9::7]:443"], "2001:db9::7"),
        ("10.1.2.3", ["2001:db9::7"], "2001:db9::7"),
        ("::ffff:10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        ("2001:db8::5", ["::ffff:198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", ["  198.51.100.1  "], "198.51.100.1"),
        # No peer address at all (a Unix socket): nothing to trust.
        (None, ["198.51.100.1"], None),
    ],
)
def test_client_address(peer: str | None, forwarded_for: list[str], client: str | None) -> None:
    assert PROXIES.client_address(peer, forwarded_for) == client


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    nobody = TrustedProxies([])
    assert not nobody
    assert nobody.client_address("10.1.2.3", ["198.51.100.1"]) == "10.1.2.3"
    assert not nobody.trusts("10.1.2.3")


def test_a_long_forged_chain_is_read_only_from_the_right() -> None:
    forged = ", ".join(["10.0.0.1"] * 10_000)  # all "trusted", written by the client
    hops = forged + ", 10.0.0.2"
    assert PROXIES.client_address("10.1.2.3", [hops]) == "10.0.0.1"
    # ... and no further than MAX_HOPS: the client's own left-most claim is not reached.
    claimed = "198.51.100.1, " + ", ".join(["10.0.0.1"] * MAX_HOPS)
    assert PROXIES.client_address("10.1.2.3", [claimed]) == "10.0.0.1"


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "example.com", "", "10.0.0.1/8/8"])
def test_entries_that_are_not_networks_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not an IP address or network"):
        TrustedProxies([entry])

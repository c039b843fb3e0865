"""IP addresses as policy and netguard both compare them."""

from __future__ import annotations

import ipaddress

import pytest

from keyproxy.addresses import unmap


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::10.1.2.3", "::a01:203"),  # IPv4-compatible, deprecated: not a mapped address
    ],
)
def test_only_ipv4_mapped_addresses_become_ipv4(text: str, expected: str) -> None:
    """An IPv4-mapped IPv6 address is its IPv4 address; every other address is unchanged."""
    assert unmap(ipaddress.ip_address(text)) == ipaddress.ip_address(expected)

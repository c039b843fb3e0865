"""IP addresses as keyproxy compares them: the one type, and IPv4-mapped IPv6 read as IPv4.

Policy (source_cidrs, trusted proxies) and netguard (egress) both compare addresses against
networks; an address must mean the same to both. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:10.1.2.3) as the IPv4 address it is; others as is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address

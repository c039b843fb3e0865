"""The egress fence: upstream addresses that are not globally routable are refused (invariant 7).

    classify(ip) -> class name | None        None means globally routable
    check(ip, allowed)                       EgressDenied unless global or inside `allowed`
    check_host(host, allowed)                the same for an IP-literal upstream host
    check_upstreams(cfg)                     ConfigError, at start-up, for the hosts above
                                             that every request would be refused for
    GuardedResolver(allowed)                 an aiohttp resolver that drops refused addresses
    egress_denial(exc) -> EgressDenied|None  find the refusal in what aiohttp's client raised

How it is used. The proxy's pool (keyproxy.pool) resolves every new connection's host through
`GuardedResolver(route.egress_allow)` and connects to exactly the addresses it returns, so the
address checked is the address connected to (no DNS rebinding); an IP-literal host it checks
with `check_host` instead. aiohttp's `TCPConnector(resolver=GuardedResolver(...))`, for the
rotators and MCP replies, does the same for names. When no address survives, the resolver
raises `EgressDeniedOSError`, which is both an `EgressDenied` and the `OSError` aiohttp
expects from resolvers; aiohttp wraps it as `ClientConnectorDNSError(os_error=...)`, and
`egress_denial` finds it again. aiohttp never calls the resolver for an IP-literal host, so
its users call `check_host` themselves before connecting.

SECURITY: `TCPConnector` caches resolved addresses and pools connections by host and port, not
by route, so routes with different `egress_allow` must not share a connector.

Classes, checked in this order (first match wins): unspecified, this_network, loopback,
metadata (cloud instance metadata: 169.254.169.254, fd00:ec2::254, 100.100.100.200, and
Azure's 168.63.129.16, which is otherwise a public address), private, cgnat, link_local,
benchmarking, documentation, broadcast, multicast, unique_local, site_local, reserved.
IPv6 addresses that embed an IPv4 address take the class of that address when it is not
global: IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96), NAT64 (64:ff9b::/96, and
64:ff9b:1::/48 read as a /96 prefix), 6to4 (2002::/16) and Teredo (2001::/32, its client
address). An IPv4-mapped address of a global IPv4 address is global. The other wrappers of a
global IPv4 address are still refused, as "ipv4_compatible", "nat64", "6to4" or "teredo":
they are translation or tunnel paths whose far end the fence cannot see. Allow them
explicitly (e.g. 64:ff9b::/96) where a NAT64 network is how upstreams are reached.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from keyproxy.addresses import IPAddress, unmap
from keyproxy.config import Config, HttpRotator, Network, Route
from keyproxy.errors import ConfigError, EgressDenied

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

_IPV4_CLASSES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/32"), "unspecified"),
    (_V4("0.0.0.0/8"), "this_network"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.169.254/32"), "metadata"),  # AWS, GCP, Azure, OpenStack, ...
    (_V4("100.100.100.200/32"), "metadata"),  # Alibaba Cloud
    (_V4("168.63.129.16/32"), "metadata"),  # Azure WireServer (a public address)
    (_V4("10.0.0.0/8"), "private"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("100.64.0.0/10"), "cgnat"),
    (_V4("169.254.0.0/16"), "link_local"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("192.0.0.0/24"), "reserved"),  # IETF protocol assignments (DS-Lite, NAT64 discovery)
    (_V4("192.88.99.0/24"), "reserved"),  # deprecated 6to4 relay anycast
    (_V4("240.0.0.0/4"), "reserved"),
)

_IPV6_SPECIAL: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
)
_IPV6_CLASSES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("fd00:ec2::254/128"), "metadata"),  # AWS instance metadata over IPv6
    (_V6("2001:2::/48"), "benchmarking"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("2001::/23"), "reserved"),  # IETF protocol assignments (ORCHID, AMT, AS112, ...)
    (_V6("fc00::/7"), "unique_local"),
    (_V6("fe80::/10"), "link_local"),
    (_V6("fec0::/10"), "site_local"),
    (_V6("ff00::/8"), "multicast"),
)
# Only 2000::/3 is allocated for global unicast; everything else left over is reserved.
_GLOBAL_UNICAST = _V6("2000::/3")


def _low32(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _sixtofour(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)


def _teredo_client(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(~int(ip) & 0xFFFFFFFF)  # stored inverted (RFC 4380)


# (prefix, class when the embedded IPv4 is global, where the IPv4 sits). Checked before
# _IPV6_CLASSES, since Teredo's 2001::/32 lies inside 2001::/23. "" for IPv4-mapped: it *is*
# the IPv4 address, so a global one is global.
_EMBEDDING: tuple[
    tuple[ipaddress.IPv6Network, str, Callable[[ipaddress.IPv6Address], ipaddress.IPv4Address]],
    ...,
] = (
    (_V6("::ffff:0:0/96"), "", _low32),
    (_V6("::/96"), "ipv4_compatible", _low32),
    (_V6("64:ff9b::/96"), "nat64", _low32),
    (_V6("64:ff9b:1::/48"), "nat64", _low32),
    (_V6("2002::/16"), "6to4", _sixtofour),
    (_V6("2001::/32"), "teredo", _teredo_client),
)


class EgressDeniedOSError(EgressDenied, OSError):
    """An EgressDenied that is also the OSError aiohttp expects a resolver to raise."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason, message)
        self.strerror = self.message  # shown by ClientConnectorError.__str__


def classify(ip: IPAddress) -> str | None:
    """None if `ip` is globally routable, else the name of the class that refuses it."""
    if isinstance(ip, ipaddress.IPv4Address):
        return next((name for net, name in _IPV4_CLASSES if ip in net), None)
    bare = ipaddress.IPv6Address(int(ip))  # without a %scope
    for net, name in _IPV6_SPECIAL:
        if bare in net:
            return name
    for net, wrapper, embedded in _EMBEDDING:
        if bare in net:
            return classify(embedded(bare)) or wrapper or None
    for net, name in _IPV6_CLASSES:
        if bare in net:
            return name
    return None if bare in _GLOBAL_UNICAST else "reserved"


def check(ip: IPAddress, allowed: Sequence[Network]) -> None:
    """Raise EgressDenied("egress_denied") unless `ip` is global or inside `allowed`.

    An IPv4-mapped address is compared with `allowed` as the IPv4 address it is.
    """
    if (cls := _refusal(ip, allowed)) is not None:
        raise _denied(EgressDenied, cls)


def check_host(host: str, allowed: Sequence[Network]) -> None:
    """Check an IP-literal upstream host, which aiohttp connects to without resolving.

    Host names pass here: `GuardedResolver` checks what they resolve to. Anything aiohttp
    would treat as an IP literal but that is not one (127.1, 2130706433) is refused.
    """
    if (cls := _host_refusal(host, allowed)) is not None:
        raise _denied(EgressDenied, cls)


def check_upstreams(cfg: Config) -> None:
    """Refuse, before serving, the upstream hosts the fence would refuse on every request.

    For `keyproxy check` and `serve`: a route's upstream, and each http rotator URL whose host
    is written out, must be a host name, a global address or an address inside the route's
    egress.allow_cidrs. A numeric host in any form but dotted decimal (0177.0.0.1, 0x7f000001,
    2130706433, 127.1) is refused whatever the allowance: parsers disagree on what it means
    (`check_host` refuses some, the system resolver reads others as 127.0.0.1). `localhost`
    is loopback by definition (RFC 6761), so it needs an allowance too. ConfigError's path
    names the route's setting (`routes.x.upstream`); the message names the class.
    """
    for name, route in cfg.routes.items():
        for where, host in _written_hosts(name, route):
            if (problem := _host_problem(host, route.egress_allow)) is not None:
                raise ConfigError(where, problem)


class GuardedResolver(AbstractResolver):
    """Resolve with `inner`, keep only the addresses `check` allows, refuse if none remain.

    `inner` defaults to aiohttp's ThreadedResolver (created on first use, inside the loop);
    `close()` closes it, whoever made it.
    """

    def __init__(self, allowed: Sequence[Network], inner: AbstractResolver | None = None) -> None:
        self._allowed = tuple(allowed)
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: set[str] = set()
        for result in results:
            try:
                cls = _refusal(ipaddress.ip_address(result["host"]), self._allowed)
            except ValueError:
                cls = "invalid"
            if cls is None:
                kept.append(result)
            else:
                refused.add(cls)
        if kept:
            return kept
        if not refused:
            raise OSError(f"{host} resolved to no addresses")
        raise _denied(EgressDeniedOSError, ", ".join(sorted(refused)))

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def egress_denial(exc: BaseException) -> EgressDenied | None:
    """The EgressDenied behind `exc` (itself, its os_error, causes, contexts), if there is one."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EgressDenied):
            return current
        linked = [getattr(current, "os_error", None), current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            linked.extend(current.exceptions)
        pending.extend(e for e in linked if isinstance(e, BaseException))
    return None


def _host_refusal(host: str, allowed: Sequence[Network]) -> str | None:
    """`check_host`'s verdict: the refusing class, or None for a host name or allowed address."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        # aiohttp's own test for "this is an IP address, do not resolve it".
        return "invalid" if ":" in bare or bare.replace(".", "").isdigit() else None
    return _refusal(ip, allowed)


def _written_hosts(name: str, route: Route) -> list[tuple[str, str]]:
    """(YAML path, host) of the route's upstream and of rotator URLs without a placeholder host."""
    hosts = [(f"routes.{name}.upstream", route.upstream.host)]
    rotator = route.rotation.rotator if route.rotation else None
    if isinstance(rotator, HttpRotator):
        calls = {"create": rotator.create, "verify": rotator.verify, "revoke": rotator.revoke}
        for what, call in calls.items():
            try:
                host = URL(call.url).host if call is not None else None
            except ValueError:  # a template yarl cannot read: checked once rendered
                continue
            if host and "{" not in host:
                hosts.append((f"routes.{name}.rotation.rotator.{what}.url", host))
    return hosts


def _host_problem(host: str, allowed: Sequence[Network]) -> str | None:
    """Why every request to `host` would be refused, said for the configuration's author."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    numeric = _system_reading(bare)
    if numeric is not None and str(numeric) != bare:
        return (
            f"{host} is not a dotted-decimal IPv4 address; the system resolver reads it as "
            f"{numeric} ({classify(numeric) or 'global'}) and other parsers differently: "
            f"write {numeric} if that is meant"
        )
    cls = _host_refusal(host, allowed)
    if cls == "invalid":
        return f"{host} looks like an IP address but is not one"
    if cls is None and bare.lower().rstrip(".").split(".")[-1] == "localhost":
        loopback = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
        if all(_refusal(ip, allowed) for ip in loopback):
            cls = "loopback, RFC 6761"
    if cls is None:
        return None
    shown = f"[{bare}]" if ":" in bare else bare
    return (
        f"{shown} is not a global address ({cls}): the egress fence refuses it on every "
        "request unless egress.allow_cidrs includes it"
    )


def _system_reading(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address the C library (inet_aton, and so getaddrinfo) makes of `host`, if any."""
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _refusal(ip: IPAddress, allowed: Sequence[Network]) -> str | None:
    """The class that refuses `ip`, or None if it is global or inside `allowed`."""
    cls = classify(ip)
    if cls is None:
        return None
    address = unmap(ip)
    # `in` is False across IP versions, so a v4 address never matches a v6 network.
    return None if any(address in network for network in allowed) else cls


def _denied(kind: type[EgressDenied], classes: str) -> EgressDenied:
    # The message reaches the caller: it names the class, never the address.
    return kind("egress_denied", f"upstream address refused by the egress fence: {classes}")

"""The egress fence: non-global upstream addresses are refused unless allowed (invariant 7)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from keyproxy import config
from keyproxy.config import Config, Network
from keyproxy.errors import ConfigError, EgressDenied
from keyproxy.netguard import (
    EgressDeniedOSError,
    GuardedResolver,
    check,
    check_host,
    check_upstreams,
    classify,
    egress_denial,
)
from tests.helpers.configs import CONFIG_SECTIONS


def net(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # IPv4
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("93.184.216.34", None),
        ("0.0.0.0", "unspecified"),  # noqa: S104  # a case to classify; nothing binds
        ("0.1.2.3", "this_network"),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("172.32.0.1", None),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("168.63.129.16", "metadata"),
        ("169.254.0.1", "link_local"),
        ("169.254.170.2", "link_local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.255", "cgnat"),
        ("100.128.0.1", None),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.8", "reserved"),
        ("192.88.99.1", "reserved"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.1", "documentation"),
        ("203.0.113.1", "documentation"),
        ("255.255.255.255", "broadcast"),
        # IPv6
        ("2606:4700::1", None),
        ("2001:4860:4860::8888", None),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("febf::1", "link_local"),
        ("fd00:ec2::254", "metadata"),
        ("fc00::1", "unique_local"),
        ("fd12:3456::1", "unique_local"),
        ("fec0::1", "site_local"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("2001:2::1", "benchmarking"),
        ("2001:10::1", "reserved"),
        ("100::1", "reserved"),
        ("4000::1", "reserved"),
        # IPv6 embedding an IPv4 address: classified by the embedded address
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:8.8.8.8", None),
        ("::10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"),
        ("::0.0.0.2", "this_network"),
        ("::8.8.8.8", "ipv4_compatible"),
        ("64:ff9b::a00:1", "private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("64:ff9b::808:808", "nat64"),
        ("64:ff9b:1::a00:1", "private"),
        ("64:ff9b:1::808:808", "nat64"),
        ("2002:a00:1::", "private"),
        ("2002:7f00:1::1", "loopback"),
        ("2002:a9fe:a9fe::", "metadata"),
        ("2002:6440:1::", "cgnat"),
        ("2002:808:808::", "6to4"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "teredo"),
    ],
)
def test_classify(address: str, expected: str | None) -> None:
    """Each address gets its class (embedded IPv4 first), or None when globally routable."""
    assert classify(ip(address)) == expected


@pytest.mark.parametrize(
    ("address", "allowed", "passes"),
    [
        ("8.8.8.8", (), True),
        ("2606:4700::1", (), True),
        ("::ffff:8.8.8.8", (), True),
        ("127.0.0.1", (), False),
        ("10.1.2.3", (), False),
        ("169.254.169.254", (), False),
        ("64:ff9b::808:808", (), False),
        ("10.1.2.3", ("10.0.0.0/8",), True),
        ("10.1.2.3", ("10.2.0.0/16",), False),
        ("127.0.0.1", ("127.0.0.0/8",), True),
        ("::ffff:127.0.0.1", ("127.0.0.0/8",), True),
        ("::ffff:10.1.2.3", ("10.0.0.0/8",), True),
        ("::1", ("127.0.0.0/8",), False),
        ("127.0.0.1", ("::1/128",), False),
        ("fd12::1", ("fd00::/8",), True),
        ("fd12::1", ("fd00::/16",), False),
        ("169.254.169.254", ("10.0.0.0/8",), False),
        ("169.254.169.254", ("169.254.169.254/32",), True),
        ("64:ff9b::808:808", ("64:ff9b::/96",), True),
        ("64:ff9b::a00:1", ("10.0.0.0/8",), False),
        ("2002:a00:1::", ("10.0.0.0/8",), False),
    ],
)
def test_check(address: str, allowed: tuple[str, ...], passes: bool) -> None:
    """check passes global addresses and allowed networks, else raises EgressDenied."""
    if passes:
        check(ip(address), net(*allowed))
        return
    with pytest.raises(EgressDenied) as caught:
        check(ip(address), net(*allowed))
    assert caught.value.reason == "egress_denied"
    assert caught.value.message.endswith(f": {classify(ip(address))}")
    assert address not in caught.value.message


@pytest.mark.parametrize(
    ("host", "allowed", "passes"),
    [
        ("api.openai.com", (), True),
        ("localhost", (), True),
        ("8.8.8.8", (), True),
        ("[2606:4700::1]", (), True),
        ("127.0.0.1", (), False),
        ("::1", (), False),
        ("[::1]", (), False),
        ("[::ffff:127.0.0.1]", (), False),
        ("169.254.169.254", (), False),
        ("127.1", (), False),
        ("2130706433", (), False),
        ("0177.0.0.1", (), False),
        ("127.0.0.1", ("127.0.0.0/8",), True),
        ("[::1]", ("::1/128",), True),
    ],
)
def test_check_host(host: str, allowed: tuple[str, ...], passes: bool) -> None:
    """IP-literal hosts are checked; names pass (the resolver checks them); odd numerics fail."""
    if passes:
        check_host(host, net(*allowed))
        return
    with pytest.raises(EgressDenied):
        check_host(host, net(*allowed))


class FixedResolver(AbstractResolver):
    """Answers every lookup with the same addresses, and records whether it was closed."""

    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=h,
                port=port,
                family=socket.AF_INET6 if ":" in h else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for h in self.hosts
        ]

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("answers", "allowed", "kept"),
    [
        (("8.8.8.8",), (), ("8.8.8.8",)),
        (("10.0.0.1", "8.8.8.8", "::1", "2606:4700::1"), (), ("8.8.8.8", "2606:4700::1")),
        (("10.0.0.1", "169.254.169.254"), ("10.0.0.0/8",), ("10.0.0.1",)),
        (("fe80::1%eth0", "8.8.4.4"), (), ("8.8.4.4",)),
        (("not-an-address", "8.8.4.4"), (), ("8.8.4.4",)),
    ],
)
async def test_resolver_keeps_only_allowed_addresses(
    answers: tuple[str, ...], allowed: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    """GuardedResolver drops each refused address and returns the rest unchanged."""
    resolver = GuardedResolver(net(*allowed), FixedResolver(*answers))
    results = await resolver.resolve("upstream.example", 443)
    assert tuple(r["host"] for r in results) == kept
    assert all(r["hostname"] == "upstream.example" and r["port"] == 443 for r in results)


@pytest.mark.parametrize(
    ("answers", "classes"),
    [
        (("10.0.0.1",), "private"),
        (("10.0.0.1", "::1", "169.254.169.254"), "loopback, metadata, private"),
        (("not-an-address",), "invalid"),
    ],
)
async def test_resolver_refuses_when_nothing_is_left(
    answers: tuple[str, ...], classes: str
) -> None:
    """When every address is refused, the resolver raises an EgressDenied that is an OSError."""
    resolver = GuardedResolver((), FixedResolver(*answers))
    with pytest.raises(EgressDeniedOSError) as caught:
        await resolver.resolve("upstream.example", 443)
    assert isinstance(caught.value, EgressDenied)
    assert isinstance(caught.value, OSError)
    assert caught.value.reason == "egress_denied"
    assert caught.value.message.endswith(f": {classes}")


async def test_resolver_empty_answer_is_not_a_denial() -> None:
    """An inner resolver with no answer is a plain OSError, not an egress denial."""
    resolver = GuardedResolver((), FixedResolver())
    with pytest.raises(OSError, match="no addresses") as caught:
        await resolver.resolve("upstream.example", 443)
    assert egress_denial(caught.value) is None


async def test_resolver_closes_inner() -> None:
    """Closing the GuardedResolver closes the resolver it wraps."""
    inner = FixedResolver("8.8.8.8")
    await GuardedResolver((), inner).close()
    assert inner.closed


async def test_resolver_refuses_localhost() -> None:
    """Real resolution of "localhost" is refused without an allowance."""
    resolver = GuardedResolver(())
    try:
        with pytest.raises(EgressDenied, match="loopback"):
            await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    finally:
        await resolver.close()


async def test_resolver_allows_localhost_with_allowance() -> None:
    """With 127.0.0.0/8 allowed, "localhost" resolves to its IPv4 loopback addresses only."""
    resolver = GuardedResolver(net("127.0.0.0/8"))
    try:
        results = await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    finally:
        await resolver.close()
    assert results
    assert all(ip(r["host"]) in ipaddress.ip_network("127.0.0.0/8") for r in results)


DENIED = EgressDeniedOSError("egress_denied", "refused: loopback")
KEY = aiohttp.client_reqrep.ConnectionKey("localhost", 80, False, True, None, None, None)


def caused(exc: BaseException, cause: BaseException, *, implicit: bool = False) -> BaseException:
    if implicit:
        exc.__context__ = cause
    else:
        exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "found"),
    [
        (DENIED, True),
        (EgressDenied("egress_denied"), True),
        (aiohttp.ClientConnectorDNSError(KEY, DENIED), True),
        (caused(RuntimeError("outer"), DENIED), True),
        (caused(RuntimeError("outer"), DENIED, implicit=True), True),
        (ExceptionGroup("many", [ValueError(), aiohttp.ClientConnectorError(KEY, DENIED)]), True),
        (aiohttp.ClientConnectorError(KEY, OSError("refused")), False),
        (caused(RuntimeError("outer"), OSError("refused")), False),
        (ValueError("nothing"), False),
    ],
)
def test_egress_denial(exc: BaseException, found: bool) -> None:
    """egress_denial finds an EgressDenied as the error, its os_error, cause, context or member."""
    denial = egress_denial(exc)
    assert (denial is not None) is found


def test_egress_denial_survives_cycles() -> None:
    """A cycle in the exception chain ends the search instead of looping."""
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert egress_denial(first) is None


@pytest.fixture
async def loopback_server() -> AsyncIterator[tuple[int, list[int]]]:
    """A minimal HTTP server on 127.0.0.1 that counts the TCP connections it accepts."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, connections


async def fetch(port: int, allowed: tuple[Network, ...]) -> int:
    resolver = GuardedResolver(allowed)
    try:
        connector = aiohttp.TCPConnector(resolver=resolver, family=socket.AF_INET)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://localhost:{port}/", allow_redirects=False) as response,
        ):
            return response.status
    finally:
        await resolver.close()


async def test_session_refuses_loopback_upstream(loopback_server: tuple[int, list[int]]) -> None:
    """Through aiohttp, a refused upstream fails recognisably and is never connected to."""
    port, connections = loopback_server
    with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
        await fetch(port, ())
    denial = egress_denial(caught.value)
    assert denial is not None
    assert denial.reason == "egress_denied"
    assert "loopback" in str(caught.value)
    assert connections == []


async def test_session_reaches_allowed_upstream(loopback_server: tuple[int, list[int]]) -> None:
    """The same request with 127.0.0.0/8 allowed connects (the server does count connections)."""
    port, connections = loopback_server
    assert await fetch(port, net("127.0.0.0/8")) == 204
    assert connections == [1]


# ------------------------------------------------------------ check_upstreams (start-up)


def _config(upstream: str, allow: list[str] | None = None, **calls: str) -> Config:
    """One route `x` to `upstream`; `calls` (create=URL, ...) give it an http rotator."""
    route: dict[str, Any] = {
        "upstream": upstream,
        "allow_http": True,
        "secret": {"path": "keyproxy/keys/x"},
        "inject": [{"header": "X-Api-Key"}],
    }
    if allow is not None:
        route["egress"] = {"allow_cidrs": allow}
    if calls:
        rotator = {"type": "http", "allow_http": True, "revoke": {"url": "https://a.example/k"}}
        rotator |= {what: {"url": url} for what, url in calls.items()}
        route["rotation"] = {"every": "1d", "rotator": rotator}
    ok = {"upstream": "https://a.example", "secret": {"path": "k"}, "inject": [{"header": "K"}]}
    return config.parse(json.dumps({**CONFIG_SECTIONS, "routes": {"ok": ok, "x": route}}), {})


REFUSED = [
    # Numeric hosts in other forms than dotted decimal: refused whatever the allowance.
    ("http://0177.0.0.1", None, "reads it as 127.0.0.1 (loopback)"),
    ("http://0x7f000001", None, "reads it as 127.0.0.1 (loopback)"),
    ("http://2130706433", None, "reads it as 127.0.0.1 (loopback)"),
    ("http://127.1", ["127.0.0.0/8"], "reads it as 127.0.0.1 (loopback)"),
    ("http://0x7f.1:8080", ["127.0.0.0/8"], "reads it as 127.0.0.1 (loopback)"),
    ("http://0251.0376.0251.0376", None, "reads it as 169.254.169.254 (metadata)"),
    ("https://0x08080808", None, "reads it as 8.8.8.8 (global)"),
    ("https://127.0.0.1.", None, "127.0.0.1. looks like an IP address but is not one"),
    ("https://1.2.3.4.5", None, "looks like an IP address but is not one"),
    # Addresses that are not global, without an allowance that covers them.
    ("http://127.0.0.1", None, "127.0.0.1 is not a global address (loopback)"),
    ("http://127.0.0.1:9", ["10.0.0.0/8"], "(loopback)"),
    ("http://[::1]:8080", None, "[::1] is not a global address (loopback)"),
    (
        "http://169.254.169.254",
        ["127.0.0.0/8"],
        "169.254.169.254 is not a global address (metadata)",
    ),
    ("http://[fd00:ec2::254]", None, "(metadata)"),
    ("http://[::ffff:127.0.0.1]", None, "(loopback)"),
    ("http://[::ffff:169.254.169.254]", None, "(metadata)"),
    ("https://[64:ff9b::a00:1]", None, "(private)"),
    ("https://10.1.2.3", None, "(private)"),
    ("https://100.64.0.1", None, "(cgnat)"),
    ("https://[fd12::1]", None, "(unique_local)"),
    ("https://0.0.0.0", None, "(unspecified)"),
    # localhost is loopback by definition (RFC 6761).
    ("http://localhost:8080", None, "localhost is not a global address (loopback, RFC 6761)"),
    ("http://api.localhost", ["10.0.0.0/8"], "(loopback, RFC 6761)"),
]
ALLOWED = [
    ("https://api.openai.com", None),
    ("https://8.8.8.8", None),
    ("https://[2606:4700:4700::1111]", None),
    ("http://127.0.0.1:9", ["127.0.0.0/8"]),
    ("http://[::1]:9", ["::1/128"]),
    ("http://[::ffff:127.0.0.1]", ["127.0.0.0/8"]),
    ("https://10.1.2.3", ["10.0.0.0/8"]),
    ("http://localhost:9", ["127.0.0.0/8"]),
    ("http://localhost:9", ["::1/128"]),
]


@pytest.mark.parametrize(("upstream", "allow", "message"), REFUSED)
def test_upstreams_every_request_would_refuse_are_refused_before_serving(
    upstream: str, allow: list[str] | None, message: str
) -> None:
    """An IP-literal upstream outside its route's allowance is a config error naming the
    route's setting and the class (the request-time fence would refuse every request)."""
    with pytest.raises(ConfigError) as info:
        check_upstreams(_config(upstream, allow))
    assert info.value.path == "routes.x.upstream"
    assert message in info.value.message


@pytest.mark.parametrize(("upstream", "allow"), ALLOWED)
def test_host_names_global_and_allowed_addresses_pass(
    upstream: str, allow: list[str] | None
) -> None:
    """Host names, global addresses and addresses inside egress.allow_cidrs pass the check."""
    check_upstreams(_config(upstream, allow))


@pytest.mark.parametrize(
    ("upstream", "allow"), [(u, a) for u, a, _ in REFUSED] + [(u, a) for u, a in ALLOWED]
)
def test_the_start_up_check_refuses_everything_the_request_time_check_refuses(
    upstream: str, allow: list[str] | None
) -> None:
    """check_upstreams is never more lenient than check_host, which requests go through."""
    cfg = _config(upstream, allow)
    route = cfg.routes["x"]
    try:
        check_host(route.upstream.host, route.egress_allow)
    except EgressDenied:
        with pytest.raises(ConfigError):
            check_upstreams(cfg)


@pytest.mark.parametrize(
    ("calls", "where"),
    [
        ({"create": "http://127.0.0.1:9/keys"}, "create"),
        ({"create": "https://a.example/k", "verify": "https://[::1]/me"}, "verify"),
        (
            {"create": "https://a.example/k", "revoke": "http://169.254.169.254/k/{key_id}"},
            "revoke",
        ),
    ],
)
def test_rotator_urls_are_checked_like_upstreams(calls: dict[str, str], where: str) -> None:
    """An http rotator URL with a non-global literal host is refused with its path."""
    with pytest.raises(ConfigError) as info:
        check_upstreams(_config("https://api.example.com", None, **calls))
    assert info.value.path == f"routes.x.rotation.rotator.{where}.url"
    assert "is not a global address" in info.value.message


def test_rotator_urls_with_a_placeholder_host_or_an_allowance_pass() -> None:
    """A host the template fills in is checked at request time; an allowed one passes."""
    check_upstreams(_config("https://api.example.com", None, create="https://{admin}.example/k"))
    check_upstreams(_config("https://api.example.com", None, create="https://[{admin}]/k"))
    allowed = _config("http://127.0.0.1:9", ["127.0.0.0/8"], create="http://127.0.0.1:9/keys")
    check_upstreams(allowed)

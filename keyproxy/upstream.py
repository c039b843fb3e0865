"""The clients to upstreams: fenced, never proxied, never reusing a switched connection.

`UpstreamSessions(routes)` holds, per distinct egress and TLS setting, shared by the routes
using it, the proxy's connection pool (keyproxy.pool) and an aiohttp session for the http
rotators and an MCP route's replies to its server. Both go through the same egress fence
(keyproxy.netguard) and the same TLS settings.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import aiohttp
from aiohttp.connector import Connection

from keyproxy import netguard
from keyproxy.config import Network, Route
from keyproxy.errors import ConfigError
from keyproxy.pool import Pool
from keyproxy.tls import error_text


class UpstreamSessions:
    """One connection pool and one aiohttp session per distinct egress and TLS setting,
    shared by the routes using it.

    Their resolver is the egress fence: they connect only to the addresses it returns, so
    the address checked is the address used.

    A reload builds the next configuration's sessions with `successor`: a route whose
    settings are unchanged keeps its session and its pooled connections, a new or changed
    one gets a new session. The old set is closed (`close(keep=...)`) once nothing runs on it,
    sparing the sessions its successors still use. The TLS contexts of the new sessions
    (`successor_tls`) come first: a CA file that does not load refuses the reload before it
    changes anything, and they hold nothing to close if the reload goes no further.
    """

    def __init__(
        self,
        routes: Mapping[str, Route],
        kept: Mapping[str, _Clients] | None = None,
        tls: Mapping[Setting, ssl.SSLContext] | None = None,
    ) -> None:
        self.routes = dict(routes)
        self._by_route: dict[str, _Clients] = dict(kept or {})
        new = [route for route in routes.values() if route.name not in self._by_route]
        contexts = _contexts(new, tls or {})  # each first: one that fails leaves nothing open
        shared = {setting: _clients(setting[0], made) for setting, made in contexts.items()}
        for route in new:
            self._by_route[route.name] = shared[_setting(route)]

    def successor_tls(self, routes: Mapping[str, Route]) -> dict[Setting, ssl.SSLContext]:
        """The TLS contexts `successor(routes, ...)` needs; ConfigError naming a route's
        `tls.ca_file` that does not load."""
        kept = self._kept(routes)
        return _contexts([route for route in routes.values() if route.name not in kept], {})

    def successor(
        self, routes: Mapping[str, Route], tls: Mapping[Setting, ssl.SSLContext] | None = None
    ) -> UpstreamSessions:
        """The sessions for `routes`, keeping this set's for each route that is unchanged;
        the new ones with `tls` (`successor_tls`), else contexts made now."""
        return UpstreamSessions(routes, self._kept(routes), tls)

    def _kept(self, routes: Mapping[str, Route]) -> dict[str, _Clients]:
        return {
            name: self._by_route[name]
            for name, route in routes.items()
            if self.routes.get(name) == route
        }

    def get(self, route: str) -> aiohttp.ClientSession:
        return self._by_route[route].session

    def pool(self, route: str) -> Pool:
        return self._by_route[route].pool

    async def close(self, keep: Iterable[UpstreamSessions] = ()) -> None:
        """Close these sessions and pools, except those any of `keep` uses."""
        used = {clients for other in keep for clients in other._by_route.values()}
        for clients in set(self._by_route.values()) - used:
            await clients.pool.close()
            await clients.session.close()


class _Clients(NamedTuple):
    pool: Pool
    session: aiohttp.ClientSession


Setting = tuple[tuple[Network, ...], bool, str]  # what routes share a pool and session by


def _setting(route: Route) -> Setting:
    return route.egress_allow, route.tls_verify, str(route.ca_file or "")


def _contexts(
    routes: Iterable[Route], made: Mapping[Setting, ssl.SSLContext]
) -> dict[Setting, ssl.SSLContext]:
    """The TLS context of each setting of `routes`: from `made`, else made now."""
    contexts: dict[Setting, ssl.SSLContext] = {}
    for route in routes:
        setting = _setting(route)
        if setting not in contexts:
            contexts[setting] = made.get(setting) or _route_tls(route)
    return contexts


def _route_tls(route: Route) -> ssl.SSLContext:
    """The route's client TLS context, or ConfigError naming `tls.ca_file` if that file
    cannot be read or holds no certificate."""
    ca_file = str(route.ca_file) if route.ca_file else None
    try:
        return tls_context(route.tls_verify, ca_file)
    except OSError as exc:  # ssl.SSLError too
        # OpenSSL's own reason (tls.error_text: never the file's bytes), or the OS's.
        reason = error_text(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
        raise ConfigError(
            f"routes.{route.name}.tls.ca_file", f"cannot load {ca_file}: {reason}"
        ) from None


def _clients(allowed: tuple[Network, ...], tls: ssl.SSLContext) -> _Clients:
    return _Clients(Pool(allowed, tls), _session(allowed, tls))


def _session(allowed: tuple[Network, ...], tls: ssl.SSLContext) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=netguard.GuardedResolver(allowed),
        ssl=tls,
        limit=0,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,  # SECURITY: never send keys through an HTTP(S)_PROXY from the environment
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        response_class=_UpstreamResponse,
    )


class _UpstreamResponse(aiohttp.ClientResponse):
    """An upstream answer whose connection is closed if its status is 1xx.

    aiohttp's client skips 100, 102 and 103 itself and returns a 101 (any other 1xx would
    be a bug there). After a 101 the connection speaks another protocol; a 101 without
    Upgrade has no body, so aiohttp has put the connection back in its pool by now, where
    the next request would read what followed the 101 as its answer. SECURITY: never reused.
    (The proxy's own requests go through keyproxy.pool, which has the same rule.)
    """

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol
        response = await super().start(connection)
        if self.status < 200 and protocol is not None:
            protocol.close()  # a pooled connection that is closed is dropped, never used
        return response


def tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """The client TLS context for an upstream: its certificate verified against `ca_file`
    (else the system's CAs) and its name, unless the route says `tls_verify: false`."""
    context = ssl.create_default_context(cafile=ca_file if verify else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context

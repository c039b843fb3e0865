"""The vault, identity, server and tokens sections of the configuration."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from yarl import URL

from keyproxy.config.limits import exchange_limit
from keyproxy.config.model import (
    ALGORITHMS,
    EXCEPTION_ISSUER,
    FORWARDED_CERT_HEADERS,
    MAX_DELEGATION_DEPTH,
    MAX_LEEWAY,
    AdminConfig,
    ClientAuth,
    ForwardedCertFormat,
    ForwardedClientCert,
    Issuer,
    ListenerTLS,
    ServerConfig,
    TokensConfig,
    VaultAuth,
    VaultConfig,
)
from keyproxy.config.node import Node, opt, required
from keyproxy.spiffe import SCHEME as SPIFFE_SCHEME
from keyproxy.spiffe import InvalidSpiffeId, validate_trust_domain

_CLIENT_AUTH: tuple[ClientAuth, ...] = ("none", "optional", "required")


def vault_config(node: Node, env: Mapping[str, str]) -> VaultConfig:
    f = node.mapping(
        {
            "addr",
            "auth",
            "kv_mount",
            "ca_cert",
            "tls_verify",
            "timeout",
            "refresh_interval",
            "full_refresh_interval",
            "max_staleness",
            "namespace",
        }
    )
    addr = opt(f, "addr", Node.string, "") or env.get("BAO_ADDR") or env.get("VAULT_ADDR")
    if not addr:
        raise node._child("addr").error("is required (or set VAULT_ADDR / BAO_ADDR)")
    url = URL(addr)
    if url.scheme not in ("http", "https") or not url.host:
        raise (f.get("addr") or node).error("must be an http(s) URL")
    refresh = opt(f, "refresh_interval", Node.duration, 2.0)
    staleness = opt(f, "max_staleness", Node.duration, 300.0)
    if staleness < 2 * refresh:
        where = f.get("max_staleness") or f["refresh_interval"]
        raise where.error("max_staleness must be at least twice refresh_interval")
    full = opt(f, "full_refresh_interval", Node.duration, 0.0)  # 0: VaultConfig's default
    if full and not refresh <= full <= staleness / 2:
        # Read twice within max_staleness: a key the index cannot confirm (a proxy policy
        # without it) never goes stale between two reads of the sweep.
        raise f["full_refresh_interval"].error(
            "must be at least refresh_interval and at most half of max_staleness"
        )
    return VaultConfig(
        addr=addr.rstrip("/"),
        auth=_vault_auth(f.get("auth", Node({"method": "token"}, node._child("auth").path))),
        kv_mount=opt(f, "kv_mount", Node.string, "secret").strip("/"),
        ca_cert=opt(f, "ca_cert", Node.path_value, None),
        tls_verify=opt(f, "tls_verify", Node.boolean, True),
        timeout=opt(f, "timeout", Node.duration, 5.0),
        refresh_interval=refresh,
        full_refresh_interval=full,
        max_staleness=staleness,
        namespace=opt(f, "namespace", Node.string, None),
    )


_AUTH_KEYS: dict[str, set[str]] = {
    "token": {"token_file"},
    "approle": {"role_id", "role_id_file", "secret_id_file"},
    "kubernetes": {"role", "jwt_file"},
    "jwt": {"role", "jwt_file"},
}
_AUTH_MOUNTS = {"token": "token", "approle": "approle", "kubernetes": "kubernetes", "jwt": "jwt"}


def _vault_auth(node: Node) -> VaultAuth:
    method_node = node.mapping({"method", "mount", *set().union(*_AUTH_KEYS.values())}).get(
        "method"
    )
    if method_node is None:
        raise node._child("method").error("is required (token, approle, kubernetes or jwt)")
    method = method_node.string()
    if method not in _AUTH_KEYS:
        raise method_node.error("must be one of token, approle, kubernetes, jwt")
    f = node.mapping({"method", "mount", *_AUTH_KEYS[method]})
    auth = VaultAuth(
        method=method,  # type: ignore[arg-type]  # checked against _AUTH_KEYS above
        mount=opt(f, "mount", Node.string, _AUTH_MOUNTS[method]).strip("/"),
        role=opt(f, "role", Node.string, None),
        role_id=opt(f, "role_id", Node.string, None),
        role_id_file=opt(f, "role_id_file", Node.path_value, None),
        secret_id_file=opt(f, "secret_id_file", Node.path_value, None),
        token_file=opt(f, "token_file", Node.path_value, None),
        jwt_file=opt(f, "jwt_file", Node.path_value, None),
    )
    if method == "approle":
        if (auth.role_id is None) == (auth.role_id_file is None):
            raise node._child("role_id").error("set exactly one of role_id, role_id_file")
        required(node, f, "secret_id_file")
    if method in ("kubernetes", "jwt"):
        required(node, f, "role")
        if method == "jwt":
            required(node, f, "jwt_file")
    return auth


def identity_config(node: Node) -> tuple[Issuer, ...]:
    f = node.mapping({"issuers"})
    issuers = tuple(_issuer(item) for item in required(node, f, "issuers").sequence())
    if not issuers:
        raise f["issuers"].error("must list at least one issuer")
    seen: dict[str, str] = {}
    for item, issuer in zip(f["issuers"].sequence(), issuers, strict=True):
        for key in (issuer.name, "iss:" + issuer.issuer):
            if key in seen:
                raise item.error(f"duplicates {seen[key]} ({key.removeprefix('iss:')})")
            seen[key] = item.path
    return issuers


def _issuer(node: Node) -> Issuer:
    f = node.mapping(
        {
            "name",
            "issuer",
            "discovery_url",
            "jwks_uri",
            "jwks_file",
            "audiences",
            "algorithms",
            "leeway",
            "jwks_cache_ttl",
            "jwks_refetch_cooldown",
            "jwks_max_staleness",
            "max_token_lifetime",
        }
    )
    sources = [k for k in ("discovery_url", "jwks_uri", "jwks_file") if k in f]
    if len(sources) != 1:
        raise node.error("set exactly one of discovery_url, jwks_uri, jwks_file")
    for key in ("discovery_url", "jwks_uri"):
        if key in f and URL(f[key].string()).scheme not in ("http", "https"):
            raise f[key].error("must be an http(s) URL")
    audiences = required(node, f, "audiences").strings()
    if not audiences:
        raise f["audiences"].error("must list at least one audience")
    algorithms = required(node, f, "algorithms").strings()
    for i, alg in enumerate(algorithms):
        if alg not in ALGORITHMS:
            raise Node(alg, f"{f['algorithms'].path}[{i}]").error(
                f"unsupported (asymmetric only: {', '.join(sorted(ALGORITHMS))})"
            )
    if not algorithms:
        raise f["algorithms"].error("must list at least one algorithm")
    leeway = opt(f, "leeway", Node.duration, 30.0)
    if leeway > MAX_LEEWAY:
        raise f["leeway"].error(f"must be at most {MAX_LEEWAY:.0f}s")
    name = required(node, f, "name").string()
    if "|" in name or "," in name:
        # SECURITY: "issuer|subject" names a caller in the revocation list: with a "|" in an
        # issuer name, one key could name two callers. (The audit's list of actors is
        # separated by ","; a subject with a "," still makes it ambiguous to read.)
        raise f["name"].error("must not hold '|' or ','")
    if name == EXCEPTION_ISSUER:
        # SECURITY: the exception tokens' callers; revocations by that issuer name them.
        raise f["name"].error(f"{EXCEPTION_ISSUER!r} names the callers of exception tokens")
    if name.startswith(SPIFFE_SCHEME):
        # SECURITY: the issuer names of X.509-SVID callers; a JWT issuer must not pose as one.
        raise f["name"].error(f"{SPIFFE_SCHEME}... names X.509-SVID callers' trust domains")
    issuer = Issuer(
        name=name,
        issuer=required(node, f, "issuer").string(),
        audiences=audiences,
        algorithms=algorithms,
        discovery_url=opt(f, "discovery_url", Node.string, None),
        jwks_uri=opt(f, "jwks_uri", Node.string, None),
        jwks_file=opt(f, "jwks_file", Node.path_value, None),
        leeway=leeway,
        jwks_cache_ttl=opt(f, "jwks_cache_ttl", Node.duration, 3600.0),
        jwks_refetch_cooldown=opt(f, "jwks_refetch_cooldown", Node.duration, 30.0),
        jwks_max_staleness=opt(f, "jwks_max_staleness", Node.duration, 86400.0),
        max_token_lifetime=opt(f, "max_token_lifetime", Node.duration, None),
    )
    if issuer.jwks_max_staleness < issuer.jwks_cache_ttl:
        where = f["jwks_max_staleness"] if "jwks_max_staleness" in f else f["jwks_cache_ttl"]
        raise where.error("jwks_max_staleness must be at least jwks_cache_ttl")
    return issuer


def server_config(node: Node) -> ServerConfig:
    f = node.mapping(
        {
            "host",
            "port",
            "trusted_proxies",
            "admin",
            "header_timeout",
            "keepalive_timeout",
            "max_connections",
            "max_connections_per_source",
            "tls",
        }
    )
    d = ServerConfig()
    server = ServerConfig(
        host=opt(f, "host", Node.string, d.host),
        port=opt(f, "port", port, d.port),
        trusted_proxies=opt(f, "trusted_proxies", Node.networks, ()),
        admin=opt(f, "admin", _admin, d.admin),
        header_timeout=opt(f, "header_timeout", Node.duration, d.header_timeout),
        keepalive_timeout=opt(f, "keepalive_timeout", Node.duration, d.keepalive_timeout),
        max_connections=opt(f, "max_connections", Node.count, d.max_connections),
        max_connections_per_source=opt(
            f, "max_connections_per_source", Node.count, d.max_connections_per_source
        ),
        tls=opt(f, "tls", _proxy_tls, None),
    )
    tls = server.tls
    if tls is not None and tls.forwarded_client_cert is not None and not server.trusted_proxies:
        raise f["tls"].error("forwarded_client_cert needs server.trusted_proxies")
    admin = server.admin
    if admin.port and (admin.host, admin.port) == (server.host, server.port):
        raise f["admin"].error("must listen on another port than the proxy")
    return server


def _admin(node: Node) -> AdminConfig:
    f, d = node.mapping({"host", "port", "tls", "hosts"}), AdminConfig()
    return AdminConfig(
        host=opt(f, "host", Node.string, d.host),
        port=opt(f, "port", port, d.port),
        tls=opt(f, "tls", _admin_tls, None),
        hosts=tuple(n.host_name() for n in f["hosts"].sequence()) if "hosts" in f else d.hosts,
    )


def _admin_tls(node: Node) -> ListenerTLS:
    """The admin listener's `tls`. SECURITY: no token is read there, so a certificate is the
    only credential: `optional` would let in every caller without one."""
    tls = listener_tls(node)
    if tls.client_auth == "optional":
        raise node._child("client_auth").error(
            "must be required or none: the admin listener has no other credential, so "
            "optional would let in every caller without a certificate"
        )
    return tls


def _proxy_tls(node: Node) -> ListenerTLS:
    return listener_tls(node, forwarded=True)


def listener_tls(node: Node, *, forwarded: bool = False) -> ListenerTLS:
    """A listener's `tls`: certificate, key, client_auth and the trust bundle of each trust
    domain whose X.509-SVIDs it accepts; the proxy listener's (`forwarded`) also where a
    front proxy forwards the client certificate."""
    keys = {"certificate", "key", "client_auth", "trust_bundles"}
    f = node.mapping(keys | {"forwarded_client_cert"} if forwarded else keys)
    client_auth: ClientAuth = opt(f, "client_auth", _client_auth, "none")
    bundle_nodes: list[tuple[str, Node]] = opt(f, "trust_bundles", Node.items, [])
    bundles = []
    for trust_domain, file in bundle_nodes:
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as exc:
            raise file.error(f"not a SPIFFE trust domain name: {exc}") from None
        bundles.append((trust_domain, file.path_value()))
    if client_auth != "none" and not bundles:
        raise node._child("trust_bundles").error(
            f"client_auth {client_auth} needs the trust bundle of at least one trust domain"
        )
    if client_auth == "none" and bundles:
        raise f["trust_bundles"].error("is only read with client_auth optional or required")
    forwarded_cert = opt(f, "forwarded_client_cert", _forwarded_client_cert, None)
    if forwarded_cert is not None and client_auth == "none":
        raise f["forwarded_client_cert"].error("needs client_auth optional or required")
    return ListenerTLS(
        certificate=required(node, f, "certificate").path_value(),
        key=required(node, f, "key").path_value(),
        client_auth=client_auth,
        trust_bundles=tuple(bundles),
        forwarded_client_cert=forwarded_cert,
    )


def _forwarded_client_cert(node: Node) -> ForwardedClientCert:
    """`forwarded_client_cert`: `format` (xfcc or escaped_pem) and optionally `header`, whose
    name must hold `client-cert` (every such header is dropped before forwarding)."""
    f = node.mapping({"format", "header"})
    form_node = required(node, f, "format")
    form: ForwardedCertFormat
    if form_node.value == "xfcc":
        form = "xfcc"
    elif form_node.value == "escaped_pem":
        form = "escaped_pem"
    else:
        raise form_node.error("must be one of: xfcc, escaped_pem")
    header = opt(f, "header", Node.string, FORWARDED_CERT_HEADERS[form]).lower()
    if "client-cert" not in header:
        raise f["header"].error("must hold client-cert (such headers are never forwarded)")
    return ForwardedClientCert(header, form)


def _client_auth(node: Node) -> ClientAuth:
    for value in _CLIENT_AUTH:
        if node.value == value:
            return value
    raise node.error(f"must be one of: {', '.join(_CLIENT_AUTH)}")


def issuer_names(issuers: Iterable[Issuer], server: ServerConfig) -> set[str]:
    """The names identities' `issuer` may have under this configuration: each configured
    issuer's, and those of X.509-SVID callers (`svid_issuers`)."""
    return {issuer.name for issuer in issuers} | svid_issuers(server)


def svid_issuers(server: ServerConfig) -> set[str]:
    """The issuer names of X.509-SVID callers: `spiffe://<trust domain>` for each trust domain
    the proxy listener accepts client certificates of (policies name them in `issuers`)."""
    tls = server.tls
    if tls is None or tls.client_auth == "none":
        return set()
    return {SPIFFE_SCHEME + trust_domain for trust_domain, _ in tls.trust_bundles}


def port(node: Node) -> int:
    return node.whole(0, 65535, "a port number (0-65535)")


def _depth(node: Node) -> int:
    return node.whole(0, MAX_DELEGATION_DEPTH, f"a whole number from 0 to {MAX_DELEGATION_DEPTH}")


def tokens_config(node: Node) -> TokensConfig:
    f = node.mapping(
        {
            "max_ttl",
            "default_ttl",
            "exception_max_ttl",
            "issuer",
            "transit",
            "state_path",
            "revocation_poll_interval",
            "revocation_max_staleness",
            "key_refetch_cooldown",
            "key_refresh_interval",
            "key_max_staleness",
            "max_delegation_depth",
            "exchange_limit",
        }
    )
    transit = f["transit"].mapping({"mount", "key"}) if "transit" in f else {}
    d = TokensConfig()
    tokens = TokensConfig(
        max_ttl=opt(f, "max_ttl", Node.duration, d.max_ttl),
        default_ttl=opt(f, "default_ttl", Node.duration, d.default_ttl),
        exception_max_ttl=opt(f, "exception_max_ttl", Node.duration, d.exception_max_ttl),
        issuer=opt(f, "issuer", Node.string, d.issuer),
        transit_mount=opt(transit, "mount", Node.string, d.transit_mount).strip("/"),
        transit_key=opt(transit, "key", Node.string, d.transit_key),
        state_path=opt(f, "state_path", Node.string, d.state_path).strip("/"),
        revocation_poll_interval=opt(
            f, "revocation_poll_interval", Node.duration, d.revocation_poll_interval
        ),
        revocation_max_staleness=opt(
            f, "revocation_max_staleness", Node.duration, d.revocation_max_staleness
        ),
        key_refetch_cooldown=opt(f, "key_refetch_cooldown", Node.duration, d.key_refetch_cooldown),
        key_refresh_interval=opt(f, "key_refresh_interval", Node.duration, d.key_refresh_interval),
        key_max_staleness=opt(f, "key_max_staleness", Node.duration, d.key_max_staleness),
        max_delegation_depth=opt(f, "max_delegation_depth", _depth, d.max_delegation_depth),
        exchange_limit=opt(f, "exchange_limit", exchange_limit, None),
    )
    if tokens.default_ttl > tokens.max_ttl:
        raise node._child("default_ttl").error("must not exceed max_ttl")
    if tokens.revocation_poll_interval > 2.0:
        # Revocations must reach every replica within 2 s (docs/tokens.md).
        raise f["revocation_poll_interval"].error("must be at most 2s")
    if tokens.revocation_max_staleness <= tokens.revocation_poll_interval:
        name = "revocation_max_staleness"
        where = f[name] if name in f else f["revocation_poll_interval"]
        raise where.error(f"{name} must be longer than revocation_poll_interval")
    if tokens.key_max_staleness < tokens.key_refresh_interval:
        where = f["key_max_staleness"] if "key_max_staleness" in f else f["key_refresh_interval"]
        raise where.error("key_max_staleness must be at least key_refresh_interval")
    return tokens

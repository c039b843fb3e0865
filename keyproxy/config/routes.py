"""The routes section: each route's upstream, secret, injections and caller credential."""

from __future__ import annotations

import re
from typing import Final

from yarl import URL

from keyproxy.config.limits import limits_config
from keyproxy.config.loader import key_path
from keyproxy.config.model import (
    HEADER_NAME,
    HOP_BY_HOP,
    ROUTE_NAME,
    CallerCredential,
    Injection,
    Route,
    Upstream,
)
from keyproxy.config.node import Node, key_template, opt, required, secret_ref
from keyproxy.config.rotation import rotation_config
from keyproxy.config.store import Limits
from keyproxy.errors import ConfigError
from keyproxy.mcp import names


def routes_config(node: Node, kv_mount: str) -> dict[str, Route]:
    routes = {}
    for name, item in node.items():
        if not ROUTE_NAME.match(name):
            raise item.error("route names are letters, digits, '_', '.', '-' (max 63)")
        routes[name] = _route(name, item, kv_mount)
    if not routes:
        raise node.error("must define at least one route")
    _one_rotation_per_secret(routes, node)
    return routes


def _one_rotation_per_secret(routes: dict[str, Route], node: Node) -> None:
    """At most one route rotates the keys of a secret. Two would each keep a journal and a
    lock of their own (two rotations of one key at once), and every key of a secret shares
    its `key_id` and `created_at`: one route's phase 2 would revoke by the other's key id
    (its current key), and one route's rotation would make the other's key look new. Routes
    that inject the same key without a `rotation` section of their own are fine."""
    rotating: dict[tuple[str, str], str] = {}
    for name, route in routes.items():
        if route.rotation is None:
            continue
        where = (route.secret.mount, route.secret.path)
        if (other := rotating.setdefault(where, name)) != name:
            raise ConfigError(
                key_path(key_path(node.path, name), "rotation"),
                f"route {other} rotates a key of the same secret ({'/'.join(where)}); rotate "
                "it from one route (the others may inject the same key without rotation) or "
                "give each rotated key a secret of its own",
            )


def _route(name: str, node: Node, kv_mount: str) -> Route:
    f = node.mapping(
        {
            "upstream",
            "secret",
            "inject",
            "caller_credential",
            "egress",
            "tls",
            "allow_http",
            "timeouts",
            "max_body",
            "strip_headers",
            "forward_underscore_headers",
            "bodies_on",
            "owner",
            "rotation",
            "max_age",
            "kind",
            "mcp",
            "limits",
        }
    )
    inject = tuple(_injection(item) for item in required(node, f, "inject").sequence())
    if not inject:
        raise f["inject"].error("must list at least one injection")
    caller = opt(f, "caller_credential", _caller_credential, CallerCredential())
    tls = f["tls"].mapping({"verify", "ca_file"}) if "tls" in f else {}
    timeouts = f["timeouts"].mapping({"connect", "read"}) if "timeouts" in f else {}
    egress = f["egress"].mapping({"allow_cidrs"}) if "egress" in f else {}
    upstream = _upstream(required(node, f, "upstream"))
    if upstream.scheme == "http" and not opt(f, "allow_http", Node.boolean, False):
        raise f["upstream"].error(
            "http:// would send the key unencrypted; use https, or set allow_http: true"
        )
    tls_verify = opt(tls, "verify", Node.boolean, True)
    if not tls_verify and upstream.scheme != "https":
        raise tls["verify"].error("only applies to https upstreams")
    rotation = opt(f, "rotation", lambda n: rotation_config(n, kv_mount), None)
    max_age = opt(f, "max_age", Node.duration, None)
    if max_age is not None and rotation and rotation.every and max_age <= rotation.every:
        raise f["max_age"].error("must be longer than rotation.every")
    strip: tuple[str, ...] = opt(f, "strip_headers", Node.strings, ())
    for i, header in enumerate(strip):
        if not HEADER_NAME.match(header):
            raise Node(header, f"{f['strip_headers'].path}[{i}]").error("not a header name")
    kind = opt(f, "kind", Node.string, "http")
    if kind not in ("http", "mcp"):
        raise f["kind"].error("must be http or mcp")
    if "mcp" in f and kind != "mcp":
        raise f["mcp"].error("only applies to routes of kind: mcp")
    mcp = f["mcp"].mapping({"server_requests", "endpoint"}) if "mcp" in f else {}
    return Route(
        name=name,
        upstream=upstream,
        secret=secret_ref(required(node, f, "secret"), kv_mount),
        inject=inject,
        caller_credential=caller,
        egress_allow=opt(egress, "allow_cidrs", Node.networks, ()),
        tls_verify=tls_verify,
        ca_file=opt(tls, "ca_file", Node.path_value, None),
        connect_timeout=opt(timeouts, "connect", Node.duration, 10.0),
        read_timeout=opt(timeouts, "read", Node.duration, 300.0),
        max_body=opt(f, "max_body", Node.size, 10 * 1024**2),
        strip_headers=tuple(h.lower() for h in strip),
        forward_underscore_headers=opt(f, "forward_underscore_headers", Node.boolean, False),
        bodies_on=opt(f, "bodies_on", _bodies_on, frozenset()),
        owner=opt(f, "owner", Node.string, None),
        rotation=rotation,
        max_age=max_age,
        kind=kind,  # type: ignore[arg-type]  # checked above
        server_requests=opt(mcp, "server_requests", _server_requests, frozenset()),
        # SECURITY: the key goes to one path of an MCP server, by default the SDKs' own.
        mcp_endpoint=opt(mcp, "endpoint", _endpoint, "/mcp") if kind == "mcp" else None,
        limits=opt(f, "limits", lambda n: limits_config(n, f"route.{name}"), Limits()),
    )


# The methods whose bodies a route may accept (`bodies_on`); HEAD and TRACE never have one.
BODIES_ON: Final = ("GET", "OPTIONS", "DELETE")


def _bodies_on(node: Node) -> frozenset[str]:
    methods = node.strings()
    for i, method in enumerate(methods):
        if method not in BODIES_ON:
            raise Node(method, f"{node.path}[{i}]").error(f"one of {', '.join(BODIES_ON)}")
    return frozenset(methods)


def _server_requests(node: Node) -> frozenset[str]:
    """An MCP route's server-to-client requests its callers receive."""
    return names.server_requests(node.strings(), node.error)


# A path as keyproxy sends it upstream: segments of unreserved and sub-delimiter characters
# (no percent-encoding, no dot segment), or "/" alone.
_ENDPOINT: Final = re.compile(r"/|(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+/?")


def _endpoint(node: Node) -> str:
    """An MCP route's endpoint: the one path after /r/<route> its requests may go to."""
    path = node.string()
    # A dot segment is one of dots alone before any ";" (`..;x`, `...`), as keyproxy.paths
    # refuses it in a request: an endpoint with one could never be reached.
    if not _ENDPOINT.fullmatch(path) or any(
        s and not s.split(";", 1)[0].strip(".") for s in path.split("/")
    ):
        raise node.error("must be a path such as /mcp (no dot segment or percent-encoding)")
    return path


def _upstream(node: Node) -> Upstream:
    try:
        url = URL(node.string())
    except ValueError:
        raise node.error("must be an absolute http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise node.error("must be an absolute http(s) URL such as https://api.example.com")
    if url.user or url.password or url.query_string or url.fragment:
        raise node.error("must not contain credentials, a query or a fragment")
    if "%" in url.raw_host:  # an IPv6 zone: its escape would reach the resolver as written
        raise node.error("must not name an IPv6 address with a zone")
    assert url.port is not None  # yarl fills in the default port
    return Upstream(
        scheme=url.scheme,  # type: ignore[arg-type]  # checked above
        # SECURITY: the IDNA 2008 form yarl writes. Resolving, Host and TLS would encode the
        # Unicode one by Python's IDNA 2003 codec: `straße` as `strasse`, another domain.
        host=url.raw_host,
        port=url.port,
        base_path=url.raw_path.rstrip("/"),  # as sent: `path` would decode %3F into a query
    )


def _injection(node: Node) -> Injection:
    if not isinstance(node.value, dict):
        raise node.error("must be a mapping with one of header, query, basic")
    kinds = [k for k in ("header", "query", "basic") if k in node.value]
    if not kinds:
        node.mapping({"header", "query", "basic", "format"})  # a typo: say which key it was
    if len(kinds) != 1:
        raise node.error("set exactly one of header, query, basic")
    kind = kinds[0]
    if kind == "basic":
        f = node.mapping({"basic"})
        b = f["basic"].mapping({"username", "password"})
        username = opt(b, "username", Node.string, "")
        password = opt(b, "password", Node.string, "{key}")
        if "{key}" in username:
            raise b["username"].error("put {key} in password, not username")
        if ":" in username:
            raise b["username"].error("must not contain ':'")
        return Injection(
            "basic", "Authorization", key_template(b.get("password", Node(password, ""))), username
        )
    f = node.mapping({kind, "format"})
    name = f[kind].string()
    if kind == "header" and not HEADER_NAME.match(name):
        raise f[kind].error("not a valid header name")
    if kind == "query" and (not name or "%" in name):
        # SECURITY: its copies in a caller's query are found by their decoded reading
        # (keyproxy.inject.read_as), which an escape in the name itself would only confuse.
        raise f[kind].error("must be the parameter's name as servers read it, without % escapes")
    if kind == "header" and name.lower() in HOP_BY_HOP | {"host", "content-length"}:
        raise f[kind].error("cannot inject a hop-by-hop, Host or Content-Length header")
    return Injection(kind, name, opt(f, "format", key_template, "{key}"))  # type: ignore[arg-type]  # kind is "header" or "query"


CREDENTIAL_NAMING = 200  # characters of a caller credential's header name and scheme


def _caller_credential(node: Node) -> CallerCredential:
    f = node.mapping({"header", "scheme"})
    header = opt(f, "header", Node.string, "Authorization")
    if not HEADER_NAME.match(header):
        raise f["header"].error("not a valid header name")
    scheme_node = f.get("scheme")
    if scheme_node is None:
        scheme = "Bearer" if header.lower() == "authorization" else None
    else:
        scheme = None if scheme_node.value in (None, "") else scheme_node.string()
    if scheme is not None and not HEADER_NAME.fullmatch(scheme):  # a token, as a header name
        raise f["scheme"].error("not a valid authentication scheme")
    # The longest task token leaves 256 bytes of its header line for these (tokens.format).
    if len(header) + len(scheme or "") > CREDENTIAL_NAMING:
        raise node.error(f"header and scheme: at most {CREDENTIAL_NAMING} characters together")
    return CallerCredential(header, scheme)

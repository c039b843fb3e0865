"""Task-token scopes: what a token may do, and how much of a request policy can grant.

A scope maps a route to one or more `Grant`s (methods x path patterns). Several grants per
route keep an intersection exact: if one policy allows GET /a and another POST /b, the scope
holds both grants and never their cross product (POST /a). On an MCP route (`mcp`: the names
of those routes) a grant names tools, prompts, resources and JSON-RPC methods instead
(`McpGrant`), and narrowing intersects those.

    parse(obj)                       requested scope from JSON   -> Scope (ValueError if bad)
    parse_rfc8693(scope, resources)  requested scope from OAuth form fields
    grantable(policies, identity, source, requested) -> Scope    the intersection, never more
    allows(scope, route, method, segments) -> bool               the per-request check
    outside(inner, outer) -> list[str]     what of `inner` `outer` does not hold (delegation)
    mcp_grant(scope, route) -> McpGrant | None     what the scope allows on an MCP route
    intersect_mcp(a, b) / union_mcp(grants)                      MCP grant algebra
    to_claim(scope) / from_claim(obj)                            the token's `scope` claim

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from keyproxy import patterns, policy
from keyproxy.addresses import IPAddress
from keyproxy.caller import Identity
from keyproxy.config import MCP_METHODS, METHODS, Grant, McpGrant, Policy
from keyproxy.mcp import names
from keyproxy.mcp.grants import CLIENT_METHODS

Scope = Mapping[str, tuple[Grant, ...]]

MAX_GRANTS_PER_ROUTE = 16
MAX_PATHS_PER_GRANT = 32
MAX_PATHS_PER_REQUEST = 64
MAX_SEGMENTS = 32
MAX_PATTERN_LENGTH = 512
MAX_MCP_NAMES = 64  # per list of an MCP grant in a request
MCP_KEYS = frozenset({"tools", "prompts", "resources", "methods"})
ANY_PATH: tuple[tuple[str, ...], ...] = (("**",),)


def parse_pattern(text: Any) -> tuple[str, ...]:
    """A requested path pattern ("/v1/*/x/**") as segments; ValueError if it is not one."""
    return patterns.parse(text, max_length=MAX_PATTERN_LENGTH, max_segments=MAX_SEGMENTS)


def format_pattern(segments: tuple[str, ...]) -> str:
    return "/" + "/".join(segments)


def _grant(obj: Any, where: str, *, trusted: bool = False) -> Grant:
    if not isinstance(obj, Mapping) or set(obj) - {"methods", "paths"}:
        raise ValueError(f"{where}: expected {{methods, paths}}")
    methods = obj.get("methods", ["*"])
    paths = obj.get("paths", ["/**"])
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"{where}.methods: a non-empty list of methods")
    upper = {m.upper() for m in methods}
    if not upper <= METHODS | {"*"}:
        raise ValueError(f"{where}.methods: unknown method")
    if not isinstance(paths, list) or not paths:
        raise ValueError(f"{where}.paths: a non-empty list")
    if not trusted and len(paths) > MAX_PATHS_PER_GRANT:
        raise ValueError(f"{where}.paths: at most {MAX_PATHS_PER_GRANT}")
    try:
        # A signed claim was checked when it was issued; its patterns may come from policy,
        # whose sizes the request limits do not bound.
        parsed = tuple(patterns.parse(p) if trusted else parse_pattern(p) for p in paths)
    except ValueError as exc:
        raise ValueError(f"{where}.paths: {exc}") from None
    return Grant(METHODS if "*" in upper else frozenset(upper), parsed)


def _mcp_grant(obj: Any, where: str, *, trusted: bool = False) -> Grant:
    """A requested grant on an MCP route: {tools, prompts, resources, methods}."""
    if not isinstance(obj, Mapping) or set(obj) - MCP_KEYS:
        raise ValueError(f"{where}: expected {{tools, prompts, resources, methods}}")

    def listed(key: str) -> list[Any]:
        value = obj.get(key, [])
        if not isinstance(value, list) or (not trusted and len(value) > MAX_MCP_NAMES):
            raise ValueError(f"{where}.{key}: a list of at most {MAX_MCP_NAMES} names")
        return value

    def error(message: str) -> ValueError:
        return ValueError(f"{where}.{message}")

    return Grant(
        MCP_METHODS,
        ANY_PATH,
        McpGrant(
            tools=names.names("tools", listed("tools"), error),
            prompts=names.names("prompts", listed("prompts"), error),
            resources=tuple(names.uris(listed("resources"), error)),
            methods=names.names("methods", listed("methods"), error) if "methods" in obj else None,
        ),
    )


def parse(
    obj: Any, routes: Sequence[str], *, trusted: bool = False, mcp: Collection[str] = ()
) -> Scope:
    """A requested scope: {route: {methods, paths}} or {route: [{methods, paths}, ...]}, and
    {route: {tools, prompts, resources, methods}} for the MCP routes named in `mcp`.
    `trusted` (a claim we signed) skips the size limits that bound requests."""
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError("scope: a non-empty mapping of route to {methods, paths}")
    scope: dict[str, tuple[Grant, ...]] = {}
    for route, value in obj.items():
        if route not in routes:
            raise ValueError(f"scope.{route}: unknown route")
        items = value if isinstance(value, list) else [value]
        if not items or (not trusted and len(items) > MAX_GRANTS_PER_ROUTE):
            raise ValueError(f"scope.{route}: 1 to {MAX_GRANTS_PER_ROUTE} grants")
        read = _mcp_grant if route in mcp else _grant
        scope[route] = tuple(read(item, f"scope.{route}", trusted=trusted) for item in items)
    total = sum(len(g.paths) for grants in scope.values() for g in grants)
    if not trusted and total > MAX_PATHS_PER_REQUEST:
        raise ValueError(f"scope: at most {MAX_PATHS_PER_REQUEST} path patterns in all")
    return scope


def scope_item(item: str) -> tuple[str, tuple[str, ...], str]:
    """One `route[:METHODS[:path]]` item of the RFC 8693 form: its route, its methods as
    written (("*",) when left out), and its path ("/**" when left out). ValueError for an
    empty part: `r:` or `r:GET:` (an unset shell variable) must not ask for everything."""
    route, has_methods, rest = item.partition(":")
    methods, has_path, path = rest.partition(":")
    if not route or (has_methods and not methods) or (has_path and not path):
        raise ValueError(f"scope item {item!r}: expected route[:METHODS[:/path]], no part empty")
    listed = tuple(methods.split(",")) if methods else ("*",)
    if "" in listed:
        raise ValueError(f"scope item {item!r}: an empty method")
    return route, listed, path or "/**"


def parse_rfc8693(text: str, resources: Sequence[str], routes: Sequence[str]) -> Scope:
    """OAuth token-exchange fields: `scope` is space-separated `route[:METHODS[:path]]` items
    (methods comma-separated); each `resource`/`audience` names a route asked for in full."""
    requested: dict[str, list[dict[str, Any]]] = {}
    for item in text.split():
        route, methods, path = scope_item(item)
        requested.setdefault(route, []).append({"methods": list(methods), "paths": [path]})
    for route in resources:
        requested.setdefault(route, []).append({"methods": ["*"], "paths": ["/**"]})
    return parse(requested, routes)


def grantable(
    policies: Sequence[Policy],
    identity: Identity,
    source: IPAddress,
    requested: Scope,
) -> Scope:
    """The part of `requested` that current policy allows this identity from this source.
    Each granted (methods, path) pair is inside both the request and one policy's grant."""
    return grant(policies, identity, source, requested)[0]


def grant(
    policies: Sequence[Policy],
    identity: Identity,
    source: IPAddress,
    requested: Scope,
) -> tuple[Scope, list[Policy]]:
    """`grantable`, and the policies that contributed to the grant (for their max_ttl)."""
    granted: dict[str, tuple[Grant, ...]] = {}
    contributing: list[Policy] = []
    for route, wanted in requested.items():
        grants: list[Grant] = []
        for pol in policies:
            if not policy.reaches_route(pol, identity, route, source):
                continue
            allowed = pol.allow[route]
            for want in wanted:
                if want.mcp is not None or allowed.mcp is not None:
                    if want.mcp is None or allowed.mcp is None:
                        continue  # an MCP grant narrows only an MCP grant
                    mcp = Grant(MCP_METHODS, ANY_PATH, intersect_mcp(want.mcp, allowed.mcp))
                    if pol not in contributing:
                        contributing.append(pol)
                    if mcp not in grants:
                        grants.append(mcp)
                    continue
                methods = want.methods & allowed.methods
                paths = _intersect(want.paths, allowed.paths)[:MAX_PATHS_PER_GRANT]
                if methods and paths:
                    if pol not in contributing:
                        contributing.append(pol)
                    if Grant(methods, paths) not in grants:
                        grants.append(Grant(methods, paths))
        if grants:
            granted[route] = tuple(grants[:MAX_GRANTS_PER_ROUTE])
    return granted, contributing


def _intersect(
    wanted: tuple[tuple[str, ...], ...], allowed: tuple[tuple[str, ...], ...]
) -> tuple[tuple[str, ...], ...]:
    """Path patterns inside both sets: each wanted pattern some allowed one covers, and each
    allowed pattern some wanted one covers (asking for /v1/** where /v1/models is allowed
    grants /v1/models). Partial overlaps that neither covers are left out: never more."""
    out: list[tuple[str, ...]] = []
    for pattern in wanted:
        if any(covers(a, pattern) for a in allowed) and pattern not in out:
            out.append(pattern)
    for pattern in allowed:
        if any(covers(w, pattern) for w in wanted) and not any(covers(o, pattern) for o in out):
            out.append(pattern)
    return tuple(out)


@lru_cache(maxsize=4096)
def covers(  # noqa: PLR0911  # one return per case of the pattern algebra reads best
    granted: tuple[str, ...], requested: tuple[str, ...]
) -> bool:
    """Whether every path `requested` matches is also matched by `granted`."""
    if not granted:
        return not requested
    head = granted[0]
    if head == "**":
        if covers(granted[1:], requested):
            return True  # "**" standing for no segments
        return bool(requested) and covers(granted, requested[1:])  # absorbing one more
    if not requested or requested[0] == "**":
        return False
    if requested[0] == "*":
        return head == "*" and covers(granted[1:], requested[1:])
    if head not in ("*", requested[0]) or (head == "*" and requested[0] == ""):
        return False
    return covers(granted[1:], requested[1:])


def allows(scope: Scope, route: str, method: str, segments: tuple[str, ...]) -> bool:
    return any(
        method in grant.methods and any(policy.match_path(p, segments) for p in grant.paths)
        for grant in scope.get(route, ())
    )


def outside(inner: Scope, outer: Scope) -> list[str]:
    """The parts of `inner` that `outer` does not hold, described ("route METHOD /path",
    "route: MCP grant"); empty when `inner` is within `outer`. A grant is held if one grant
    of `outer` on its route holds all of its methods and paths (or, on an MCP route, all
    of its names)."""
    found: list[str] = []
    for route, grants in inner.items():
        for want in grants:
            held = outer.get(route, ())
            if want.mcp is not None:
                if not any(g.mcp is not None and _mcp_within(want.mcp, g.mcp) for g in held):
                    found.append(f"{route}: MCP grant")
                continue
            for path in want.paths:
                for method in sorted(want.methods):
                    if not any(
                        g.mcp is None
                        and method in g.methods
                        and any(covers(p, path) for p in g.paths)
                        for g in held
                    ):
                        found.append(f"{route} {method} {format_pattern(path)}")
    return found


def _mcp_within(inner: McpGrant, outer: McpGrant) -> bool:
    # Narrowing by `outer` takes nothing away: what both allow is all `inner` allows.
    return intersect_mcp(inner, outer) == intersect_mcp(inner, inner)


def _covers_resource(outer: str, inner: str) -> bool:
    """Whether every URI the resource rule `inner` matches is matched by `outer`."""
    if outer.endswith("*"):
        return inner.startswith(outer[:-1])
    return inner == outer


# `methods: None` allows the protocol revision's own client methods, never an extension.
_STANDARD_METHODS = frozenset().union(*CLIENT_METHODS.values())


def intersect_mcp(a: McpGrant, b: McpGrant) -> McpGrant:
    """What both grants allow: never more than either."""
    if a.methods is None:
        methods = None if b.methods is None else b.methods & _STANDARD_METHODS
    elif b.methods is None:
        methods = a.methods & _STANDARD_METHODS
    else:
        methods = a.methods & b.methods
    resources = {r for r in a.resources if any(_covers_resource(o, r) for o in b.resources)}
    resources |= {r for r in b.resources if any(_covers_resource(o, r) for o in a.resources)}
    return McpGrant(a.tools & b.tools, a.prompts & b.prompts, tuple(sorted(resources)), methods)


def union_mcp(grants: Iterable[McpGrant]) -> McpGrant:
    """What any of the grants allows (a scope's several grants on one route)."""
    found = list(grants)
    methods: frozenset[str] | None = frozenset()
    for g in found:
        methods = None if methods is None or g.methods is None else methods | g.methods
    return McpGrant(
        frozenset().union(*(g.tools for g in found)),
        frozenset().union(*(g.prompts for g in found)),
        tuple(sorted({r for g in found for r in g.resources})),
        methods,
    )


def mcp_grant(scope: Scope, route: str) -> McpGrant | None:
    """What `scope` allows on the MCP route `route` (None: it names no MCP grant there)."""
    found = [g.mcp for g in scope.get(route, ()) if g.mcp is not None]
    return union_mcp(found) if found else None


def _claim_item(g: Grant) -> dict[str, list[str]]:
    if g.mcp is None:
        return {"methods": sorted(g.methods), "paths": [format_pattern(p) for p in g.paths]}
    item = {
        "tools": sorted(g.mcp.tools),
        "prompts": sorted(g.mcp.prompts),
        "resources": list(g.mcp.resources),
    }
    if g.mcp.methods is not None:
        item["methods"] = sorted(g.mcp.methods)
    return item


def to_claim(scope: Scope) -> dict[str, list[dict[str, list[str]]]]:
    return {route: [_claim_item(g) for g in grants] for route, grants in scope.items()}


def from_claim(obj: Any, routes: Sequence[str], *, mcp: Collection[str] = ()) -> Scope:
    """The scope claim of a verified token. Routes no longer configured are dropped; `mcp`
    names the MCP routes."""
    if not isinstance(obj, Mapping):
        raise ValueError("scope claim: not a mapping")  # noqa: TRY004  # callers catch ValueError
    known = {route: value for route, value in obj.items() if route in routes}
    return parse(known, routes, trusted=True, mcp=mcp) if known else {}


def mcp_routes(routes: Mapping[str, Any]) -> frozenset[str]:
    """The names of the MCP routes among `routes` (name -> Route)."""
    return frozenset(name for name, route in routes.items() if route.kind == "mcp")


def describe(scope: Scope) -> str:
    """The scope in the RFC 8693 text form, for `scope` in token responses."""
    return " ".join(
        [
            f"{route}:{','.join(sorted(g.methods))}:{format_pattern(p)}"
            for route, grants in scope.items()
            for g in grants
            if g.mcp is None
            for p in g.paths
        ]
        + [
            f"{route}:mcp:tools={','.join(sorted(g.mcp.tools))}"
            for route, grants in scope.items()
            for g in grants
            if g.mcp is not None
        ]
    )

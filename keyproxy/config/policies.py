"""The policies section: who (issuer and claims, source networks) may call which routes,
methods and paths."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from keyproxy import patterns
from keyproxy.config.limits import limits_config
from keyproxy.config.model import (
    MCP_METHODS,
    METHODS,
    Grant,
    McpGrant,
    Policy,
    Route,
    claim_text,
)
from keyproxy.config.node import Node, did_you_mean, opt, required
from keyproxy.config.store import Limits
from keyproxy.mcp import names


def policies_config(
    node: Node, routes: Mapping[str, Route], issuers: Collection[str]
) -> tuple[Policy, ...]:
    """The policies; `issuers` are the names they may name: the configured JWT issuers and
    `spiffe://<trust domain>` for the X.509-SVID callers of each accepted trust domain."""
    names: set[str] = set()
    policies = []
    for item in node.sequence():
        policy = _policy(item, routes, set(issuers))
        if policy.name in names:
            raise item._child("name").error(f"duplicate policy name {policy.name!r}")
        names.add(policy.name)
        policies.append(policy)
    return tuple(policies)


def _policy(node: Node, routes: Mapping[str, Route], issuer_names: set[str]) -> Policy:
    f = node.mapping(
        {"name", "subjects", "issuers", "claims", "source_cidrs", "allow", "max_ttl", "limits"}
    )
    policy_name = required(node, f, "name").string()
    subjects = required(node, f, "subjects").strings()
    if not subjects:
        raise f["subjects"].error("must list at least one subject (use '*' for any)")
    issuers: tuple[str, ...] = opt(f, "issuers", Node.strings, ())
    for i, name in enumerate(issuers):
        if name not in issuer_names:
            hint = did_you_mean(name, issuer_names)
            raise Node(name, f"{f['issuers'].path}[{i}]").error(f"unknown issuer {name!r}{hint}")
    claims = []
    claim_nodes: list[tuple[str, Node]] = opt(f, "claims", Node.items, [])
    for key, value in claim_nodes:
        text = claim_text(value.value)
        if not text:
            raise value.error("must be a string, number or boolean (exact match)")
        claims.append((key, text))
    allow = {}
    for route, grant in required(node, f, "allow").items():
        if route not in routes:
            raise grant.error(f"unknown route {route!r}{did_you_mean(route, routes)}")
        allow[route] = mcp_grant(grant) if routes[route].kind == "mcp" else _grant(grant)
    return Policy(
        name=policy_name,
        subjects=subjects,
        issuers=issuers,
        claims=tuple(claims),
        source_cidrs=opt(f, "source_cidrs", Node.networks, ()),
        allow=allow,
        max_ttl=opt(f, "max_ttl", Node.duration, None),
        limits=opt(f, "limits", lambda n: limits_config(n, f"policy.{policy_name}"), Limits()),
    )


def _grant(node: Node) -> Grant:
    f = node.mapping({"methods", "paths"})
    methods = required(node, f, "methods").strings()
    for i, method in enumerate(methods):
        if method.upper() not in METHODS and method != "*":
            raise Node(method, f"{f['methods'].path}[{i}]").error(
                f"unknown method (one of {', '.join(sorted(METHODS))} or '*')"
            )
    allowed = METHODS if "*" in methods else frozenset(m.upper() for m in methods)
    paths = []
    for item in required(node, f, "paths").sequence():
        paths.append(_path_pattern(item))
    if not paths:
        raise f["paths"].error("must list at least one path pattern (use '/**' for any)")
    return Grant(allowed, tuple(paths))


def mcp_grant(node: Node) -> Grant:
    """A grant on an MCP route: {tools, prompts, resources, methods}, each a list of names."""
    if node.value is None:
        node = Node({}, node.path)
    f = node.mapping({"tools", "prompts", "resources", "methods"})

    def listed(key: str) -> tuple[str, ...]:
        return f[key].strings() if key in f else ()

    def checked(key: str) -> frozenset[str]:
        return names.names(key, listed(key), f[key].error if key in f else node.error)

    resources = names.uris(listed("resources"), f["resources"].error) if "resources" in f else []
    return Grant(
        MCP_METHODS,
        (("**",),),
        McpGrant(
            tools=checked("tools"),
            prompts=checked("prompts"),
            resources=tuple(resources),
            methods=checked("methods") if "methods" in f else None,
        ),
    )


def _path_pattern(node: Node) -> tuple[str, ...]:
    return patterns.parse(node.string(), error=node.error)

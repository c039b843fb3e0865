"""Task-token scopes: parsing, pattern coverage, and the intersection with policy."""

from __future__ import annotations

import ipaddress

import pytest

from keyproxy import scope
from keyproxy.config import MCP_METHODS, Grant, McpGrant, Policy
from keyproxy.identity import Identity

P = scope.parse_pattern
HERE = ipaddress.ip_address("10.1.2.3")


@pytest.mark.parametrize(
    ("granted", "requested", "expected"),
    [
        ("/**", "/v1/models", True),
        ("/**", "/**", True),
        ("/v1/**", "/v1", True),
        ("/v1/**", "/v1/*/x", True),
        ("/v1/**", "/v2/x", False),
        ("/v1/*", "/v1/models", True),
        ("/v1/*", "/v1/*", True),
        ("/v1/*", "/v1/**", False),
        ("/v1/models", "/v1/*", False),
        ("/v1/models", "/v1/models", True),
        ("/v1/models", "/v1/models/x", False),
        ("/*/models", "/v1/models", True),
        ("/", "/", True),
        ("/", "/**", False),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/**/z", True),
        ("/a/**/z", "/a/b/**", False),
    ],
)
def test_covers(granted: str, requested: str, expected: bool) -> None:
    """A granted pattern covers a requested one only if every path of the request matches."""
    assert scope.covers(P(granted), P(requested)) is expected


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"nope": {"methods": ["GET"], "paths": ["/"]}},
        {"r": {"methods": ["FETCH"], "paths": ["/"]}},
        {"r": {"methods": [], "paths": ["/"]}},
        {"r": {"methods": ["GET"], "paths": ["/a/../b"]}},
        {"r": {"methods": ["GET"], "paths": ["no-slash"]}},
        {"r": {"methods": ["GET"], "paths": ["/a*"]}},
        {"r": {"methods": ["GET"], "paths": ["/"], "extra": 1}},
        {"r": [{"methods": ["GET"], "paths": ["/"]}] * 17},
    ],
)
def test_bad_requests_are_refused(bad: object) -> None:
    """Unknown routes and methods, malformed patterns and oversize scopes are refused."""
    with pytest.raises(ValueError, match=r"scope"):
        scope.parse(bad, ["r"])


def _policy(name: str, **allow: Grant) -> Policy:
    return Policy(name=name, subjects=("agent",), allow=allow)


def _g(methods: str, *paths: str) -> Grant:
    return Grant(frozenset(methods.split(",")), tuple(P(p) for p in paths))


def test_grant_is_never_more_than_policy() -> None:
    """Each granted (method, path) lies inside one policy's grant and inside the request;
    two policies never combine into their cross product."""
    policies = [_policy("a", r=_g("GET", "/a")), _policy("b", r=_g("POST", "/b"))]
    requested = scope.parse({"r": {"methods": ["GET", "POST"], "paths": ["/a", "/b"]}}, ["r"])
    granted = scope.grantable(policies, Identity("i", "agent"), HERE, requested)
    assert set(granted["r"]) == {_g("GET", "/a"), _g("POST", "/b")}
    assert scope.allows(granted, "r", "GET", ("a",))
    assert not scope.allows(granted, "r", "POST", ("a",))


def test_broad_request_gets_the_policy_grant() -> None:
    """Asking for a whole route yields what policy grants on it, and other identities or
    sources get nothing."""
    policies = [
        Policy(
            name="p",
            subjects=("agent",),
            source_cidrs=(ipaddress.ip_network("10.0.0.0/8"),),
            allow={"r": _g("GET,POST", "/v1/models", "/v1/chat/*")},
        ),
    ]
    requested = scope.parse_rfc8693("", ["r"], ["r"])
    granted = scope.grantable(policies, Identity("i", "agent"), HERE, requested)
    assert granted == {"r": (_g("GET,POST", "/v1/models", "/v1/chat/*"),)}
    assert scope.grantable(policies, Identity("i", "other"), HERE, requested) == {}
    outside = ipaddress.ip_address("192.0.2.1")
    assert scope.grantable(policies, Identity("i", "agent"), outside, requested) == {}


def test_a_scope_item_defaults_to_every_method_and_path() -> None:
    """`route[:METHODS[:path]]`: methods as written, "*" and "/**" where left out (the one
    reading of the grammar, for the exchange and `keyproxy run --scope` alike)."""
    assert scope.scope_item("r") == ("r", ("*",), "/**")
    assert scope.scope_item("r:get,POST") == ("r", ("get", "POST"), "/**")
    assert scope.scope_item("r:GET:/v1/a:b") == ("r", ("GET",), "/v1/a:b")


@pytest.mark.parametrize("item", ["", ":GET", "r:", "r:GET:", "r::/x", "r:GET,:/x", "r:,GET"])
def test_a_scope_item_with_an_empty_part_is_refused(item: str) -> None:
    """A part written but empty (an unset shell variable) never widens to every method or
    path."""
    with pytest.raises(ValueError, match="scope item"):
        scope.scope_item(item)


def test_rfc8693_scope_text_round_trips() -> None:
    """`route:METHODS:/path` items parse, and describe() writes the same form back."""
    parsed = scope.parse_rfc8693("r:GET,POST:/v1/** r:DELETE:/x", [], ["r"])
    assert scope.describe(parsed) == "r:GET,POST:/v1/** r:DELETE:/x"
    assert scope.from_claim(scope.to_claim(parsed), ["r"]) == parsed


def test_large_policy_grants_stay_usable() -> None:
    """A grant from a policy with more patterns than a request may carry is capped at issue
    time, and its signed claim parses back (no token that verifies but never works)."""
    many = tuple(P(f"/v1/p{i}") for i in range(40))
    policies = [_policy("wide", r=Grant(frozenset({"GET"}), many))]
    requested = scope.parse({"r": {"methods": ["GET"], "paths": ["/**"]}}, ["r"])
    granted = scope.grantable(policies, Identity("i", "agent"), HERE, requested)
    assert len(granted["r"][0].paths) == scope.MAX_PATHS_PER_GRANT
    assert scope.from_claim(scope.to_claim(granted), ["r"]) == granted


def test_request_size_is_bounded() -> None:
    """More than 64 patterns in all, or patterns deeper than 32 segments, are refused."""
    wide = {f"r{i}": {"methods": ["GET"], "paths": [f"/p{j}" for j in range(20)]} for i in range(4)}
    with pytest.raises(ValueError, match="at most 64"):
        scope.parse(wide, list(wide))
    with pytest.raises(ValueError, match="segments"):
        scope.parse({"r": {"methods": ["GET"], "paths": ["/a" * 33]}}, ["r"])


def _mcp(**fields: object) -> Grant:
    return scope.parse({"m": fields}, ["m"], mcp={"m"})["m"][0]


def test_mcp_scopes_name_tools_and_narrow_the_policy() -> None:
    """A token's MCP scope is the intersection with the policy's: tools, prompts, resource
    rules and methods are never more than either."""
    policies = [
        _policy(
            "p",
            m=_mcp(tools=["search_issues", "get_issue"], resources=["issues://*"]),
        )
    ]
    requested = scope.parse(
        {
            "m": {
                "tools": ["search_issues", "delete_repo"],
                "resources": ["issues://1", "files://*"],
                "methods": ["tools/call", "tools/list"],
            }
        },
        ["m"],
        mcp={"m"},
    )
    granted = scope.grantable(policies, Identity("i", "agent"), HERE, requested)
    found = scope.mcp_grant(granted, "m")
    assert found == McpGrant(
        tools=frozenset({"search_issues"}),
        resources=("issues://1",),
        methods=frozenset({"tools/call", "tools/list"}),
    )
    assert scope.allows(granted, "m", "POST", ("mcp",))
    assert scope.from_claim(scope.to_claim(granted), ["m"], mcp={"m"}) == granted
    wider = scope.intersect_mcp(McpGrant(resources=("a://x/*",)), McpGrant(resources=("a://*",)))
    assert wider.resources == ("a://x/*",)


@pytest.mark.parametrize(
    "bad",
    [
        {"m": {"tools": ["Search\u200bIssues"]}},
        {"m": {"tools": "search_issues"}},
        {"m": {"tools": ["x"] * 65}},
        {"m": {"methods": ["GET"], "paths": ["/**"]}},
        {"m": {"resources": ["a://../b"]}},
    ],
)
def test_bad_mcp_scopes_are_refused(bad: object) -> None:
    """An MCP scope holds only exact names, as lists, within the request limits."""
    with pytest.raises(ValueError, match=r"scope\.m"):
        scope.parse(bad, ["m"], mcp={"m"})


def test_mcp_methods_left_open_never_admit_an_extension() -> None:
    """A grant without `methods` allows the revision's own client methods: intersected with
    a list naming an extension method, the extension goes, and a child asking for one is
    outside a parent that never had it."""
    asked = McpGrant(methods=frozenset({"x/anything", "tools/list"}))
    open_grant = McpGrant()  # methods: None
    assert scope.intersect_mcp(asked, open_grant).methods == frozenset({"tools/list"})
    assert scope.intersect_mcp(open_grant, asked).methods == frozenset({"tools/list"})
    assert scope.intersect_mcp(open_grant, open_grant).methods is None
    any_path = scope.ANY_PATH
    mcp_route = {"m": (Grant(MCP_METHODS, any_path, open_grant),)}
    child = {"m": (Grant(MCP_METHODS, any_path, McpGrant(methods=frozenset({"x/anything"}))),)}
    assert scope.outside(child, mcp_route), "a child cannot gain an extension method"
    standard = {"m": (Grant(MCP_METHODS, any_path, McpGrant(methods=frozenset({"tools/list"}))),)}
    assert scope.outside(standard, mcp_route) == []

"""keyproxy.config.policies: MCP tool grants compile, and their mistakes name their YAML path."""

from __future__ import annotations

from typing import Any

import pytest

from keyproxy import config
from keyproxy.errors import ConfigError
from tests.helpers.configs import MCP_ROUTE, POLICY, parse_doc, with_setting


def _with_mcp(grant: Any) -> dict[str, Any]:
    doc = with_setting("routes.github-mcp", MCP_ROUTE)
    doc["policies"][0]["allow"]["github-mcp"] = grant
    return doc


def test_an_mcp_route_and_its_tool_grants_compile() -> None:
    """`kind: mcp` routes take grants naming tools, prompts, resources and methods."""
    grant = {"tools": ["search_issues"], "resources": ["issues://*"], "methods": ["tools/call"]}
    cfg = parse_doc(_with_mcp(grant))
    route = cfg.routes["github-mcp"]
    assert route.kind == "mcp"
    assert route.server_requests == frozenset({"elicitation/create"})
    assert cfg.routes["openai"].kind == "http"
    allowed = cfg.policies[0].allow["github-mcp"]
    assert allowed.methods == config.MCP_METHODS
    assert allowed.mcp == config.McpGrant(
        tools=frozenset({"search_issues"}),
        resources=("issues://*",),
        methods=frozenset({"tools/call"}),
    )
    assert parse_doc(_with_mcp({})).policies[0].allow["github-mcp"].mcp == config.McpGrant()


@pytest.mark.parametrize(
    ("grant", "where", "what"),
    [
        ({"tools": ["Search\u200bIssues"]}, "allow.github-mcp.tools", "control or format"),
        ({"tools": ["e\u0301"]}, "allow.github-mcp.tools", "normal form NFC"),
        ({"tools": ["a", "a"]}, "allow.github-mcp.tools", "given twice"),
        ({"resources": ["file:///a/../b"]}, "allow.github-mcp.resources", "'..' segment"),
        ({"resources": ["x*y"]}, "allow.github-mcp.resources", "* only at its end"),
        ({"methods": ["GET"], "paths": ["/**"]}, "allow.github-mcp.paths", "unknown key"),
    ],
)
def test_bad_mcp_grants_name_their_yaml_path(grant: Any, where: str, what: str) -> None:
    """A name that cannot be compared exactly, or an HTTP grant on an MCP route, is refused
    with the YAML path of the list holding it."""
    with pytest.raises(ConfigError) as info:
        parse_doc(_with_mcp(grant))
    assert f"{POLICY}.{where}" in str(info.value)
    assert what in str(info.value)

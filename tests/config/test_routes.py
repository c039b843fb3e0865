"""keyproxy.config.routes: MCP options belong to MCP routes only."""

from __future__ import annotations

import pytest

from keyproxy.errors import ConfigError
from tests.helpers.configs import MCP_ROUTE, parse_doc, with_setting


def test_mcp_options_only_on_mcp_routes() -> None:
    """`mcp:` on an http route, an unknown kind, or an unknown server request is refused."""
    for path, value, what in [
        ("routes.openai.mcp", {"server_requests": []}, "only applies to routes of kind: mcp"),
        ("routes.openai.kind", "grpc", "must be http or mcp"),
    ]:
        with pytest.raises(ConfigError, match=what):
            parse_doc(with_setting(path, value))
    bad = {**MCP_ROUTE, "mcp": {"server_requests": ["tools/call"]}}
    with pytest.raises(ConfigError, match=r"routes\.github-mcp\.mcp\.server_requests"):
        parse_doc(with_setting("routes.github-mcp", bad))

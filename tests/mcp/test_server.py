"""The test MCP server, reached directly by the SDK's own Streamable HTTP client."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from tests.mcp.server import McpServer, running_server


@pytest.fixture(scope="module", params=[False, True], ids=["sse", "json"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[McpServer]:
    """The server answering as SSE streams, then as JSON."""
    log = tmp_path_factory.mktemp("mcp") / "server.err"
    with running_server(
        "mk-" + secrets.token_urlsafe(18), json_response=request.param, log=log
    ) as s:
        yield s


@asynccontextmanager
async def session(server: McpServer, key: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=60)) as http,
        streamable_http_client(server.url, http_client=http) as (read, write, _),
        ClientSession(read, write) as client,
    ):
        await client.initialize()
        yield client


async def test_the_sdk_client_lists_and_calls_the_tools(server: McpServer) -> None:
    """With the key, the SDK client sees both tools, the prompt and the resources, and calls."""
    async with session(server, server.key) as client:
        tools = await client.list_tools()
        assert sorted(t.name for t in tools.tools) == ["search_issues", "whoami"]
        found = await client.call_tool("search_issues", {"query": "login"})
        assert not found.isError
        assert found.structuredContent == {
            "result": ["Login fails on Safari", "Login page is slow"]
        }
        echoed = await client.call_tool("whoami", {})
        assert echoed.content == [TextContent(type="text", text=f"called with key {server.key}")]
        assert [p.name for p in (await client.list_prompts()).prompts] == ["summarize"]
        assert [str(r.uri) for r in (await client.list_resources()).resources] == ["issues://all"]
        templates = await client.list_resource_templates()
        assert [t.uriTemplate for t in templates.resourceTemplates] == ["issues://{number}"]


async def test_a_wrong_key_is_refused_before_mcp(server: McpServer) -> None:
    """Without the exact key the server answers 401 to any request."""
    async with httpx.AsyncClient() as http:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            answer = await http.post(server.url, json={}, headers=headers)
            assert answer.status_code == 401

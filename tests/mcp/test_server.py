"""The test MCP server, reached directly by the SDK's own Streamable HTTP client."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.types import TextContent

from keyproxy.mcp import Grant, Pending, StreamFilter, decide, filter_json_answer, parse_body
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


def wire(message: types.JSONRPCMessage) -> bytes:
    """A message as the SDK's client transport puts it on the wire."""
    return json.dumps(
        message.model_dump(by_alias=True, mode="json", exclude_none=True),
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def sdk_request(rid: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    return wire(
        types.JSONRPCMessage(
            types.JSONRPCRequest(jsonrpc="2.0", id=rid, method=method, params=params)
        )
    )


async def test_the_real_server_answers_read_exactly_and_filter(server: McpServer) -> None:
    """The SDK's own request bytes pass the strict reader and the grant; the server's tools/list
    answer (SSE or JSON) is filtered to the granted tool and still reads as the SDK's type."""
    grant = Grant.build(tools=["search_issues"])
    version = "2025-06-18"
    init = sdk_request(
        1,
        "initialize",
        {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    )
    headers = {
        "Authorization": f"Bearer {server.key}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        answer = await http.post(server.url, content=init)
        assert answer.status_code == 200
        headers = {
            "Mcp-Session-Id": answer.headers["mcp-session-id"],
            "MCP-Protocol-Version": version,
        }
        initialized = wire(
            types.JSONRPCMessage(
                types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")
            )
        )
        for body in (
            init,
            initialized,
            sdk_request(2, "tools/list"),
            sdk_request(3, "tools/call", {"name": "search_issues", "arguments": {"query": "x"}}),
        ):
            assert decide(parse_body(body, version=version), grant, version).allowed
        refused = sdk_request(4, "tools/call", {"name": "whoami", "arguments": {}})
        assert not decide(parse_body(refused, version=version), grant, version).allowed
        assert (
            await http.post(server.url, content=initialized, headers=headers)
        ).status_code == 202

        listing = sdk_request(2, "tools/list")
        pending = Pending.of(parse_body(listing, version=version))
        async with http.stream("POST", server.url, content=listing, headers=headers) as streamed:
            kind = streamed.headers["content-type"].split(";")[0]
            if kind == "text/event-stream":
                stream = StreamFilter(grant, version, pending)
                out = b"".join([(stream.feed(c)).data async for c in streamed.aiter_raw()])
                out += stream.close().data
                assert out.startswith(b"event: message\r\n")
                data = next(line for line in out.splitlines() if line.startswith(b"data: "))[6:]
            else:
                assert kind == "application/json"
                data = filter_json_answer(await streamed.aread(), pending, grant, version)
    message = types.JSONRPCMessage.model_validate_json(data).root
    assert isinstance(message, types.JSONRPCResponse)
    tools = types.ListToolsResult.model_validate(message.result)
    assert [t.name for t in tools.tools] == ["search_issues"]

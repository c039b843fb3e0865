"""A demo MCP server for `keyproxy dev`, built with the official `mcp` SDK.

It stands in for a vendor's MCP endpoint that takes a static API key: every request must
carry `Authorization: Bearer <key>` (the key `keyproxy dev` seeded in OpenBao) or gets a 401.
It speaks MCP's Streamable HTTP transport at /mcp and offers two tools: `search_issues`
(granted to the demo agent) and `close_issue` (not granted: keyproxy refuses it and never
lists it).

The `mcp` package is imported only when the server is built (`keyproxy dev`), so keyproxy
itself runs without it: `available()` says whether it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.util
import socket
from collections.abc import Iterator
from typing import Any

ISSUES = {1: "Login fails on Safari", 2: "Crash when the cache is full", 3: "Login page is slow"}
TOOLS = ("search_issues", "close_issue")


def available() -> bool:
    """Whether the `mcp` SDK (and so this server) is installed."""
    return importlib.util.find_spec("mcp") is not None


def build(key: str) -> Any:
    """The ASGI app: the key check in front of the SDK's Streamable HTTP app."""
    from mcp.server.fastmcp import FastMCP  # noqa: PLC0415  # only `keyproxy dev` needs it

    server = FastMCP("keyproxy-demo-issues", log_level="WARNING")

    @server.tool()
    def search_issues(query: str) -> list[str]:
        """The titles of the demo issues whose title contains `query` (case-insensitive)."""
        return [t for t in ISSUES.values() if query.lower() in t.lower()]

    @server.tool()
    def close_issue(number: int) -> str:
        """Close a demo issue (the demo agent is not granted this tool)."""
        return f"closed issue {number}" if number in ISSUES else f"no issue {number}"

    return _KeyCheck(server.streamable_http_app(), f"Bearer {key}".encode())


class _KeyCheck:
    """ASGI middleware: HTTP requests without the exact Authorization header get a 401."""

    def __init__(self, app: Any, expected: bytes) -> None:
        self._app = app
        self._expected = expected

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            if len(given) != 1 or not hmac.compare_digest(given[0], self._expected):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"missing or wrong API key"})
                return
        await self._app(scope, receive, send)


class Running:
    """The server on a loopback port, in this event loop, until `stop`."""

    def __init__(self, server: Any, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def start(key: str) -> Running:
    """Serve the demo MCP server on 127.0.0.1 (a free port)."""
    import uvicorn  # noqa: PLC0415  # comes with the mcp SDK; only `keyproxy dev` needs it

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # `keyproxy dev` handles the signals and stops this server itself

    config = uvicorn.Config(build(key), log_level="warning", lifespan="on")
    server = Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    return Running(server, task, sock.getsockname()[1])

"""A real MCP server built with the official `mcp` SDK, for tests and for the demo route.

    python -m tests.mcp.server [--json-response]
                         listen on 127.0.0.1 (a free port), print the port, serve forever

It speaks MCP's Streamable HTTP transport at /mcp (answers as SSE streams, or as JSON with
--json-response) and takes a static API key, as vendor MCP endpoints do: every request must
carry `Authorization: Bearer <MCP_SERVER_KEY>` (from the environment) or gets a 401 and
never reaches the MCP layer. It offers two tools, `search_issues` and `whoami` (which echoes
the key it was called with, to prove a proxy scrubs it), one prompt and two resources.

Every HTTP request it accepts is written to its stderr (the log `running_server` is given) as
one JSON line {"method", "body"}, so a test can prove what reached it and what never did.

It runs as its own process, started and stopped by PID (`running_server`): uvicorn in the
test's own event loop would stall while a test blocks on a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_ENV = "MCP_SERVER_KEY"
ISSUES = {1: "Login fails on Safari", 2: "Crash when the cache is full", 3: "Login page is slow"}


def build(key: str, *, json_response: bool) -> Any:
    """The ASGI app: the key check in front of the SDK's Streamable HTTP app."""
    from mcp.server.fastmcp import FastMCP  # noqa: PLC0415 -- only the server process needs it

    server = FastMCP("issues", json_response=json_response, log_level="WARNING")

    @server.tool()
    def search_issues(query: str) -> list[str]:
        """The titles of the issues whose title contains `query` (case-insensitive)."""
        return [t for t in ISSUES.values() if query.lower() in t.lower()]

    @server.tool()
    def whoami() -> str:
        """Which key the server was called with (it echoes it: a proxy must scrub it)."""
        return f"called with key {key}"

    @server.prompt()
    def summarize(topic: str) -> str:
        """A prompt asking for a summary of `topic`."""
        return f"Summarize the issues about {topic}."

    @server.resource("issues://all")
    def all_issues() -> str:
        """Every issue, one per line."""
        return "\n".join(ISSUES.values())

    @server.resource("issues://{number}")
    def one_issue(number: str) -> str:
        """One issue by number."""
        return ISSUES.get(int(number), "")

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
                await send({"type": "http.response.body", "body": b"bad key"})
                return
            receive = await _logged(scope, receive)
        await self._app(scope, receive, send)


async def _logged(scope: Any, receive: Any) -> Any:
    """Read the request body, write the request to stderr, and replay what was read."""
    received = []
    body = b""
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    session = dict(scope["headers"]).get(b"mcp-session-id", b"").decode()
    line = {"method": scope["method"], "body": body.decode("utf-8", "replace"), "session": session}
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()
    pending = iter(received)

    async def replay() -> Any:
        return next(pending, None) or await receive()

    return replay


def main() -> None:
    import uvicorn  # noqa: PLC0415 -- only the server process needs it

    parser = argparse.ArgumentParser()
    parser.add_argument("--json-response", action="store_true")
    args = parser.parse_args()
    app = build(os.environ[KEY_ENV], json_response=args.json_response)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn has started
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    print(sock.getsockname()[1], flush=True)  # noqa: T201 -- the parent reads the port
    server.run(sockets=[sock])


@dataclass(frozen=True)
class McpServer:
    """A running server: its MCP endpoint and the key it takes."""

    url: str
    key: str


@contextlib.contextmanager
def running_server(key: str, *, json_response: bool = False, log: Path) -> Iterator[McpServer]:
    """The server as its own process on loopback, stopped by its PID when the block ends."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.mcp.server", *(["--json-response"] * json_response)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**os.environ, KEY_ENV: key},
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "the MCP server did not start within 30 s"
            port = int(proc.stdout.readline())
            yield McpServer(f"http://127.0.0.1:{port}/mcp", key)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    main()

"""Real servers for the end-to-end tests: a recording upstream and a proxy on loopback.

Nothing here is a mock: the upstream is an aiohttp server on 127.0.0.1 that records what it
received and can misbehave on request (echo the key back, redirect, stall), and the proxy is
the real application built from a real configuration against a real OpenBao.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import secrets
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from keyproxy import config, demo
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.server import listen as server
from keyproxy.server.app import METRICS, build_admin_app, build_app
from tests.helpers.logscan import CANARIES, FORWARDED


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a server's connection with a reset (RST: SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def free_port() -> int:
    """A port nothing listens on right now, for a server that must be told its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_key() -> str:
    key = "sk-test-" + secrets.token_urlsafe(24)
    CANARIES.add(key)
    return key


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Upstream:
    """The recording, sometimes hostile, upstream."""

    requests: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = demo.build_app()

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.read()
            if "X-Request-Id" in request.headers:
                FORWARDED.append(True)
            self.requests.append(
                Seen(
                    request.method,
                    request.raw_path.partition("?")[0],
                    request.raw_path.partition("?")[2],  # as sent, still percent-encoded
                    CIMultiDict(request.headers),
                    body,
                )
            )
            response: web.StreamResponse = await handler(request)
            return response

        app.middlewares.append(record)
        app[STOPPING] = asyncio.Event()
        app.on_shutdown.append(_stopping)
        app.router.add_route("*", "/echo", _echo)
        app.router.add_get("/leak/header", _leak_header)
        app.router.add_get("/leak/body", _leak_body)
        app.router.add_get("/leak/large", _leak_large)
        app.router.add_get("/leak/gzip", _leak_gzip)
        app.router.add_get("/leak/header-name", _leak_header_name)
        app.router.add_get("/leak/sse", _leak_sse)
        for variant in FRAGMENT_VARIANTS:
            app.router.add_get(f"/leak/fragment-{variant}", _leak_fragment)
        app.router.add_get("/redirect", _redirect)
        app.router.add_get("/stall", _stall)
        app.router.add_get("/stall/short", _stall_midway)
        app.router.add_get("/stall/stream", _stall_midway)
        app.router.add_get("/trickle/short", _trickle)
        app.router.add_get("/trickle/stream", _trickle)
        app.router.add_get("/big", _big)
        app.router.add_get("/leak/reason", _leak_reason)
        app.router.add_get("/leak/url", _leak_url)
        app.router.add_get("/leak/range", _leak_range)
        app.router.add_get("/odd-encoding", _odd_encoding)
        return app


def _received_key(request: web.Request) -> str:
    return request.headers.get("Authorization", "").removeprefix("Bearer ")


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "path": request.raw_path})


async def _leak_header(request: web.Request) -> web.Response:
    key = _received_key(request)
    return web.json_response(
        {"ok": True}, headers={"X-Echo": f"you sent {key}", "Location": f"/x?k={key}"}
    )


async def _leak_body(request: web.Request) -> web.Response:
    return web.json_response(
        {"echo": _received_key(request), "auth": request.headers.get("Authorization")}
    )


async def _leak_gzip(request: web.Request) -> web.Response:
    """Compressed although the proxy asked for identity: the scrubber must see it decoded."""
    body = gzip.compress(json.dumps({"echo": _received_key(request)}).encode())
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def _leak_range(request: web.Request) -> web.Response:
    """The key in a body served in ranges, as a file server serves one: asked for slices
    shorter than the scrubber's fragments, it would hand the key out piece by piece."""
    body = f"key={_received_key(request)};".encode()
    if "Range" not in request.headers:
        return web.Response(body=body, content_type="text/plain")
    part = request.http_range
    first, end = part.start or 0, min(part.stop or len(body), len(body))
    return web.Response(
        status=206,
        body=body[first:end],
        headers={"Content-Range": f"bytes {first}-{end - 1}/{len(body)}"},
        content_type="text/plain",
    )


async def _leak_header_name(request: web.Request) -> web.Response:
    return web.json_response({"ok": True}, headers={f"X-Echo-{_received_key(request)}": "1"})


async def _leak_large(request: web.Request) -> web.Response:
    """A declared-length answer too large to be sent whole, so streamed: the key repeated
    through 200 KiB, at offsets that fall on no fixed read size."""
    key = _received_key(request).encode()
    body = b"".join(b"x" * (40_000 + i) + key for i in range(5))
    return web.Response(body=body, content_type="text/plain")


async def _leak_sse(request: web.Request) -> web.StreamResponse:
    """Streams the key split across two events' worth of writes, each flushed separately."""
    key = _received_key(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    half = len(key) // 2
    for part in (
        f"data: {json.dumps({'n': 1})}\n\n",
        f'data: {{"k": "{key[:half]}',
        f'{key[half:]}"}}\n\n',
        "data: [DONE]\n\n",
    ):
        await response.write(part.encode())
        # Pacing, so each part leaves as its own TCP segment and reaches the proxy alone.
        await asyncio.sleep(0.05)
    await response.write_eof()
    return response


FRAGMENT_VARIANTS = ("short", "stream", "large", "sse")


def fragment_message(key: str) -> str:
    """What an upstream says of a key it refused: its first 8 and last 4 characters (as
    OpenAI's 401 does), and then a middle and the last 8 of it."""
    return (
        f"Incorrect API key provided: {key[:8]}****{key[-4:]}."
        f" Hint: ...{key[12:20]}... ends {key[-8:]}"
    )


async def _leak_fragment(request: web.Request) -> web.StreamResponse:
    """A 401 quoting fragments of the key it received (`fragment_message`), and the same
    middle 8 in a header: of declared length, whole (-short) or too large to be read whole
    (-large), or streamed in pieces that cut each fragment (-stream, and -sse as events)."""
    key = _received_key(request)
    message = fragment_message(key)
    hint = {"X-Key-Hint": f"key ...{key[12:20]}..."}
    variant = request.path.rpartition("-")[2]
    if variant == "short":
        return web.json_response({"error": {"message": message}}, status=401, headers=hint)
    if variant == "large":
        body = b"".join(b"x" * (30_000 + i) + message.encode() for i in range(3))
        return web.Response(body=body, status=401, content_type="text/plain", headers=hint)
    sse = variant == "sse"
    response = web.StreamResponse(
        status=200 if sse else 401,
        headers={"Content-Type": "text/event-stream" if sse else "text/plain", **hint},
    )
    await response.prepare(request)
    text = f"data: {json.dumps({'error': message})}\n\n" if sse else message
    # Cut inside the first fragment, the middle one and the last one.
    cuts = [text.index(key[:8]) + 3, text.index(key[12:20]) + 5, text.index(key[-8:]) + 1]
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        await response.write(text[start:end].encode())
        # Pacing, so each part leaves as its own TCP segment and reaches the proxy alone.
        await asyncio.sleep(0.05)
    await response.write_eof()
    return response


async def _leak_reason(request: web.Request) -> web.Response:
    return web.Response(status=401, reason=f"Invalid key {_received_key(request)}")


async def _leak_url(request: web.Request) -> web.Response:
    """Repeats its own request URL, as pagination links and error messages do."""
    url = str(request.rel_url)
    return web.json_response({"next": url}, headers={"Link": f"<{url}>; rel=next"})


async def _odd_encoding(request: web.Request) -> web.Response:
    return web.Response(
        body=b"\x1f\x9d" + _received_key(request).encode(), headers={"Content-Encoding": "compress"}
    )


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPTemporaryRedirect("http://127.0.0.2:9/steal")


# Set when the upstream stops: a stalled answer then ends, rather than hold its shutdown.
STOPPING = web.AppKey("stopping", asyncio.Event)


async def _stopping(app: web.Application) -> None:
    app[STOPPING].set()


async def _stall_on(request: web.Request) -> None:
    """Longer than the test route's read timeout (10 s), or until the upstream stops."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await request.app[STOPPING].wait()


async def _stall(request: web.Request) -> web.Response:
    # Longer than the test route's read timeout; the proxy must answer 504 first.
    await _stall_on(request)
    return web.json_response({"late": True})


async def _stall_midway(request: web.Request) -> web.StreamResponse:
    """Sends the start of its answer and falls silent for longer than the read timeout: of
    declared length, 10 bytes of 100 (/stall/short), or one event of a stream (/stall/stream)."""
    short = "short" in request.path
    headers = {"Content-Length": "100"} if short else {"Content-Type": "text/event-stream"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    await response.write(b"0123456789" if short else b"data: first\n\n")
    await _stall_on(request)
    return response


TRICKLE_PARTS, TRICKLE_GAP = 5, 0.3  # 1.5 s in all, never silent for the 1 s read timeout


async def _trickle(request: web.Request) -> web.StreamResponse:
    """An answer that takes longer than the read timeout to arrive, part by part: of declared
    length (/trickle/short) or streamed (/trickle/stream)."""
    part = b"data: part\n\n"
    length = {"Content-Length": str(len(part) * TRICKLE_PARTS)} if "short" in request.path else {}
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **length})
    await response.prepare(request)
    for _ in range(TRICKLE_PARTS):
        await response.write(part)
        await asyncio.sleep(TRICKLE_GAP)  # pacing: the gaps the proxy must tolerate
    await response.write_eof()
    return response


BIG_BYTES = 16 * 1024 * 1024


async def _big(request: web.Request) -> web.Response:
    """More than the sockets and buffers between upstream and caller hold."""
    return web.Response(body=b"b" * BIG_BYTES, content_type="application/octet-stream")


class GatedStream:
    """An upstream whose /stream sends one event, then the second only once `gate` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stream", self._stream)
        return app

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await self.gate.wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    # Request bodies are recorded exactly as they arrived (compressed ones too).
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, server.bound_port(site)


@asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    runner, upstream.port = await serve(upstream.app())
    try:
        yield upstream
    finally:
        await runner.cleanup()


@dataclass
class Stack:
    base: str  # http://127.0.0.1:PORT, the agents' listener
    config: config.Config
    app: web.Application
    admin: str = ""  # http://127.0.0.1:PORT, the admin listener (metrics, detailed readiness)


@asynccontextmanager
async def running_proxy(cfg: dict[str, Any]) -> AsyncIterator[Stack]:
    """The real proxy on loopback, with keyproxy's own listeners (server.start): the agents'
    one and the admin one, each on a free port."""
    compiled = config.parse(json.dumps(cfg), {})
    app = build_app(compiled)
    limits = server.Limits.of(compiled.server)
    runner, port = await server.start(app, "127.0.0.1", 0, limits, metrics=lambda: app.get(METRICS))
    try:
        admin, admin_port = await server.start(build_admin_app(app), "127.0.0.1", 0, limits)
        try:
            yield Stack(f"http://127.0.0.1:{port}", compiled, app, f"http://127.0.0.1:{admin_port}")
        finally:
            await admin.cleanup()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------- task tokens

GRANT = {"methods": ["GET", "POST"], "paths": ["/v1/**", "/echo"]}


def token_config(bao: OpenBaoDevServer, agent: Agent, upstream: str) -> dict[str, Any]:
    route = {
        "upstream": upstream,
        "secret": {"path": "keyproxy/keys/tokens-test"},
        "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        "egress": {"allow_cidrs": ["127.0.0.0/8"]},
        "allow_http": True,
    }
    return {
        "vault": bao.vault_yaml(refresh_interval="500ms", max_staleness="60s"),
        "identity": {"issuers": [bao.issuer_yaml("openbao")]},
        "tokens": {
            "max_ttl": "10m",
            "default_ttl": "2m",
            "revocation_poll_interval": "500ms",
            "key_refetch_cooldown": "1s",
        },
        "routes": {"r": route, "other": route},
        "policies": [
            {
                "name": "agent",
                "issuers": ["openbao"],
                "subjects": [agent.entity_id],
                "max_ttl": "5m",
                "allow": {"r": GRANT, "other": {"methods": ["GET"], "paths": ["/echo"]}},
            },
        ],
    }

"""The reference for what aiohttp itself costs: a pass-through proxy that does nothing else.

One shared `ClientSession`, the caller's headers copied minus hop-by-hop and Authorization, the
key injected as `Authorization: Bearer`, the body streamed back chunk by chunk. No identity,
policy, audit or scrubbing: the difference to keyproxy is what those cost.

    python bench/minimal_proxy.py PORT UPSTREAM KEY_FILE     serves /r/bench/<path>
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

PREFIX = "/r/bench"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "content-length",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build(upstream: str, key: str) -> web.Application:
    app = web.Application()
    auth = f"Bearer {key}"

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        tail = request.raw_path[len(PREFIX) :]
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        )
        headers["Authorization"] = auth
        async with app[SESSION].request(
            request.method,
            upstream + tail,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as answer:
            response = web.StreamResponse(
                status=answer.status,
                headers=CIMultiDict(
                    (k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP
                ),
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session)
    app.router.add_route("*", PREFIX + r"/{tail:.*}", forward)
    return app


def main() -> None:
    port, upstream, key_file = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    app = build(upstream, key_file.read_text(encoding="utf-8").strip())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()

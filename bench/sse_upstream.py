"""The streaming part of the benchmark's fixed upstream: server-sent events from aiohttp.

    /sse                 100 events, each written (and flushed) on its own, back to back
    /sse-paced?gap_ms=5  100 events, `gap_ms` apart, each carrying the monotonic clock of its
                         sending, so a client on this machine can tell how late it arrived

The fixed nginx upstream (bench/nginx/upstream.conf) serves the small and large answers itself
and passes /sse* here unbuffered. Usage: python bench/sse_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import web

EVENTS = 100


async def sse(request: web.Request) -> web.StreamResponse:
    gap = float(request.query.get("gap_ms", "0")) / 1000
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for n in range(EVENTS):
        await response.write(f'data: {{"n": {n}, "t": {time.monotonic():.6f}}}\n\n'.encode())
        if gap:
            await asyncio.sleep(gap)
    await response.write_eof()
    return response


def main() -> None:
    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_get("/sse-paced", sse)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()

"""Assemble the aiohttp application for one configuration.

Everything with a lifetime (the Vault client and its token upkeep, the key cache and its
refresh loop, the shared client session for JWKS, the upstream sessions) is created in a
`cleanup_ctx` and torn down with the app: no task outlives it.

    /r/<route>/<path>   the proxy (keyproxy.proxy)
    /healthz            liveness: the process serves requests
    /readyz             readiness: Vault reachable and every route's key loaded and fresh
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web

from keyproxy.config import Config
from keyproxy.identity import IdentityVerifier
from keyproxy.proxy import ROUTE_PREFIX, Proxy, UpstreamSessions
from keyproxy.vault import KeyCache, Vault

CONFIG: Final = web.AppKey("config", Config)
VAULT: Final = web.AppKey("vault", Vault)
KEYS: Final = web.AppKey("keys", KeyCache)
PROXY: Final = web.AppKey("proxy", Proxy)

log = structlog.get_logger("keyproxy.app")


def build_app(config: Config) -> web.Application:
    # Request bodies are forwarded as sent: decompressing them would change what the upstream
    # receives and make max_body count the wrong bytes.
    app = web.Application(handler_args={"max_field_size": 16 * 1024, "auto_decompress": False})
    app[CONFIG] = config
    app.cleanup_ctx.append(_components)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_route("*", ROUTE_PREFIX + r"{tail:[\s\S]*}", _proxy)
    return app


async def _components(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    vault = Vault(config.vault)
    keys = KeyCache(vault, config.routes, config.vault.refresh_interval, config.vault.max_staleness)
    client = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    upstreams = UpstreamSessions(config.routes)
    verifier = IdentityVerifier(config.identity, client)
    app[VAULT], app[KEYS] = vault, keys
    app[PROXY] = Proxy(config, verifier, keys, upstreams)
    tasks: list[asyncio.Task[None]] = []
    try:
        # Start serving even if Vault or an issuer is down: readiness says so, and requests
        # get 503/401 rather than the process crash-looping.
        await _quietly(vault.login(), "vault_login_failed")
        await keys.load_all()
        await verifier.prefetch()
        tasks = [
            asyncio.create_task(vault.maintain_token(), name="vault-token"),
            asyncio.create_task(keys.run(), name="key-refresh"),
        ]
        log.info("started", routes=len(config.routes), keys_ready=keys.ready())
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await upstreams.close()
        await client.close()
        vault.close()


async def _quietly(coro: Coroutine[Any, Any, None], event: str) -> None:
    try:
        await coro
    except Exception as exc:  # noqa: BLE001  # logged and surfaced through readiness
        log.warning(event, error=str(exc))


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    keys = request.app[KEYS]
    vault_ok = await request.app[VAULT].healthy()
    ready = vault_ok and keys.ready()
    body = {"ready": ready, "vault": vault_ok, "keys": keys.status()}
    return web.json_response(body, status=200 if ready else 503)

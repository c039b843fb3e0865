"""An app's TLS listener: its `ServerTLS` kept in the app (`TLS`), its files followed while
the app runs (`serve_tls`), and the admin endpoints' check of their callers' certificates
(`svid_holders_only`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from keyproxy.mtls import svid_identity
from keyproxy.tls import ServerTLS, error_text, peer_chain

log = structlog.get_logger("keyproxy.app")

TLS: Final = web.AppKey("tls", ServerTLS)  # the listener's TLS, when it has one


def serve_tls(app: web.Application, tls: ServerTLS) -> None:
    """Serve `app` with `tls`, its files re-read when their content changes."""
    app[TLS] = tls
    app.cleanup_ctx.append(_following_tls)


async def _following_tls(app: web.Application) -> AsyncIterator[None]:
    """Re-read the listener's certificate, key and trust bundles when their content changes."""
    tls = app[TLS]
    stop = asyncio.Event()

    def failed(exc: Exception) -> None:
        # The running certificate and bundles stay; the next change of a file tries again.
        log.error("tls.reload_failed", error=error_text(exc))

    def reloaded() -> None:
        log.info("tls.reloaded", certificate=str(tls.files.certificate))

    task = asyncio.create_task(tls.follow(failed, stop=stop, on_reload=reloaded), name="tls-watch")
    try:
        yield
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def svid_holders_only(handler: Handler) -> Handler:
    """`handler` for callers whose client certificate is a valid X.509-SVID of the trust
    domain whose bundle verifies it (else 401 with the SVID's reason)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        svid_identity(request.app[TLS], peer_chain(request.transport))
        return await handler(request)

    return checked

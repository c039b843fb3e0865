"""An app's TLS listener: its `ServerTLS` kept in the app (`TLS`), its files followed while
the app runs (`serve_tls`), the site whose handshakes have a deadline (`TLSSite`), and the
admin endpoints' check of their callers' certificates (`svid_holders_only`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

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


class TLSSite(web.TCPSite):
    """aiohttp's TCPSite serving `tls`, whose handshakes must end within `handshake_timeout`
    seconds of connecting.

    SECURITY: keyproxy's header deadline and connection limits (keyproxy.server.listen) see
    a TLS connection only once its handshake is done: until then only this bounds a caller
    that connects and sends nothing (asyncio's own default is 60 s)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        tls: ServerTLS,
        handshake_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=tls.context, **kwargs)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        # TCPSite.start, with the handshake timeout it has no parameter for.
        await web.BaseSite.start(self)  # registers the site with its runner
        assert self._runner.server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._handshake_timeout,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


def svid_holders_only(handler: Handler) -> Handler:
    """`handler` for callers whose client certificate is a valid X.509-SVID of the trust
    domain whose bundle verifies it (else 401 with the SVID's reason)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        svid_identity(request.app[TLS], peer_chain(request.transport))
        return await handler(request)

    return checked

"""Serving: the two listeners, what one connection may cost, and the process's signals.

    serve(config, host, port, ...)   the proxy and admin listeners until SIGTERM or SIGINT
    start(app, host, port, limits)   one listener with keyproxy's connection handling

Every connection is handled by `_Connection`, aiohttp's own request handler with keyproxy's
limits (docs/security.md, "Connection limits"):

- a caller has `server.header_timeout` (10 s) to send a request's headers, from connecting
  or from the first byte of its next request; a connection that has not is closed (on a TLS
  listener the handshake has that long as well, and the headers then theirs). aiohttp's
  keep-alive timeout (`server.keepalive_timeout`, 60 s) closes a connection idle between
  requests;
- at most `server.max_connections` connections are open at once, and at most
  `server.max_connections_per_source` from one address (peers in `server.trusted_proxies`
  are exempt: they carry many callers). A connection over a limit gets a canned 503 and is
  closed before anything of it is read;
- a request aiohttp cannot parse (a malformed header block, a bad request line, a line too
  long) gets a JSON 400 naming nothing it sent, one `request.malformed` event naming only
  the kind of mistake, and is counted in `keyproxy_requests_total{decision="malformed"}`.
  SECURITY: aiohttp's own answer echoes the offending header line back and its log writes
  it out, token included; neither happens here.

Refused and timed-out connections are counted in `keyproxy_connections_closed_total` and
logged at most once a second per reason, so a flood cannot become a log flood.

Signals: SIGTERM and SIGINT drain (in-flight requests and streams get `shutdown_timeout` to
finish), logging how many are in flight when it starts and when it is done. SIGHUP reloads the
configuration file (keyproxy.server.reload); it never kills the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, cast

import structlog
from aiohttp import web, web_protocol
from aiohttp.hdrs import EXPECT
from aiohttp.typedefs import Handler
from aiohttp.web_request import BaseRequest

from keyproxy.addresses import IPAddress
from keyproxy.config import Config, Network
from keyproxy.headers import SERVER_NAME
from keyproxy.metrics import Metrics
from keyproxy.paths import ROUTE_PREFIX
from keyproxy.policy import peer_address
from keyproxy.server.app import (
    CONFIG,
    METRICS,
    PROXY_HANDLER,
    RELOADER,
    SERVED,
    build_admin_app,
    build_app,
)
from keyproxy.server.limits import Guard, Limits
from keyproxy.server.tlsapp import TLS, TLSSite

log = structlog.get_logger("keyproxy.server")

# What aiohttp's server calls with each request it has parsed.
ServerHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

# Sent, unasked, to a connection over a limit: it has not sent a request we could answer yet.
_REFUSED_BODY: Final = b'{"error":{"code":"too_many_connections","message":"too many connections"}}'
_REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: 1\r\n"
    b"Server: keyproxy\r\n"
    b"Connection: close\r\n"
    b"\r\n%s"
) % (len(_REFUSED_BODY), _REFUSED_BODY)


class _Connection(web_protocol.RequestHandler):
    """aiohttp's request handler, with the header deadline, the connection limits and a
    malformed request's answer of this module's docstring."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._source = ""
        # The TCP peer, parsed once for every request of the connection: the proxy reads it
        # by the name policy.PEER.
        self.peer: tuple[IPAddress, str] | None = None
        self._admitted = False
        self._exempt = False  # from the per-source limit, as decided when it connected
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        try:
            self.peer = peer_address(self._source)
        except ValueError:  # not an IP address (a Unix socket)
            self.peer = None
        self._exempt = self._guard.exempt(self.peer[0] if self.peer else None)
        refused = self._guard.admit(self._source, self._exempt)
        if refused is not None:
            # SECURITY: nothing of this connection is read, so nothing of it can cost more.
            assert isinstance(transport, asyncio.Transport)  # TCP listeners only
            transport.write(_REFUSED)
            transport.close()
            self._guard.closed(refused, self._source)
            return
        self._admitted = True
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._headers_arrived()
        else:  # the start of a request, or part of its headers
            self._await_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # refused: aiohttp never knew it
        self._headers_arrived()
        self._guard.release(self._source, self._exempt)
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._header_deadline is None and not self._force_close:
            self._header_deadline = self._loop.call_later(
                self._guard.limits.header_timeout, self._headers_late
            )

    def _headers_arrived(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        self._guard.closed("header_timeout", self._source)
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (400) or whose handler failed
        past every other handler (500): JSON naming nothing the caller sent."""
        if status >= 500:
            # A bug, not a caller's mistake: the traceback goes to the scrubbed log only.
            log.error("request_failed", exc_info=exc)
            code, text = "internal_error", "internal error"
        else:
            self._guard.malformed(self._source, type(exc).__name__ if exc else "", status)
            code, text = "malformed_request", "the request could not be parsed"
        if request.writer.output_size > 0:  # as aiohttp does: the answer has begun
            raise ConnectionError("the answer was sent already")
        response = web.json_response(
            {"error": {"code": code, "message": text}},
            status=status,
            headers={"Server": SERVER_NAME},  # no app hook runs for what was never routed
        )
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's server, making `_Connection`s."""

    def __init__(self, made: web.Server, handler: ServerHandler, guard: Guard) -> None:
        # The handler settings aiohttp gathered (the runner's and the app's handler_args).
        self._handler_kwargs: dict[str, Any] = dict(made._kwargs)
        super().__init__(
            handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **self._handler_kwargs,
        )
        self.guard = guard

    def __call__(self) -> web_protocol.RequestHandler:
        return _Connection(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)

    @property
    def in_flight(self) -> int:
        """Requests being handled right now."""
        return sum(1 for c in self.connections if c._request_in_progress)


class _Runner(web.AppRunner):
    """An AppRunner whose server is `_Server`."""

    def __init__(self, app: web.Application, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        proxy = self.app.get(PROXY_HANDLER)
        routed = made.request_handler
        handler = routed if proxy is None else _direct(routed, proxy)
        return _Server(made, handler, self._guard)


def _direct(routed: ServerHandler, proxy: Handler) -> ServerHandler:
    """`routed` (the app's router), with a path under /r/ handed to `proxy` directly.

    Such a path goes nowhere else, and the router's work (resolving it, the match info, the
    response-prepare signal) is 4% of a proxied request's instructions (docs/performance.md).
    A request with `Expect` still goes through the router, which answers 100-continue.
    """

    async def dispatch(request: BaseRequest) -> web.StreamResponse:
        if request.raw_path.startswith(ROUTE_PREFIX) and EXPECT not in request.headers:
            # The app's request factory made it: a web.Request, without match info.
            return await proxy(cast(web.Request, request))
        return await routed(request)

    return dispatch


def _trusted(app: web.Application) -> Callable[[], tuple[Network, ...]] | None:
    """The trusted proxies of the configuration in force, for the listener of `app` (the
    agents' app, or the admin app of one): a reload that removes a proxy ends its
    exemption from max_connections_per_source with its X-Forwarded-For trust."""
    served = app.get(SERVED, app)
    if CONFIG not in served:
        return None  # not keyproxy's: the limits' own list

    def trusted() -> tuple[Network, ...]:
        reloader = served.get(RELOADER)  # set once the app has started
        config = served[CONFIG] if reloader is None else reloader.current.config
        return config.server.trusted_proxies

    return trusted


async def start(
    app: web.Application,
    host: str,
    port: int,
    limits: Limits,
    *,
    metrics: Callable[[], Metrics | None] = lambda: None,
    reuse_port: bool | None = None,
    shutdown_timeout: float = 60.0,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port) with keyproxy's connection handling, over
    TLS when the app has its listener's (`TLS`); the runner (its `cleanup()` drains and
    stops) and the bound port."""
    guard = Guard(limits, metrics, _trusted(app))
    runner = _Runner(
        app,
        guard,
        access_log=None,  # the audit event is the access log
        # A caller that goes away ends its request at once: otherwise a stream whose upstream
        # is silent would hold its upstream connection and its concurrency slot until the
        # read timeout. The proxy's handler is written to be cancelled (client_disconnected).
        handler_cancellation=True,
        keepalive_timeout=limits.keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        tls = app.get(TLS)
        site = (
            web.TCPSite(runner, host, port, reuse_port=reuse_port)
            if tls is None
            else TLSSite(runner, host, port, tls, limits.header_timeout, reuse_port=reuse_port)
        )
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port(site)


def bound_port(site: web.TCPSite) -> int:
    """The port a site listens on (the one the system chose when 0 was asked for)."""
    server = site._server  # aiohttp keeps the asyncio server here
    assert isinstance(server, asyncio.base_events.Server)  # a TCP site
    return int(server.sockets[0].getsockname()[1])


def in_flight(runner: web.AppRunner) -> int:
    server = runner.server
    return server.in_flight if isinstance(server, _Server) else 0


async def serve(
    config: Config,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    reuse_port: bool = False,
    processes: int = 1,
    on_start: Callable[[], None] = lambda: None,
    source: Path | None = None,
    watch: bool = False,
    supervisor: int | None = None,
) -> None:
    """Run the proxy (host:port) and the admin listener (`server.admin`) until SIGTERM or
    SIGINT, then drain: in-flight requests and streams get `shutdown_timeout` seconds.
    SIGHUP reloads `source`, the file `config` was read from (with `watch`, so does a change
    of its content); a worker of `--workers N` names its `supervisor`'s pid."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hangups = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopping, sig, stop)
    loop.add_signal_handler(signal.SIGHUP, hangups.set)
    # Blocked until now by `keyproxy serve` (keyproxy.cli.serve): one sent while the process
    # started arrives here, a reload, instead of ending it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    on_start()
    app = build_app(config, processes, source=source, watch=watch, supervisor=supervisor)
    limits = Limits.of(config.server)
    admin = config.server.admin
    runner, bound = await start(
        app,
        host,
        port,
        limits,
        metrics=lambda: app.get(METRICS),
        reuse_port=reuse_port or None,
        shutdown_timeout=shutdown_timeout,
    )
    admin_runner: web.AppRunner | None = None
    started: float | None = None
    try:
        # The admin listener's own callers are operators' tools: the same limits serve.
        admin_runner, admin_bound = await start(
            build_admin_app(app), admin.host, admin.port, limits, reuse_port=reuse_port or None
        )
        log.info(
            "serving",
            proxy=f"{host}:{bound}",
            admin=f"{admin.host}:{admin_bound}",
            header_timeout=limits.header_timeout,
            max_connections=limits.max_connections,
        )
        await _until_stopped(stop, hangups, app)
        started = time.monotonic()
        log.info("draining", in_flight=in_flight(runner), timeout=shutdown_timeout)
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()
    if started is not None:
        log.info("stopped", drained_in=round(time.monotonic() - started, 3))


def _stopping(sig: signal.Signals, stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.info("stop_requested", signal=sig.name)
    stop.set()


async def _until_stopped(stop: asyncio.Event, hangups: asyncio.Event, app: web.Application) -> None:
    """Reload on each SIGHUP (several while one runs: one more reload) until `stop` is set.
    A reload still running then is abandoned: it may be waiting on a new issuer or on Vault
    for many seconds, and it applies nothing until its last step."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            hangup = asyncio.ensure_future(hangups.wait())
            await asyncio.wait({stopping, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not hangup.done():
                hangup.cancel()
                break
            hangups.clear()
            log.info("reload_requested", signal="SIGHUP")
            reload = asyncio.ensure_future(app[RELOADER].reload("sighup"))
            await asyncio.wait({stopping, reload}, return_when=asyncio.FIRST_COMPLETED)
            if not reload.done():
                # The reload itself, not only this wait for it: other triggers share it.
                await app[RELOADER].abandon()
                reload.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reload
                log.info("reload_abandoned", reason="stopping")
    finally:
        stopping.cancel()


__all__ = ["Limits", "bound_port", "in_flight", "serve", "start"]

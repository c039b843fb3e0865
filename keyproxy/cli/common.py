"""What every `keyproxy` command shares, so they behave alike (docs/operations.md, "Command
line conventions"):

- `-c FILE`, else the file named by KEYPROXY_CONFIG (`config_path`, `load_config`);
- `-o json|table` (and `--json`, its old spelling) on every command that prints data
  (`add_output`, `print_json`); data goes to stdout, log lines to stderr;
- `--as-operator` on the commands that talk to Vault: log in with the operator's own token
  (BAO_TOKEN, VAULT_TOKEN, then ~/.vault-token) instead of the configuration's vault.auth
  (`add_operator`, `vault_for`);
- route and issuer names checked against the configuration before any Vault call
  (`known_route`, `known_issuer`): a typo is a usage error naming the closest name.

`UsageError` is a mistake on the command line: `keyproxy` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, TextIO

from keyproxy import config
from keyproxy.errors import KeyproxyError
from keyproxy.vault import Vault, operator_config

CONFIG_ENV = "KEYPROXY_CONFIG"
EXIT_USAGE = 2
EXIT_CONFIG = 2  # a configuration that cannot be loaded or served


class UsageError(KeyproxyError):
    """A mistake on the command line (an unknown name, a missing -c): exit 2."""


def add_config(parser: argparse.ArgumentParser, *, help_text: str | None = None) -> None:
    """-c/--config FILE; without it, KEYPROXY_CONFIG names the file (see `config_path`)."""
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=help_text or f"YAML configuration file (default: ${CONFIG_ENV})",
    )


def config_path(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """The file given with -c, else KEYPROXY_CONFIG's; a UsageError when neither is set."""
    given: str | None = getattr(args, "config", None)
    path = given or (os.environ if env is None else env).get(CONFIG_ENV)
    if not path:
        raise UsageError(f"no configuration: give -c FILE or set {CONFIG_ENV}")
    return path


def optional_config(args: argparse.Namespace) -> config.Config | None:
    """The configuration if -c or KEYPROXY_CONFIG names one, else None."""
    if not (getattr(args, "config", None) or os.environ.get(CONFIG_ENV)):
        return None
    return load_config(args)


def load_config(args: argparse.Namespace) -> config.Config:
    path = config_path(args)
    args.config = path  # commands that re-read the file (or pass it on) see the same one
    return config.load(path)


def add_output(parser: argparse.ArgumentParser) -> None:
    """-o/--output json|table (default table), and --json as a synonym of -o json."""
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json for programs",
    )
    parser.add_argument(
        "--json", dest="output", action="store_const", const="json", help="same as -o json"
    )


def wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "table") == "json"


def print_json(value: Any, *, indent: int | None = 2) -> None:
    """Write `value` to stdout as JSON, the data of a command."""
    print(json.dumps(value, indent=indent))  # noqa: T201  # a command's data


def add_operator(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as-operator",
        action="store_true",
        help="log in to Vault with your own token (BAO_TOKEN, VAULT_TOKEN, then "
        "~/.vault-token) instead of the configuration's vault.auth",
    )


def vault_for(args: argparse.Namespace, cfg: config.Config) -> Vault:
    """A Vault client for this command: the configuration's login, or with --as-operator
    the operator's own token (the address, namespace and TLS settings stay the file's)."""
    if getattr(args, "as_operator", False):
        return Vault(operator_config(cfg.vault))
    return Vault(cfg.vault)


def known_route(cfg: config.Config, name: str, label: str = "--route") -> str:
    """`name` if the configuration has that route, else a UsageError naming the closest."""
    return _known(name, cfg.routes, label, "route")


def known_issuer(cfg: config.Config, name: str, *, extra: Iterable[str] = ()) -> str:
    """`name` if it is a configured issuer name (or one of `extra`), else a UsageError."""
    return _known(name, [*(i.name for i in cfg.identity), *extra], "--issuer", "issuer")


def _known(name: str, names: Iterable[str], label: str, what: str) -> str:
    choices = list(names)
    if name in choices:
        return name
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(choices) or "none"
    raise UsageError(f"{label}: unknown {what} {name!r}{hint} (configured {what}s: {listed})")


def usage_failed(exc: UsageError) -> int:
    print(f"keyproxy: {exc}", file=sys.stderr)  # noqa: T201
    return EXIT_USAGE


def input_lines(files: list[str]) -> Iterator[str]:
    """The lines of the named files in turn (none named: stdin), as UTF-8 (a byte that is
    not becomes U+FFFD); a gzip file (a rotated log, told by its first bytes, not its name)
    is read decompressed. A file that cannot be read, or whose compressed data is cut or
    broken, ends the command, naming it. A line of MAX_LINE characters or more is no event:
    it comes as a line that is no JSON (skipped, and counted so), never held whole."""
    if not files:
        stdin = sys.stdin.buffer
        if not isinstance(stdin, io.BufferedReader):  # a stand-in (tests): read as it is
            yield from _bounded(sys.stdin)
            return
        try:
            stream = _text(stdin)
            try:
                yield from _bounded(stream)
            finally:
                stream.detach()  # stdin stays open
        except _UNREADABLE as exc:
            raise SystemExit(_cannot_read("stdin", exc)) from None
        return
    for name in files:
        try:
            with open(name, "rb") as raw, _text(raw) as stream:  # noqa: PTH123
                yield from _bounded(stream)
        except _UNREADABLE as exc:
            raise SystemExit(_cannot_read(name, exc)) from None


# What reading a log raises for one that cannot be read, or whose gzip data is cut or broken.
_UNREADABLE = (OSError, EOFError, zlib.error)


def _cannot_read(name: str, exc: BaseException) -> str:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"keyproxy: cannot read {name}: {why}"


def _text(raw: io.BufferedReader) -> io.TextIOWrapper:
    """`raw` as UTF-8 text, decompressed first if it starts as gzip data does."""
    if raw.peek(2)[:2] == b"\x1f\x8b":
        unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
        return io.TextIOWrapper(unzipped, encoding="utf-8", errors="replace")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def note_skipped(count: int) -> None:
    """Say on stderr that `count` lines of the input were no audit event, when any were: the
    table has no place for it, and an answer from the wrong file (or a compressed one in a
    format not read) must not look like "nobody"."""
    if count:
        print(  # noqa: T201
            f"keyproxy audit: {count} lines skipped: not an audit event as keyproxy writes one",
            file=sys.stderr,
        )


MAX_LINE: Final = 1024 * 1024  # characters: an audit event is a few hundred


def _bounded(stream: TextIO) -> Iterator[str]:
    while line := stream.readline(MAX_LINE):
        if len(line) == MAX_LINE and not line.endswith("\n"):
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith("\n"):
                pass  # the rest of a line too long to be an event
            line = "-\n"  # counted as a skipped line, as any other that is no event
        yield line


__all__ = [
    "CONFIG_ENV",
    "EXIT_USAGE",
    "UsageError",
    "add_config",
    "add_operator",
    "add_output",
    "config_path",
    "input_lines",
    "known_issuer",
    "known_route",
    "load_config",
    "note_skipped",
    "optional_config",
    "print_json",
    "usage_failed",
    "vault_for",
    "wants_json",
]

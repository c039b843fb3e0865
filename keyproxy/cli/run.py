"""`keyproxy run`: run one command with a task token that dies with it (keyproxy.runner).

    keyproxy run --proxy URL (--identity-file F | --identity-env VAR | --identity-command CMD
                 | --github-actions [--audience AUD]) --scope route:METHODS:/path ...
                 [--scope-json JSON] [--task ID] [--intent TEXT] [--ttl 15m] [--idle-ttl 60s]
                 [--timeout 30m] [--kill-after 10s] [--env ROUTE=BASE_VAR,KEY_VAR] -- COMMAND...

Exit status: COMMAND's (128+N when signal N ended it; 127 not found, 126 not runnable); 1 when
no token could be had (nothing is started); 2 for a usage mistake. docs/tokens.md, "keyproxy run".
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import urllib.parse
from typing import Any

from yarl import URL

from keyproxy.cli.common import UsageError
from keyproxy.config import parse_duration
from keyproxy.errors import ConfigError, RunError
from keyproxy.runner import Run, undumpable
from keyproxy.sdkenv import parse_env, parse_scope
from keyproxy.workload import Identity

EPILOG = """examples:
  keyproxy run --proxy https://keyproxy.internal \\
      --identity-file /var/run/secrets/tokens/keyproxy \\
      --scope openai:POST:/v1/chat/completions --task ticket-4711 -- python agent.py
  keyproxy run --github-actions --scope openai:POST:/v1/chat/completions -- pytest -m llm
  keyproxy run --identity-env OPENAI_API_KEY --env demo=OPENAI_BASE_URL,OPENAI_API_KEY \\
      --scope demo:POST:/v1/chat/completions --idle-ttl 60s -- jupyter lab

COMMAND gets, per granted route, OPENAI_BASE_URL/OPENAI_API_KEY (route openai),
ANTHROPIC_BASE_URL/ANTHROPIC_API_KEY (route anthropic), KEYPROXY_<ROUTE>_BASE_URL and
KEYPROXY_<ROUTE>_TOKEN (any other), and KEYPROXY_URL, KEYPROXY_TASK_TOKEN, KEYPROXY_TOKEN_ID;
never the workload identity. The token is revoked when COMMAND ends, with the reason
completed, failed or timeout. Exit status: COMMAND's."""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "run",
        help="run a command with a task token that is revoked when it ends",
        description="Exchange a workload identity for a task token, run COMMAND with it in the\n"
        "environment its SDK reads, and revoke the token when COMMAND ends, however it ends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--proxy",
        default=os.environ.get("KEYPROXY_URL"),
        metavar="URL",
        help="the proxy's base URL, e.g. https://keyproxy.internal (default: $KEYPROXY_URL)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--identity-file", metavar="FILE", help="the workload identity's file")
    source.add_argument("--identity-env", metavar="VAR", help="the variable holding it")
    source.add_argument("--identity-command", metavar="CMD", help="a command printing it")
    source.add_argument(
        "--github-actions",
        action="store_true",
        help="GitHub Actions' OIDC token (the job needs permissions: id-token: write)",
    )
    parser.add_argument(
        "--audience",
        default="keyproxy",
        help="with --github-actions: the token's audience (default keyproxy; '' for GitHub's)",
    )
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="ROUTE:METHODS:/PATH",
        help="what the task may do, repeatable (methods comma-separated; path patterns with * "
        "and **)",
    )
    parser.add_argument(
        "--scope-json",
        metavar="JSON",
        help='more scope as JSON, e.g. an MCP route\'s tools: {"github-mcp": {"tools": [...]}}',
    )
    parser.add_argument("--task", help="the task's id, in every audit event")
    parser.add_argument("--intent", help="why, in words (audited at issuance)")
    parser.add_argument("--ttl", help="the token's lifetime: must cover the task (e.g. 15m)")
    parser.add_argument(
        "--idle-ttl",
        help="a lease: the token dies this long after the last heartbeat (sent every third "
        "of it), e.g. 60s",
    )
    parser.add_argument("--timeout", help="stop COMMAND after this long (SIGTERM), e.g. 30m")
    parser.add_argument(
        "--kill-after",
        default="10s",
        help="then SIGKILL, this long after a SIGTERM (default 10s)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="ROUTE=BASE_VAR,KEY_VAR[,/SUFFIX]",
        help="the variables naming ROUTE's base URL and token (an empty name leaves it unset)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("run: give the command after --")
    if not args.proxy:
        raise UsageError("run: give --proxy URL (or set KEYPROXY_URL)")
    if not args.proxy.startswith(("http://", "https://")):
        raise UsageError(f"run: --proxy {_origin(args.proxy)}: an http:// or https:// URL")
    try:
        url = urllib.parse.urlsplit(args.proxy)
    except ValueError:  # an unclosed [IPv6 address
        raise UsageError("run: --proxy: not a URL") from None
    if "@" in url.netloc:
        # SECURITY: never usable (the identity is the Authorization header, which aiohttp
        # will not combine with a URL's credentials), and every message would quote it.
        raise UsageError(f"run: --proxy {_origin(args.proxy)}: no user or password in the URL")
    if "?" in args.proxy or "#" in args.proxy:
        # /token, the base URLs: each is the proxy URL and more, which would follow a ? or #.
        raise UsageError(f"run: --proxy {_origin(args.proxy)}: a base URL, without ? or #")
    if not _private_hop(args.proxy):
        print(  # noqa: T201  # a person reads it
            f"keyproxy run: warning: --proxy {_origin(args.proxy)} is plain http to another "
            "host: the identity token and the task token cross the network in clear text (use "
            "https:// unless a service mesh encrypts this hop)",
            file=sys.stderr,
        )
    try:
        spec = Run(
            proxy=args.proxy,
            identity=_identity(args),
            command=command,
            body=_body(args),
            overrides=parse_env(args.env),
            timeout=_seconds(args.timeout, "--timeout"),
            kill_after=_seconds(args.kill_after, "--kill-after") or 10.0,
        )
    except RunError as exc:
        raise UsageError(f"run: {exc}") from None
    try:
        undumpable()  # before COMMAND starts: it could read the identity from this process
        return asyncio.run(spec())
    except RunError as exc:
        print(f"keyproxy run: {exc}", file=sys.stderr)  # noqa: T201
        return 1


def _private_hop(proxy: str) -> bool:
    """Whether the tokens sent to `proxy` stay off the network or are encrypted on it:
    https://, or http:// to this host (localhost, a loopback address)."""
    url = urllib.parse.urlsplit(proxy)
    if url.scheme == "https":
        return True
    host = url.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(proxy: str) -> str:
    """The URL as a warning may show it: scheme, host and port (never a password in it)."""
    try:
        return str(URL(proxy).origin())
    except ValueError:
        return "URL"


def _identity(args: argparse.Namespace) -> Identity:
    if args.identity_file:
        return Identity("file", args.identity_file)
    if args.identity_env:
        return Identity("env", args.identity_env)
    if args.identity_command:
        return Identity("command", args.identity_command)
    return Identity("github", args.audience)


def _body(args: argparse.Namespace) -> dict[str, Any]:
    extra = None
    if args.scope_json:
        try:
            extra = json.loads(args.scope_json)
        except ValueError:
            raise RunError("--scope-json: not valid JSON") from None
        if not isinstance(extra, dict):
            raise RunError("--scope-json: a JSON object of route to grant")
    body: dict[str, Any] = {"scope": parse_scope(args.scope, extra)}
    for name in ("task", "intent"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    for name in ("ttl", "idle_ttl"):
        if getattr(args, name):
            _seconds(getattr(args, name), f"--{name.replace('_', '-')}")
            body[name] = getattr(args, name)
    return body


def _seconds(text: str | None, option: str) -> float | None:
    if not text:
        return None
    try:
        return parse_duration(text, option)
    except ConfigError as exc:
        raise RunError(str(exc)) from None

"""`keyproxy` subcommands for keys and rotations (registered by keyproxy.cli).

    keyproxy rotate -c FILE --due              every due route (cron, CronJob, systemd timer)
    keyproxy rotate -c FILE ROUTE [--emergency]
    keyproxy keys put -c FILE ROUTE [--key-id ID]   the key on stdin, never in argv
    keyproxy keys status -c FILE [-o json]     exit 1 when a key is past its max_age
    keyproxy audit [-c FILE] --route ROUTE [--key-version N] [--since T] [--until T] [FILE ...]
    keyproxy audit (--task TASK | --token ID) [--since T] [--until T] [FILE ...]
        everything done under a task or token, sub-agents included (keyproxy.cli.tree)

Vault access comes from the configuration's `vault` section (rotation needs the
keyproxy-rotation policy, vault-dev/policies/keyproxy-rotation.hcl), or with --as-operator
from the operator's own token. Route names are checked against the configuration before
any Vault call. Answers go to stdout (-o json|table; rotate's JSON is one object per line),
log lines to stderr. Exit codes: 0 success, 1 any failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from keyproxy import config, rotation, secret, text
from keyproxy.audit import query as auditlog
from keyproxy.cli import tree
from keyproxy.cli.common import (
    UsageError,
    add_config,
    add_operator,
    add_output,
    input_lines,
    known_route,
    load_config,
    note_skipped,
    optional_config,
    print_json,
    vault_for,
    wants_json,
)
from keyproxy.errors import KeyproxyError
from keyproxy.metrics import write_rotation_textfile
from keyproxy.rotation import Outcome, Rotations
from keyproxy.rotation import status as keystatus
from keyproxy.rotation.state import Result, iso
from keyproxy.upstream import UpstreamSessions


def register(sub: Any) -> None:
    """Add this module's subcommands to the `keyproxy` parser's subparsers."""
    rotate = sub.add_parser("rotate", help="rotate route keys")
    add_config(rotate)
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--due", action="store_true", help="every route that is due")
    which.add_argument("route", nargs="?", help="rotate this route now")
    rotate.add_argument(
        "--emergency", action="store_true", help="leak: revoke the old key at once, no grace"
    )
    add_output(rotate)
    rotate.add_argument(
        "--metrics-file",
        type=Path,
        help="also write this run's results in Prometheus text format (textfile collector)",
    )
    add_operator(rotate)
    rotate.set_defaults(func=_rotate)

    keys = sub.add_parser("keys", help="store and inspect route keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    put = keys_sub.add_parser("put", help="store a new key version (value on stdin)")
    add_config(put)
    put.add_argument("route")
    put.add_argument("--key-id", help="the upstream's id of this key, for revocation")
    add_operator(put)
    add_output(put)
    put.set_defaults(func=_put)
    status = keys_sub.add_parser("status", help="key versions, ages and rotation state")
    add_config(status)
    add_operator(status)
    add_output(status)
    status.set_defaults(func=_status)

    query = sub.add_parser(
        "audit", help="who used a route's key, or what was done under a task, from audit logs"
    )
    query.add_argument("files", nargs="*", help="JSON-lines audit logs (default: stdin)")
    add_config(
        query,
        help_text="configuration whose route names --route must be one of "
        "(default: $KEYPROXY_CONFIG; without either, any name is accepted)",
    )
    query.add_argument("--route", help="who used this route's key (or --task, --token)")
    query.add_argument("--key-version", type=int)
    query.add_argument("--since", type=auditlog.parse_time, help="ISO 8601 time (UTC default)")
    query.add_argument("--until", type=auditlog.parse_time)
    query.add_argument(
        "--calls", action="store_true", help="list an MCP route's calls (tools...) per task"
    )
    query.add_argument(
        "--task",
        help="with --calls: only this task's; without --route: everything done under this "
        "task, sub-agents included, as a delegation tree",
    )
    query.add_argument(
        "--token", help="without --route: everything done under this token id, as a tree"
    )
    add_output(query)
    query.set_defaults(func=_audit)


@contextlib.asynccontextmanager
async def _rotations(args: argparse.Namespace, cfg: config.Config) -> AsyncIterator[Rotations]:
    vault = vault_for(args, cfg)
    sessions = UpstreamSessions(cfg.routes)
    try:
        await vault.login()
        yield Rotations(cfg, vault, sessions)
    finally:
        await sessions.close()
        vault.close()


def _fail(message: str) -> int:
    print(f"keyproxy: {message}", file=sys.stderr)  # noqa: T201
    return 1


def _rotate(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.emergency and args.due:
        return _fail("--emergency needs a ROUTE, not --due")
    if args.route is not None:
        known_route(cfg, args.route, "ROUTE")
    if args.due and not any(r.rotation for r in cfg.routes.values()):
        print(  # noqa: T201
            f"keyproxy rotate: no route in {args.config} has a rotation section; nothing to do",
            file=sys.stderr,
        )

    async def run() -> tuple[list[Outcome], dict[str, str]]:
        async with _rotations(args, cfg) as rotations:
            if args.due:
                outcomes = await rotations.run_due()
            else:
                outcomes = [await rotations.rotate(args.route, emergency=args.emergency)]
            return outcomes, await _next_due(rotations, outcomes)

    try:
        outcomes, next_due = asyncio.run(run())
    except KeyproxyError as exc:
        return _fail(str(exc))
    for o in outcomes:
        detail = o.detail or _waiting(o, next_due)
        if wants_json(args):
            line = {"route": o.route, "result": o.result, "detail": detail, "version": o.version}
            line["next_due"] = next_due.get(o.route)
            print(json.dumps(line))  # noqa: T201
        else:
            version = f" (v{o.version})" if o.version else ""
            print(f"{o.route}: {o.result}{version}{': ' + detail if detail else ''}")  # noqa: T201
    if args.metrics_file is not None:
        write_rotation_textfile(args.metrics_file, [(o.route, o.result) for o in outcomes])
    return 1 if any(o.failed for o in outcomes) else 0


# Results of a route left alone, for which `rotate` says when the key is next due.
_WAITING = frozenset({Result.NOT_DUE, Result.MANUAL, Result.IN_GRACE})


async def _next_due(rotations: Rotations, outcomes: list[Outcome]) -> dict[str, str]:
    """When each route that was left alone is next due (its key's creation plus `every`)."""
    due: dict[str, str] = {}
    for o in outcomes:
        route = rotations.config.routes.get(o.route)
        every = route.rotation.every if route is not None and route.rotation else None
        if route is None or every is None or o.result not in _WAITING:
            continue
        with contextlib.suppress(KeyproxyError):  # a detail: the outcome stands without it
            created = await rotation.key_created(rotations.vault, route)
            if created is not None:
                due[o.route] = str(iso(created + every))
    return due


def _waiting(o: Outcome, next_due: dict[str, str]) -> str:
    """Why a route was left alone, when the outcome itself does not say."""
    when = next_due.get(o.route)
    if when is None:
        return ""
    if o.result is Result.MANUAL:
        return f"next key due {when} (store it with keys put)"
    if o.result is Result.NOT_DUE:
        return f"key not due until {when}"
    return ""


def _put(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    known_route(cfg, args.route, "ROUTE")
    # Read no further than a key can be long (and its line end): anything longer is refused.
    value = sys.stdin.read(secret.MAX_KEY_LENGTH + 3).rstrip("\r\n")

    async def run() -> int:
        async with _rotations(args, cfg) as rotations:
            return await rotations.put(args.route, value, args.key_id)

    try:
        version = asyncio.run(run())
    except KeyproxyError as exc:
        return _fail(str(exc))
    if wants_json(args):
        print_json({"route": args.route, "version": version})
    else:
        print(f"{args.route}: stored version {version}")  # noqa: T201
    return 0


def _status(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run() -> list[keystatus.KeyStatus]:
        vault = vault_for(args, cfg)
        try:
            await vault.login()
            return await keystatus.report(cfg, vault)
        finally:
            vault.close()

    try:
        entries = asyncio.run(run())
    except KeyproxyError as exc:
        return _fail(str(exc))
    if wants_json(args):
        print_json([e.as_dict() for e in entries])
    else:
        for e in entries:
            print(_status_line(e))  # noqa: T201
    return 1 if keystatus.failing(entries) else 0


def _status_line(e: keystatus.KeyStatus) -> str:
    parts = [f"{e.route}: v{e.version}" if e.version else f"{e.route}: no key"]
    if e.age is not None:
        parts.append(f"age {_duration(e.age)}")
    if e.overdue and e.max_age is not None:
        parts.append(f"OVERDUE (max_age {_duration(e.max_age)})")
    for label, value in (
        ("owner", e.owner),
        ("rotator", e.rotator),
        ("next due", e.next_due),
        ("last rotation", e.last_rotation),
        ("in progress", e.in_progress),
        ("old key revoked after", e.grace_until),
        ("error", e.error),
    ):
        if value is not None:
            parts.append(f"{label} {value}")
    if e.last_failure:
        parts.append(f"last failure {e.last_failure.at}: {e.last_failure.error}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _audit(args: argparse.Namespace) -> int:
    if args.route is None:
        if args.calls or (args.task is None and args.token is None):
            raise UsageError("audit: give --route, or --task or --token for a tree")
        return tree.audit(args, input_lines(args.files))
    # An option the query would not use is refused, never quietly dropped.
    if args.token is not None:
        raise UsageError("audit: --token gives a tree, without --route")
    if args.task is not None and not args.calls:
        raise UsageError("audit: --task with --route goes with --calls (or drop --route)")
    cfg = optional_config(args)
    if cfg is not None:
        known_route(cfg, args.route)
    if args.calls:
        return _calls(args)
    routes = _same_key(cfg, args.route) if cfg is not None else [args.route]
    answer = auditlog.query(
        input_lines(args.files), routes, args.key_version, args.since, args.until
    )
    if cfg is None and args.route not in answer.routes:
        seen = ", ".join(sorted(answer.routes)) or "none"
        print(  # noqa: T201
            text.one_line(
                f"keyproxy audit: no request of route {args.route!r} in the input (routes "
                f"seen: {seen}); give -c FILE to have route names checked"
            ),
            file=sys.stderr,
        )
    if wants_json(args):
        print_json(
            {
                "route": args.route,
                "key_version": args.key_version,
                "routes": routes,
                "identities": [u.as_dict() for u in answer.identities],
                "skipped_lines": answer.skipped_lines,
            }
        )
        return 0
    for u in answer.identities:
        tasks = ", ".join(sorted(u.tasks)) or "-"
        versions = ", ".join(str(v) for v in sorted(u.key_versions))
        acting = f", delegated to {', '.join(sorted(u.actors))}" if u.actors else ""
        if len(routes) > 1:
            acting += f", routes {', '.join(sorted(u.routes))}"
        # SECURITY: one line per identity, whatever the log's texts hold (a line end in a
        # subject would print a line of its own making).
        print(  # noqa: T201
            text.one_line(
                f"{u.issuer} {u.subject}: {u.requests} requests, key versions {versions}, "
                f"tasks {tasks}, {u.first} .. {u.last}{acting}"
            )
        )
    note_skipped(answer.skipped_lines)
    return 0


def _same_key(cfg: config.Config, route: str) -> list[str]:
    """`route` and every other route that injects the same key (a field of one secret): a
    leaked version of it was sent by all of them, so each one's requests are in its blast
    radius. Said on stderr when there are others."""
    key = cfg.routes[route].secret
    routes = [name for name, r in cfg.routes.items() if r.secret == key]
    if len(routes) > 1:
        print(  # noqa: T201
            text.one_line(
                f"keyproxy audit: routes {', '.join(routes)} inject the same key "
                f"({key.mount}/{key.path}, field {key.field}): counting the requests of each"
            ),
            file=sys.stderr,
        )
    return routes


def _calls(args: argparse.Namespace) -> int:
    """`keyproxy audit --calls`: an MCP route's calls, per task."""
    found = auditlog.calls(input_lines(args.files), args.route, args.task, args.since, args.until)
    if wants_json(args):
        print_json(
            {
                "route": args.route,
                "tasks": {
                    task: [c.as_dict() for c in calls] for task, calls in sorted(found.items())
                },
            }
        )
        return 0
    for task, calls in sorted(found.items()):
        # One line per call, whatever a caller named (a tool's name is the caller's text).
        print(text.one_line(f"task {task or '-'}: {len(calls)} calls"))  # noqa: T201
        for c in calls:
            print(  # noqa: T201
                text.one_line(
                    f"  {c.timestamp} {c.method} {c.target or '-'} {c.decision} "
                    f"key version {c.key_version} {c.subject or '-'}"
                )
            )
    return 0


__all__ = ["register"]

"""`keyproxy audit`: answers from audit logs (registered by keyproxy.cli).

    keyproxy audit [-c FILE] --route ROUTE [--key-version N | --key-fingerprint FP]
        [--since T] [--until T] [FILE ...]    who used a route's key (keyproxy.audit.query)
    keyproxy audit [-c FILE] --route ROUTE --calls [--task TASK] ...   an MCP route's calls
    keyproxy audit (--task TASK | --token ID) [--since T] [--until T] [FILE ...]
        everything done under a task or token, sub-agents included (keyproxy.cli.tree)

Logs are read from the files (rotated, compressed) or stdin. Answers go to stdout (-o
json|table), notes to stderr. Exit codes: 0 success, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from keyproxy import config, text
from keyproxy.audit import query as auditlog
from keyproxy.cli import tree
from keyproxy.cli.common import (
    UsageError,
    add_config,
    add_output,
    input_lines,
    known_route,
    note_skipped,
    optional_config,
    print_json,
    wants_json,
)


def register(sub: Any) -> None:
    """Add `audit` to the `keyproxy` parser's subparsers."""
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
    key = query.add_mutually_exclusive_group()
    key.add_argument(
        "--key-version",
        type=int,
        help="the key this KV version holds, under whichever version it was served",
    )
    key.add_argument(
        "--key-fingerprint",
        type=_fingerprint,
        help="the key of this fingerprint (keys status, /readyz, key_cache.key_loaded)",
    )
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


def _fingerprint(value: str) -> str:
    """A key fingerprint as keyproxy writes it (keyproxy.secret.fingerprint)."""
    if not auditlog.is_fingerprint(value.lower()):
        raise argparse.ArgumentTypeError("a key fingerprint is 12 hexadecimal digits")
    return value.lower()


def _audit(args: argparse.Namespace) -> int:
    if (args.key_version is not None or args.key_fingerprint) and (
        args.route is None or args.calls
    ):
        raise UsageError("audit: --key-version and --key-fingerprint go with --route alone")
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
    ref = cfg.routes[args.route].secret if cfg is not None else None
    answer = auditlog.query(
        input_lines(args.files),
        routes,
        args.key_version,
        args.since,
        args.until,
        key_fingerprint=args.key_fingerprint,
        secret=(ref.name, ref.field) if ref is not None else None,
    )
    _note_keys(args, answer, configured=cfg is not None)
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
                "key_fingerprint": args.key_fingerprint,
                "key_fingerprints": sorted(answer.key_fingerprints),
                "routes": routes,
                "also_sent_by": sorted(answer.elsewhere),
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


def _note_keys(args: argparse.Namespace, answer: auditlog.Answer, *, configured: bool) -> None:
    """Say on stderr which key a version asked for holds (or that no event names it: only
    its own requests are then counted), and which other routes sent a key counted."""
    notes = []
    if args.key_version is not None and answer.key_fingerprints:
        keys = ", ".join(sorted(answer.key_fingerprints))
        notes.append(
            f"key version {args.key_version} holds key {keys}, counted under every version "
            "that held it"
        )
    elif args.key_version is not None:
        notes.append(
            f"no event of the input names the key of version {args.key_version}: only requests "
            "sent under that version are counted (give -c FILE to read it from the "
            "key_cache.key_loaded events, or ask by --key-fingerprint)"
        )
    if answer.elsewhere:
        why = (
            "another secret holds it"
            if configured
            else "give -c FILE to count the routes of its secret"
        )
        notes.append(
            f"routes {', '.join(sorted(answer.elsewhere))} also sent that key ({why}): not "
            "counted, ask about them by --route"
        )
    for note in notes:  # SECURITY: a log's texts stay inside the note's one line
        print(text.one_line(f"keyproxy audit: {note}"), file=sys.stderr)  # noqa: T201


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

"""`keyproxy` subcommands for keys and rotations (registered by keyproxy.cli).

    keyproxy rotate -c FILE --due              every due route (cron, CronJob, systemd timer)
    keyproxy rotate -c FILE ROUTE [--emergency]
    keyproxy keys put -c FILE ROUTE [--key-id ID]   the key on stdin, never in argv
    keyproxy keys status -c FILE [--json]      exit 1 when a key is past its max_age
    keyproxy audit --route ROUTE [--key-version N] [--since T] [--until T] [FILE ...]

Vault access comes from the configuration's `vault` section; rotation needs the
keyproxy-rotation policy (vault-dev/policies/keyproxy-rotation.hcl). Log events go to stderr,
answers to stdout. Exit codes: 0 success, 1 any failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from keyproxy import audit, auditlog, config, keystatus
from keyproxy.errors import KeyproxyError
from keyproxy.metrics import write_rotation_textfile
from keyproxy.proxy import UpstreamSessions
from keyproxy.rotation import Outcome, Rotations
from keyproxy.vault import Vault


def register(sub: Any) -> None:
    """Add this module's subcommands to the `keyproxy` parser's subparsers."""
    rotate = sub.add_parser("rotate", help="rotate route keys")
    rotate.add_argument("-c", "--config", required=True)
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--due", action="store_true", help="every route that is due")
    which.add_argument("route", nargs="?", help="rotate this route now")
    rotate.add_argument(
        "--emergency", action="store_true", help="leak: revoke the old key at once, no grace"
    )
    rotate.add_argument("--json", action="store_true", help="one JSON object per route")
    rotate.add_argument(
        "--metrics-file",
        type=Path,
        help="also write this run's results in Prometheus text format (textfile collector)",
    )
    rotate.set_defaults(func=_rotate)

    keys = sub.add_parser("keys", help="store and inspect route keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    put = keys_sub.add_parser("put", help="store a new key version (value on stdin)")
    put.add_argument("-c", "--config", required=True)
    put.add_argument("route")
    put.add_argument("--key-id", help="the upstream's id of this key, for revocation")
    put.set_defaults(func=_put)
    status = keys_sub.add_parser("status", help="key versions, ages and rotation state")
    status.add_argument("-c", "--config", required=True)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    query = sub.add_parser("audit", help="who used a route's key, from audit logs")
    query.add_argument("files", nargs="*", help="JSON-lines audit logs (default: stdin)")
    query.add_argument("--route", required=True)
    query.add_argument("--key-version", type=int)
    query.add_argument("--since", type=auditlog.parse_time, help="ISO 8601 time (UTC default)")
    query.add_argument("--until", type=auditlog.parse_time)
    query.add_argument("--json", action="store_true")
    query.set_defaults(func=_audit)


@contextlib.asynccontextmanager
async def _rotations(cfg: config.Config) -> AsyncIterator[Rotations]:
    vault = Vault(cfg.vault)
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
    cfg = config.load(args.config)
    if args.emergency and args.due:
        return _fail("--emergency needs a ROUTE, not --due")
    audit.configure(sys.stderr)

    async def run() -> list[Outcome]:
        async with _rotations(cfg) as rotations:
            if args.due:
                return await rotations.run_due()
            return [await rotations.rotate(args.route, emergency=args.emergency)]

    try:
        outcomes = asyncio.run(run())
    except KeyproxyError as exc:
        return _fail(str(exc))
    for o in outcomes:
        if args.json:
            line = {"route": o.route, "result": o.result, "detail": o.detail, "version": o.version}
            print(json.dumps(line))  # noqa: T201
        else:
            version = f" (v{o.version})" if o.version else ""
            print(f"{o.route}: {o.result}{version}{': ' + o.detail if o.detail else ''}")  # noqa: T201
    if args.metrics_file is not None:
        write_rotation_textfile(args.metrics_file, [(o.route, o.result) for o in outcomes])
    return 1 if any(o.failed for o in outcomes) else 0


def _put(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    value = sys.stdin.read().rstrip("\r\n")
    audit.configure(sys.stderr)

    async def run() -> int:
        async with _rotations(cfg) as rotations:
            return await rotations.put(args.route, value, args.key_id)

    try:
        version = asyncio.run(run())
    except KeyproxyError as exc:
        return _fail(str(exc))
    print(f"{args.route}: stored version {version}")  # noqa: T201
    return 0


def _status(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    audit.configure(sys.stderr)

    async def run() -> list[dict[str, Any]]:
        vault = Vault(cfg.vault)
        try:
            await vault.login()
            return await keystatus.report(cfg, vault)
        finally:
            vault.close()

    try:
        entries = asyncio.run(run())
    except KeyproxyError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(entries, indent=2))  # noqa: T201
    else:
        for e in entries:
            print(_status_line(e))  # noqa: T201
    return 1 if keystatus.failing(entries) else 0


def _status_line(e: dict[str, Any]) -> str:
    parts = [f"{e['route']}: v{e['version']}" if e["version"] else f"{e['route']}: no key"]
    if e["age"] is not None:
        parts.append(f"age {_duration(e['age'])}")
    if e["overdue"]:
        parts.append(f"OVERDUE (max_age {_duration(e['max_age'])})")
    for label, key in (
        ("owner", "owner"),
        ("rotator", "rotator"),
        ("next due", "next_due"),
        ("last rotation", "last_rotation"),
        ("in progress", "in_progress"),
        ("old key revoked after", "grace_until"),
        ("error", "error"),
    ):
        if e[key] is not None:
            parts.append(f"{label} {e[key]}")
    if e["last_failure"]:
        parts.append(f"last failure {e['last_failure']['at']}: {e['last_failure']['error']}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _audit(args: argparse.Namespace) -> int:
    answer = auditlog.query(
        _lines(args.files), args.route, args.key_version, args.since, args.until
    )
    if args.json:
        print(  # noqa: T201
            json.dumps(
                {
                    "route": args.route,
                    "key_version": args.key_version,
                    "identities": [u.as_dict() for u in answer.identities],
                    "skipped_lines": answer.skipped_lines,
                },
                indent=2,
            )
        )
        return 0
    for u in answer.identities:
        tasks = ", ".join(sorted(u.tasks)) or "-"
        versions = ", ".join(str(v) for v in sorted(u.key_versions))
        print(  # noqa: T201
            f"{u.issuer} {u.subject}: {u.requests} requests, key versions {versions}, "
            f"tasks {tasks}, {u.first} .. {u.last}"
        )
    return 0


def _lines(files: list[str]) -> Iterable[str]:
    if not files:
        yield from sys.stdin
        return
    for name in files:
        try:
            with open(name, encoding="utf-8", errors="replace") as stream:  # noqa: PTH123
                yield from stream
        except OSError as exc:
            raise SystemExit(f"keyproxy: cannot read {name}: {exc.strerror}") from None


__all__ = ["register"]

"""`keyproxy` subcommands for keys and rotations (registered by keyproxy.cli).

    keyproxy rotate -c FILE --due              every due route (cron, CronJob, systemd timer)
    keyproxy rotate -c FILE ROUTE [--emergency]
    keyproxy keys put -c FILE ROUTE [--key-id ID]   the key on stdin, never in argv
    keyproxy keys status -c FILE [-o json]     exit 1 when a key is past its max_age
    keyproxy audit ...                          keyproxy.cli.query

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

from keyproxy import config, rotation, secret
from keyproxy.cli.common import (
    UsageError,
    add_config,
    add_operator,
    add_output,
    known_route,
    load_config,
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
    # Read no further than a key can be long (4 bytes a character, and its line end): anything
    # longer is refused. As bytes: a key that is not UTF-8 text is refused here, before Vault.
    read = sys.stdin.buffer.read(4 * secret.MAX_KEY_LENGTH + 3)
    if len(read) > 4 * secret.MAX_KEY_LENGTH + 2:  # cut, maybe in a character: too long
        raise UsageError(f"keys put: the key is longer than {secret.MAX_KEY_LENGTH // 1024} KiB")
    try:
        value = read.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise UsageError("keys put: the key on stdin is not UTF-8 text") from None

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
    if e.fingerprint is not None:
        parts.append(f"key {e.fingerprint}")
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


__all__ = ["register"]

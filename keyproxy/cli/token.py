"""`keyproxy token issue | revoke | list`: operators' side of task tokens.

    keyproxy token issue -c FILE --owner O --reason R --route R [--methods ..] [--paths ..]
                         [--ttl 8h] [--max-uses N] [-o json]
        An exception token for a caller that cannot present a workload identity. Owner and
        reason are required, the TTL is capped by tokens.exception_max_ttl, and every audit
        event of the token names its owner. The token alone goes to stdout (so
        `TOKEN=$(keyproxy token issue ...)` holds exactly it), details to stderr; with
        -o json stdout holds {"token", "token_id", "expires_at", "expires_in", "scope",
        "owner", "reason"}.
    keyproxy token revoke -c FILE (--id ID | --issuer NAME --subject SUB | --task TASK)
    keyproxy token list -c FILE [-o json]       active exception tokens
    keyproxy token list -c FILE --audit LOG... [--task TASK] [-o json]
        the task tokens those audit logs show, as delegation trees, each marked active,
        expired or revoked (keyproxy.cli.tree)

They talk to Vault with the configuration's `vault` section, or with --as-operator the
operator's own token (BAO_TOKEN, VAULT_TOKEN, ~/.vault-token). Route and issuer names are
checked against the configuration before any Vault call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from keyproxy import config, text
from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.cli import tree
from keyproxy.cli.common import (
    add_config,
    add_operator,
    add_output,
    input_lines,
    known_issuer,
    known_route,
    load_config,
    print_json,
    vault_for,
    wants_json,
)
from keyproxy.config import Grant
from keyproxy.errors import ConfigError, KeyproxyError
from keyproxy.state.redis import RedisStore
from keyproxy.tokens import (
    EXCEPTION_ISSUER,
    TaskTokens,
    exception_problem,
    exception_subject,
    exception_subject_named,
)

EXIT_USAGE = 2


def register(sub: Any) -> None:
    """Add `token` and its subcommands to the `keyproxy` parser."""
    token = sub.add_parser("token", help="issue, revoke and list task tokens")
    verbs = token.add_subparsers(dest="verb", required=True)

    issue = verbs.add_parser("issue", help="issue an exception token (owner and reason required)")
    add_config(issue)
    issue.add_argument("--owner", default="", help="who answers for this token")
    issue.add_argument("--reason", default="", help="why no workload identity can be used")
    issue.add_argument("--route", required=True)
    issue.add_argument("--methods", default="GET", help="comma-separated, or *")
    issue.add_argument("--paths", nargs="+", default=["/**"])
    issue.add_argument("--ttl", default="1h", help="capped by tokens.exception_max_ttl")
    issue.add_argument("--max-uses", type=int)
    add_operator(issue)
    add_output(issue)
    issue.set_defaults(func=_issue)

    revoke = verbs.add_parser("revoke", help="revoke by token id, subject or task")
    add_config(revoke)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="a token id (jti)")
    which.add_argument(
        "--subject",
        help="every token of this subject so far (with --issuer; for exception tokens: "
        "--issuer exception --subject OWNER)",
    )
    which.add_argument("--task", help="every token of this task")
    revoke.add_argument("--issuer", help="issuer name, with --subject")
    add_operator(revoke)
    add_output(revoke)
    revoke.set_defaults(func=_revoke)

    listing = verbs.add_parser(
        "list", help="active exception tokens, or (--audit) the delegation trees logs show"
    )
    add_config(listing)
    listing.add_argument(
        "--audit", nargs="+", metavar="LOG", help="task tokens these audit logs show, as trees"
    )
    listing.add_argument("--task", help="with --audit: this task's tokens only")
    add_operator(listing)
    add_output(listing)
    listing.set_defaults(func=_list)


def _usage(message: str) -> int:
    print(f"keyproxy token: {message}", file=sys.stderr)  # noqa: T201
    return EXIT_USAGE


def _run(args: argparse.Namespace, cfg: config.Config, work: Any) -> int:
    async def session() -> int:
        vault = vault_for(args, cfg)
        store = None
        try:
            # The shared store, when configured: heartbeat leases live there (a revoked
            # token's ends with it, and a token issued with idle_ttl starts one).
            store = _store(cfg)
            await vault.login()
            result: int = await work(cfg, TaskTokens(cfg, vault, store=store))
            return result
        finally:
            if store is not None:
                await store.close()
            vault.close()

    try:
        return asyncio.run(session())
    except KeyproxyError as exc:
        if isinstance(exc, ConfigError):
            raise
        print(f"keyproxy token: {exc}", file=sys.stderr)  # noqa: T201
        return 1


def _store(cfg: config.Config) -> RedisStore | None:
    """The configured state store, or None: also when it cannot be set up here (its password
    file is not on this machine, say), so that a revocation is still recorded in Vault."""
    if cfg.state is None:
        return None
    try:
        return RedisStore(cfg.state)
    except (OSError, ValueError) as exc:
        print(  # noqa: T201
            f"keyproxy token: not using the state store ({type(exc).__name__}): "
            "a revoked token's heartbeat lease runs out on its own",
            file=sys.stderr,
        )
        return None


def _issue(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    known_route(cfg, args.route)
    problem = exception_problem(args.owner, args.reason)
    if problem is not None:
        return _usage(problem)
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        requested = scopes.parse(
            {args.route: {"methods": methods, "paths": args.paths}}, list(cfg.routes)
        )
        ttl = config.parse_duration(args.ttl, "--ttl")
    except (ValueError, ConfigError) as exc:
        return _usage(str(exc))
    if args.max_uses is not None and args.max_uses <= 0:
        return _usage("--max-uses must be positive")

    async def work(cfg: config.Config, tasks: TaskTokens) -> int:
        capped = min(ttl, cfg.tokens.exception_max_ttl)
        identity = Identity(EXCEPTION_ISSUER, exception_subject(args.owner), {})
        grant: dict[str, tuple[Grant, ...]] = dict(requested)
        issued = await tasks.issue(
            identity,
            grant,
            ttl=capped,
            intent=args.reason,
            max_uses=args.max_uses,
            exception=(args.owner, args.reason),
        )
        note = f" (capped from {ttl:.0f}s by exception_max_ttl)" if capped < ttl else ""
        print(  # noqa: T201
            f"exception token {issued.token_id} for {args.owner}: {scopes.describe(grant)}, "
            f"expires in {capped:.0f}s{note}",
            file=sys.stderr,
        )
        if wants_json(args):
            print_json(
                {
                    "token": issued.token,
                    "token_id": issued.token_id,
                    "expires_at": issued.expires_at,
                    "expires_in": round(capped),
                    "scope": scopes.describe(grant),
                    "owner": args.owner,
                    "reason": args.reason,
                }
            )
        else:
            print(issued.token)  # noqa: T201  # the product of this command, for the operator
        return 0

    return _run(args, cfg, work)


def _revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if "" in (args.id, args.subject, args.task, args.issuer):  # `--task=`: it names no token
        return _usage("--id, --subject, --task and --issuer need a value")
    if args.subject is not None and not args.issuer:
        return _usage("--subject needs --issuer (the configured issuer name, or 'exception')")
    if args.issuer is not None:
        known_issuer(cfg, args.issuer, extra=[EXCEPTION_ISSUER])

    async def work(_: config.Config, tasks: TaskTokens) -> int:
        subject = None
        if args.subject is not None:
            name = args.subject
            if args.issuer == EXCEPTION_ISSUER:
                # --subject OWNER, as `token list` names it, or the subject the audit log
                # shows (`exception:OWNER`).
                name = exception_subject_named(name)
            subject = f"{args.issuer}|{name}"
        await tasks.revoke(token_id=args.id, subject=subject, task=args.task)
        if wants_json(args):
            print_json({"revoked": {"id": args.id, "subject": subject, "task": args.task}})
        else:
            print("revoked", file=sys.stderr)  # noqa: T201
        return 0

    return _run(args, cfg, work)


def _list(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    if args.audit:

        async def trees(_: config.Config, tasks: TaskTokens) -> int:
            return tree.token_list(args, input_lines(args.audit), await tasks.revocation_list())

        return _run(args, cfg, trees)

    async def work(_: config.Config, tasks: TaskTokens) -> int:
        active = await tasks.exceptions()
        if wants_json(args):
            print_json(active)
            return 0
        now = time.time()
        for entry in active:
            left = int(entry["expires_at"] - now)
            print(  # noqa: T201
                text.one_line(  # one line a token, whatever its owner's name holds
                    f"{entry['token_id']}  owner={entry['owner']}  expires_in={left}s  "
                    f"reason={entry['reason']!r}"
                )
            )
        if not active:
            print("no active exception tokens", file=sys.stderr)  # noqa: T201
        return 0

    return _run(args, cfg, work)

"""Delegation trees on the command line, from audit logs (keyproxy.audit.query.tree).

    keyproxy audit [FILES] --task TASK | --token ID [--since T] [--until T] [-o json]
        everything done under a task (or a token), sub-agents included: the tokens as a
        tree, each with its requests and how it ended; -o json adds every event in scope
    keyproxy token list -c FILE --audit FILES [--task TASK] [-o json]
        the task tokens the logs show, as trees, each marked active, expired or revoked by
        the revocation list in Vault now

A tree holds what the given logs show: pass every replica's log for the whole picture.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from keyproxy import text
from keyproxy.audit import query as auditlog
from keyproxy.audit import tree as audittree
from keyproxy.audit.tree import TokenNode
from keyproxy.cli.common import note_skipped, print_json, wants_json
from keyproxy.tokens import Revocations


def audit(args: argparse.Namespace, lines: Iterable[str]) -> int:
    """`keyproxy audit --task | --token`: the tree under it, and its events."""
    as_json = wants_json(args)  # the table shows no events: they are not kept
    found = audittree.tree(
        lines, args.task, args.token, args.since, args.until, keep_events=as_json
    )
    if as_json:
        print_json(
            {
                "task": args.task,
                "token": args.token,
                "tokens": [root.as_dict() for root in found.roots],
                "events": found.events,
                "skipped_lines": found.skipped_lines,
            }
        )
        return 0
    for line in render(found.roots, _ended):
        print(line)  # noqa: T201
    if not found.roots:
        print("no task token in the input matches", file=sys.stderr)  # noqa: T201
    note_skipped(found.skipped_lines)
    return 0


def token_list(args: argparse.Namespace, lines: Iterable[str], revocations: Revocations) -> int:
    """`keyproxy token list --audit`: the tokens the logs show, with their state now."""
    found = audittree.tree(lines, args.task, None)
    now = time.time()

    def state(node: TokenNode, ancestors: tuple[TokenNode, ...]) -> str:
        # Unknown issue time: only a revocation of its id can be told.
        issued_at = auditlog.parse_time(node.issued).timestamp() if node.issued else math.inf
        if revocations.names(node.token_id, node.subject or "", node.task, issued_at):
            return "revoked" + (f" ({node.ended})" if node.ended else "")
        if any(a.token_id in revocations.ids for a in ancestors):
            return "revoked (parent_revoked)"
        # As the proxy refuses it (tokens.revocation.Revocations.any_actor): an identity that
        # acted in its chain was revoked as a subject at or after it was issued.
        if any(revocations.covers_subject(actor, issued_at) for actor in node.actors):
            return "revoked (actor_revoked)"
        if node.expires_at is not None and node.expires_at <= now:
            return "expired"
        return "active" if node.expires_at is not None else "unknown expiry"

    if wants_json(args):
        print_json([_with_state(root, (), state) for root in found.roots])
        return 0
    for line in render(found.roots, state):
        print(line)  # noqa: T201
    return 0


def _with_state(
    node: TokenNode,
    ancestors: tuple[TokenNode, ...],
    state: Callable[[TokenNode, tuple[TokenNode, ...]], str],
) -> dict[str, Any]:
    below = (*ancestors, node)
    return node.as_dict() | {
        "state": state(node, ancestors),
        "children": [_with_state(child, below, state) for child in node.children],
    }


def _ended(node: TokenNode, ancestors: tuple[TokenNode, ...]) -> str:
    if node.ended is not None:
        return f"ended: {node.ended}"
    if any(a.ended is not None for a in ancestors):
        return "ended: parent_revoked"
    return ""


def render(
    roots: list[TokenNode], note: Callable[[TokenNode, tuple[TokenNode, ...]], str]
) -> list[str]:
    """The trees as indented lines, one token a line, with `note`'s word on each."""
    out: list[str] = []

    def walk(node: TokenNode, ancestors: tuple[TokenNode, ...], prefix: str, last: bool) -> None:
        branch = "" if not ancestors else ("└─ " if last else "├─ ")
        who = f"acting {node.actor}" if node.actor else (node.subject or "-")
        parts = [f"{prefix}{branch}{node.token_id}", who]
        if not ancestors:
            parts.append(f"task {node.task or '-'}")
            if node.parent is not None:  # delegated, its parent not above it (keyproxy.audit)
                parts.append(f"parent {node.parent}")
        parts.append(f"{node.requests} requests ({node.refused} refused)")
        if node.routes:
            parts.append("routes " + ",".join(sorted(node.routes)))
        said = note(node, ancestors)
        if said:
            parts.append(said)
        out.append(text.one_line("  ".join(parts)))  # one line, whatever the log's texts hold
        inner = prefix + ("" if not ancestors else ("   " if last else "│  "))
        for i, child in enumerate(node.children):
            walk(child, (*ancestors, node), inner, i == len(node.children) - 1)

    for root in roots:
        walk(root, (), "", True)
    return out

"""Everything done under a task or a token, from audit logs (`keyproxy audit --task/--token`).

`tree` answers "everything done under task X (or token T), including sub-agents": the task
tokens the logs show (issued, used, ended) as delegation trees, each with its requests and
how it ended, and every event in scope. A delegated token's events name its `chain` (token
ids from the root), so a token seen only in another replica's log still finds its place.
Lines are read as `keyproxy.audit.query` reads them. Pure: no I/O of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keyproxy.audit.query import event_time, read_event
from keyproxy.config import MAX_DELEGATION_DEPTH


@dataclass
class TokenNode:
    """One task token as the logs show it, with the tokens delegated from it."""

    token_id: str
    parent: str | None = None
    task: str | None = None
    subject: str | None = None  # "issuer|subject": on whose authority
    # Who acted at each delegation from the root to it ("issuer|subject"), as its events say.
    actors: tuple[str, ...] = ()
    issued: str = ""  # the token.issued event's time ("" if not in the logs)
    expires_at: float | None = None
    ended: str | None = None  # the end reason of its token.revoked event
    requests: int = 0
    refused: int = 0
    routes: set[str] = field(default_factory=set)
    children: list[TokenNode] = field(default_factory=list)

    @property
    def actor(self) -> str | None:
        """Who acts with it ("issuer|subject"), if it was delegated."""
        return self.actors[-1] if self.actors else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "parent": self.parent,
            "task": self.task,
            "subject": self.subject,
            "actor": self.actor,
            "issued": self.issued,
            "expires_at": self.expires_at,
            "ended": self.ended,
            "requests": self.requests,
            "refused": self.refused,
            "routes": sorted(self.routes),
            "children": [child.as_dict() for child in self.children],
        }


@dataclass
class Tree:
    roots: list[TokenNode]
    events: list[dict[str, Any]]  # every event in scope, in log order (if kept)
    skipped_lines: int


_TREE_EVENTS = frozenset({"request", "mcp.call", "token.issued", "token.revoked"})


def tree(
    lines: Iterable[str],
    task: str | None = None,
    token: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    keep_events: bool = False,
) -> Tree:
    """The tokens and events of `task`, or under `token` (it and every token delegated from
    it), between `since` and `until`; every task token the logs show when neither is given.
    The events themselves only with `keep_events`: without, memory grows with the tokens,
    not with the length of the logs."""
    nodes: dict[str, TokenNode] = {}
    events: list[dict[str, Any]] = []
    skipped = 0
    for line in lines:
        event = read_event(line, None)
        if event is None:
            skipped += bool(line.strip())
            continue
        if event.get("event") not in _TREE_EVENTS or not _in_scope(event, task, token):
            continue
        at = event_time(event.get("timestamp"))
        if at is None:  # as in `keyproxy.audit.query.query`
            skipped += 1
            continue
        if (since and at < since) or (until and at > until):
            continue
        if keep_events:
            events.append(event)
        _note(nodes, event)
    return Tree(_linked(nodes), events, skipped)


def _linked(nodes: dict[str, TokenNode]) -> list[TokenNode]:
    """The roots, each token among its parent's children when its parents lead to a root
    within MAX_DELEGATION_DEPTH delegations. Any other (its parent not in the logs, a cycle,
    a chain deeper than keyproxy delegates: merged or tampered logs) is a root of its own,
    its `parent` kept: no token is hidden, and no tree is deeper than keyproxy makes them."""
    roots: list[TokenNode] = []
    for node in nodes.values():
        top = node
        for _ in range(MAX_DELEGATION_DEPTH + 1):
            parent = nodes.get(top.parent) if top.parent is not None else None
            if parent is None:
                break
            top = parent
        else:  # no root within reach
            top = node
        if top is node:
            roots.append(node)
        else:
            assert node.parent is not None  # it has a parent above it
            nodes[node.parent].children.append(node)
    return roots


def _chain(event: dict[str, Any]) -> list[str]:
    chain = event.get("chain")
    return chain.split(",") if isinstance(chain, str) and chain else []


def _in_scope(event: dict[str, Any], task: str | None, token: str | None) -> bool:
    if task is not None and event.get("task") != task:
        return False
    return token is None or event.get("token_id") == token or token in _chain(event)


def _note(nodes: dict[str, TokenNode], event: dict[str, Any]) -> None:
    """What one event says about the tokens it names."""
    token_id = event.get("token_id")
    if not isinstance(token_id, str) or event.get("issuer") == "exception":
        return
    kind = event["event"]
    chain = _chain(event)
    for parent, child in itertools.pairwise(chain):
        nodes.setdefault(child, TokenNode(child)).parent = parent
        nodes.setdefault(parent, TokenNode(parent))
    node = nodes.setdefault(token_id, TokenNode(token_id))
    if isinstance(event.get("task"), str):
        node.task = event["task"]
    if isinstance(event.get("issuer"), str) and isinstance(event.get("subject"), str):
        node.subject = f"{event['issuer']}|{event['subject']}"
    actors = event.get("actors")
    if isinstance(actors, str) and actors:
        node.actors = tuple(actors.split(","))
    if kind == "token.issued":
        node.issued = str(event.get("timestamp", ""))
        if type(event.get("expires_at")) in {int, float}:  # true is no time
            node.expires_at = float(event["expires_at"])
        if isinstance(event.get("parent_token_id"), str):
            node.parent = event["parent_token_id"]
    elif kind == "token.revoked" and isinstance(event.get("reason"), str):
        node.ended = event["reason"]
    elif kind == "request":
        node.requests += 1
        node.refused += event.get("decision") != "allow"
        if isinstance(event.get("route"), str):
            node.routes.add(event["route"])

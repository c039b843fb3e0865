"""Answer questions from audit logs: who used a route's key, which version, and when.

Reads the JSON lines keyproxy writes (keyproxy.audit: one `request` event per request) and
keeps the events in which a key was injected (those carry `key_version`). The answer for a
leaked key is its blast radius: every identity (issuer and subject) that used it, with its
tasks, token ids, request count and first and last use, and the sub-agents that used it with
tokens delegated from that identity's (a delegated token's events name its root identity).
Lines that are not audit events are skipped and counted, so a log mixed with other output
still works; so are lines keyproxy would not write (a member twice, NaN: keyproxy.strictjson).
Pure: no I/O of its own.

`calls` reads the `mcp.call` events of an MCP route instead: every JSON-RPC request, by task,
with the tool (or prompt, resource, method) it named, whether it was allowed, and the key
version.

`tree` answers "everything done under task X (or token T), including sub-agents": the task
tokens the logs show (issued, used, ended) as delegation trees, each with its requests and
how it ended, and every event in scope. A delegated token's events name its `chain` (token
ids from the root), so a token seen only in another replica's log still finds its place.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keyproxy import strictjson
from keyproxy.config import MAX_DELEGATION_DEPTH


@dataclass
class Usage:
    """One identity's use of the route within the query."""

    issuer: str | None
    subject: str | None
    requests: int = 0
    first: str = ""
    last: str = ""
    tasks: set[str] = field(default_factory=set)
    token_ids: set[str] = field(default_factory=set)
    key_versions: set[int] = field(default_factory=set)
    # Who sent its requests with tokens delegated from its own ("issuer|subject"): policy
    # decides for the root identity, and the event names it, but these workloads held the
    # tokens and had the answers.
    actors: set[str] = field(default_factory=set)
    routes: set[str] = field(default_factory=set)  # which of the routes asked about

    def count(self, event: dict[str, Any], at: datetime) -> None:
        """Count one request `event` of this identity, at `at` (its `timestamp`)."""
        self.requests += 1
        if not self.first or at < parse_time(self.first):
            self.first = str(event["timestamp"])
        if not self.last or at > parse_time(self.last):
            self.last = str(event["timestamp"])
        self.key_versions.add(event["key_version"])
        self.routes.add(event["route"])
        if isinstance(event.get("task"), str):
            self.tasks.add(event["task"])
        if isinstance(event.get("token_id"), str):
            self.token_ids.add(event["token_id"])
        if isinstance(event.get("actors"), str) and event["actors"]:
            self.actors.add(event["actors"].split(",")[-1])  # who acted with the token used

    def as_dict(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "requests": self.requests,
            "first": self.first,
            "last": self.last,
            "tasks": sorted(self.tasks),
            "token_ids": sorted(self.token_ids),
            "key_versions": sorted(self.key_versions),
            "actors": sorted(self.actors),
            "routes": sorted(self.routes),
        }


@dataclass
class Answer:
    identities: list[Usage]
    skipped_lines: int
    routes: set[str] = field(default_factory=set)  # every route a request event named


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC. Raises ValueError."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def query(
    lines: Iterable[str],
    route: str | Collection[str],
    key_version: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Answer:
    """Who used `route`'s key (and `key_version`, if given) between `since` and `until`; a
    collection of routes for routes that inject the same key (one version of it is one key,
    whichever route sent it)."""
    wanted = {route} if isinstance(route, str) else set(route)
    usages: dict[tuple[str | None, str | None], Usage] = {}
    skipped = 0
    routes: set[str] = set()
    for line in lines:
        event = _event(line)
        if event is None:
            skipped += bool(line.strip())
            continue
        if isinstance(event.get("route"), str):
            routes.add(event["route"])
        version = event.get("key_version")
        # type, not isinstance: JSON's true is no key version, though Python's bool is an int
        if event.get("route") not in wanted or type(version) is not int:
            continue
        if key_version is not None and version != key_version:
            continue
        at = _time(event.get("timestamp"))
        if at is None:  # every event keyproxy writes has its time: this is no such event
            skipped += 1
            continue
        if (since and at < since) or (until and at > until):
            continue
        who = (event.get("issuer"), event.get("subject"))
        if not all(w is None or isinstance(w, str) for w in who):
            skipped += 1  # no event keyproxy writes: its identity is text or null
            continue
        usages.setdefault(who, Usage(*who)).count(event, at)
    ordered = sorted(usages.values(), key=lambda u: (u.issuer or "", u.subject or ""))
    return Answer(ordered, skipped, routes)


@dataclass(frozen=True)
class ToolCall:
    """One JSON-RPC request on an MCP route, as its `mcp.call` event named it."""

    timestamp: str
    method: str
    target: str  # the tool, prompt or resource URI named ("" for other methods)
    decision: str
    key_version: int | None
    subject: str | None
    token_id: str | None
    session: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "method": self.method,
            "target": self.target,
            "decision": self.decision,
            "key_version": self.key_version,
            "subject": self.subject,
            "token_id": self.token_id,
            "session": self.session,
        }


def calls(
    lines: Iterable[str],
    route: str,
    task: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, list[ToolCall]]:
    """The MCP calls on `route` by task ("" for calls without one), in log order; only
    `task`'s when given."""
    found: dict[str, list[ToolCall]] = {}
    for line in lines:
        event = _event(line, "mcp.call")
        if event is None or event.get("route") != route:
            continue
        at = _time(event.get("timestamp"))
        if at is None or (since and at < since) or (until and at > until):
            continue
        name = event.get("task") if isinstance(event.get("task"), str) else ""
        if task is not None and name != task:
            continue
        target = next(
            (event[k] for k in ("mcp_tool", "mcp_prompt", "mcp_resource") if k in event), ""
        )
        version = event.get("key_version")
        found.setdefault(str(name), []).append(
            ToolCall(
                timestamp=str(event["timestamp"]),
                method=str(event.get("mcp_method", "")),
                target=str(target),
                decision=str(event.get("decision", "")),
                key_version=version if type(version) is int else None,
                subject=event.get("subject") if isinstance(event.get("subject"), str) else None,
                token_id=event.get("token_id") if isinstance(event.get("token_id"), str) else None,
                session=str(event.get("mcp_session") or ""),
            )
        )
    return found


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
        event = _event(line, None)
        if event is None:
            skipped += bool(line.strip())
            continue
        if event.get("event") not in _TREE_EVENTS or not _in_scope(event, task, token):
            continue
        at = _time(event.get("timestamp"))
        if at is None:  # as in `query`
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


def _time(value: Any) -> datetime | None:
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _event(line: str, kind: str | None = "request") -> dict[str, Any] | None:
    """The event of a JSON line (of `kind`, unless None). Read strictly: keyproxy never
    writes a member twice, NaN or Infinity, so a line with one is not its event (and Python's
    reading of it, the last of two values, is a guess)."""
    try:
        value = strictjson.loads_text(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or (kind is not None and value.get("event") != kind):
        return None
    if kind is None and not isinstance(value.get("event"), str):
        return None
    return value


__all__ = [
    "Answer",
    "TokenNode",
    "ToolCall",
    "Tree",
    "Usage",
    "calls",
    "parse_time",
    "query",
    "tree",
]

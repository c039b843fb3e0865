"""Answer questions from audit logs: who used a route's key, which version, and when.

Reads the JSON lines keyproxy writes (keyproxy.audit: one `request` event per request) and
keeps the events in which a key was injected (those carry `key_version`). The answer for a
leaked key is its blast radius: every identity (issuer and subject) that used it, with its
tasks, token ids, request count and first and last use. Lines that are not audit events are
skipped and counted, so a log mixed with other output still works. Pure: no I/O of its own.

`calls` reads the `mcp.call` events of an MCP route instead: every JSON-RPC request, by task,
with the tool (or prompt, resource, method) it named, whether it was allowed, and the key
version.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


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
    route: str,
    key_version: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Answer:
    """Who used `route` (and `key_version`, if given) between `since` and `until`."""
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
        if event.get("route") != route or not isinstance(version, int):
            continue
        if key_version is not None and version != key_version:
            continue
        stamp = event.get("timestamp")
        at = _time(stamp)
        if at is None or (since and at < since) or (until and at > until):
            continue
        who = (event.get("issuer"), event.get("subject"))
        usage = usages.setdefault(who, Usage(*who))
        usage.requests += 1
        if not usage.first or at < parse_time(usage.first):
            usage.first = str(stamp)
        if not usage.last or at > parse_time(usage.last):
            usage.last = str(stamp)
        usage.key_versions.add(version)
        if isinstance(event.get("task"), str):
            usage.tasks.add(event["task"])
        if isinstance(event.get("token_id"), str):
            usage.token_ids.add(event["token_id"])
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
                key_version=version if isinstance(version, int) else None,
                subject=event.get("subject") if isinstance(event.get("subject"), str) else None,
                token_id=event.get("token_id") if isinstance(event.get("token_id"), str) else None,
                session=str(event.get("mcp_session") or ""),
            )
        )
    return found


def _time(value: Any) -> datetime | None:
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _event(line: str, kind: str = "request") -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("event") != kind:
        return None
    return value


__all__ = ["Answer", "ToolCall", "Usage", "calls", "parse_time", "query"]

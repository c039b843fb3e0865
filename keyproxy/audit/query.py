"""Answer questions from audit logs: who used a route's key, which version, and when.

Reads the JSON lines keyproxy writes (keyproxy.audit: one `request` event per request) and
keeps the events in which a key was injected (those carry `key_version`, and from this
build on `key_fingerprint`). The answer for a leaked key is its blast radius: every identity
(issuer and subject) that used it, with its tasks, token ids, request count and first and
last use, and the sub-agents that used it with tokens delegated from that identity's (a
delegated token's events name its root identity). A key is known by its fingerprint: one
key stored again under another version (`kv rollback`) is still one key, and asking for a
version counts every event of the keys that version held.
Lines that are not audit events are skipped and counted, so a log mixed with other output
still works; so are lines keyproxy would not write (a member twice, NaN: keyproxy.strictjson).
Pure: no I/O of its own.

`calls` reads the `mcp.call` events of an MCP route instead: every JSON-RPC request, by task,
with the tool (or prompt, resource, method) it named, whether it was allowed, and the key
version.

`keyproxy.audit.tree` answers from the same lines what was done under a task or token.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

from keyproxy import strictjson


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
    key_fingerprints: set[str] = field(default_factory=set)
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
        if isinstance(event.get("key_fingerprint"), str):
            self.key_fingerprints.add(event["key_fingerprint"])
        self.routes.add(event["route"])
        if isinstance(event.get("task"), str):
            self.tasks.add(event["task"])
        if isinstance(event.get("token_id"), str):
            self.token_ids.add(event["token_id"])
        if isinstance(event.get("actors"), str) and event["actors"]:
            self.actors.add(event["actors"].split(",")[-1])  # who acted with the token used

    def add(self, other: Usage) -> None:
        """Count `other`'s requests (the same identity's, with another key) as this one's."""
        self.requests += other.requests
        if not self.first or parse_time(other.first) < parse_time(self.first):
            self.first = other.first
        if not self.last or parse_time(other.last) > parse_time(self.last):
            self.last = other.last
        self.tasks |= other.tasks
        self.token_ids |= other.token_ids
        self.key_versions |= other.key_versions
        self.key_fingerprints |= other.key_fingerprints
        self.actors |= other.actors
        self.routes |= other.routes

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
            "key_fingerprints": sorted(self.key_fingerprints),
            "actors": sorted(self.actors),
            "routes": sorted(self.routes),
        }


@dataclass
class Answer:
    identities: list[Usage]
    skipped_lines: int
    routes: set[str] = field(default_factory=set)  # every route a request event named
    # The keys counted, by fingerprint: the one asked for, or those the version asked for
    # held (empty without either, or when no event names the version's key).
    key_fingerprints: set[str] = field(default_factory=set)
    # Routes not asked about whose requests sent a key counted (another secret holding it).
    elsewhere: set[str] = field(default_factory=set)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC. Raises ValueError."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def query(  # noqa: PLR0917  # the questions `keyproxy audit` asks
    lines: Iterable[str],
    route: str | Collection[str],
    key_version: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    key_fingerprint: str | None = None,
    secret: tuple[str, str] | None = None,
) -> Answer:
    """Who used `route`'s key between `since` and `until`: the key of `key_fingerprint`, or
    every key `key_version` held, if given (a key is counted under every version that held
    it); a collection of routes for routes that inject the same key (one version of it is
    one key, whichever route sent it). Which key a version held is learnt from its request
    events and, given the key's `secret` ("mount/path", field), its `key_cache.key_loaded`
    events."""
    wanted = {route} if isinstance(route, str) else set(route)
    # Per key (its fingerprint; the version for an event of an earlier build, which names
    # none) and identity: which keys count is known only once every line is read.
    usages: dict[tuple[str | int, tuple[str | None, str | None]], Usage] = {}
    seen = _KeysSeen(secret)
    skipped = 0
    routes: set[str] = set()
    for line in lines:
        event = read_event(line, None)
        if event is not None and event["event"] == "key_cache.key_loaded":
            seen.loaded(event)
            continue
        if event is None or event["event"] != "request":
            skipped += bool(line.strip())
            continue
        if isinstance(event.get("route"), str):
            routes.add(event["route"])
        version = event.get("key_version")
        # type, not isinstance: JSON's true is no key version, though Python's bool is an int
        if type(version) is not int:
            continue
        facts = _request_facts(event)
        if facts is None:
            skipped += 1
            continue
        at, fingerprint, who = facts
        if event.get("route") not in wanted:
            seen.sent_elsewhere(fingerprint, event.get("route"))
            continue
        if fingerprint is not None:
            seen.held.setdefault(version, set()).add(fingerprint)
        if (since and at < since) or (until and at > until):
            continue
        key = version if fingerprint is None else fingerprint
        usages.setdefault((key, who), Usage(*who)).count(event, at)
    if key_fingerprint is not None:
        keys: set[str | int] | None = {key_fingerprint}
    elif key_version is not None:
        keys = {key_version, *seen.held.get(key_version, ())}
    else:
        keys = None
    counted = {k for k in keys if isinstance(k, str)} if keys is not None else set()
    elsewhere = {r for fp in counted for r in seen.elsewhere.get(fp, ())}
    return Answer(_by_identity(usages, keys), skipped, routes, counted, elsewhere)


# A key's fingerprint as keyproxy writes it (keyproxy.secret.fingerprint).
_FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def is_fingerprint(value: object) -> TypeGuard[str]:
    """Whether `value` is a key fingerprint as keyproxy writes it."""
    return isinstance(value, str) and _FINGERPRINT.fullmatch(value) is not None


def _request_facts(
    event: dict[str, Any],
) -> tuple[datetime, str | None, tuple[str | None, str | None]] | None:
    """A request event's time, key fingerprint and identity; None for an event keyproxy
    would not write (no time, a fingerprint or identity of another form)."""
    at = event_time(event.get("timestamp"))
    fingerprint = event.get("key_fingerprint")
    who = (event.get("issuer"), event.get("subject"))
    if (
        at is None
        or not (fingerprint is None or is_fingerprint(fingerprint))
        or not all(w is None or isinstance(w, str) for w in who)  # text or null
    ):
        return None
    return at, fingerprint, who


@dataclass
class _KeysSeen:
    """What the logs say of keys: which each version held, and which other routes sent each."""

    secret: tuple[str, str] | None  # the route's key: "mount/path" and field, if known
    held: dict[int, set[str]] = field(default_factory=dict)
    elsewhere: dict[str, set[str]] = field(default_factory=dict)

    def loaded(self, event: dict[str, Any]) -> None:
        """A `key_cache.key_loaded` event: of the route's secret, it names a version's key."""
        version, fingerprint = event.get("version"), event.get("fingerprint")
        if (
            self.secret is not None
            and (event.get("secret"), event.get("field")) == self.secret
            and type(version) is int
            and is_fingerprint(fingerprint)
        ):
            self.held.setdefault(version, set()).add(fingerprint)

    def sent_elsewhere(self, fingerprint: str | None, route: object) -> None:
        """A request of a route not asked about sent the key of `fingerprint`."""
        if fingerprint is not None and isinstance(route, str):
            self.elsewhere.setdefault(fingerprint, set()).add(route)


def _by_identity(
    usages: dict[tuple[str | int, tuple[str | None, str | None]], Usage],
    keys: set[str | int] | None,
) -> list[Usage]:
    """Each identity's use of `keys` (of every key if None), by issuer and subject."""
    merged: dict[tuple[str | None, str | None], Usage] = {}
    for (key, who), usage in usages.items():
        if keys is not None and key not in keys:
            continue
        if who in merged:
            merged[who].add(usage)
        else:
            merged[who] = usage
    return sorted(merged.values(), key=lambda u: (u.issuer or "", u.subject or ""))


@dataclass(frozen=True)
class ToolCall:
    """One JSON-RPC request on an MCP route, as its `mcp.call` event named it."""

    timestamp: str
    method: str
    target: str  # the tool, prompt or resource URI named ("" for other methods)
    decision: str
    key_version: int | None
    key_fingerprint: str | None
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
            "key_fingerprint": self.key_fingerprint,
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
        event = read_event(line, "mcp.call")
        if event is None or event.get("route") != route:
            continue
        at = event_time(event.get("timestamp"))
        if at is None or (since and at < since) or (until and at > until):
            continue
        name = event.get("task") if isinstance(event.get("task"), str) else ""
        if task is not None and name != task:
            continue
        target = next(
            (event[k] for k in ("mcp_tool", "mcp_prompt", "mcp_resource") if k in event), ""
        )
        version, fingerprint = event.get("key_version"), event.get("key_fingerprint")
        found.setdefault(str(name), []).append(
            ToolCall(
                timestamp=str(event["timestamp"]),
                method=str(event.get("mcp_method", "")),
                target=str(target),
                decision=str(event.get("decision", "")),
                key_version=version if type(version) is int else None,
                key_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
                subject=event.get("subject") if isinstance(event.get("subject"), str) else None,
                token_id=event.get("token_id") if isinstance(event.get("token_id"), str) else None,
                session=str(event.get("mcp_session") or ""),
            )
        )
    return found


def event_time(value: Any) -> datetime | None:
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


def read_event(line: str, kind: str | None = "request") -> dict[str, Any] | None:
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
    "ToolCall",
    "Usage",
    "calls",
    "event_time",
    "is_fingerprint",
    "parse_time",
    "query",
    "read_event",
]

"""Filtering list answers to the grant, so a model is never offered what it cannot use.

    Pending.of(body) -> Pending            the list requests a POST body sent, by id
    filter_result(method, result, grant) -> dict
    filter_json_answer(data, pending, grant, version) -> bytes

Only the items array is filtered; every other member (`nextCursor` for the next page, `_meta`)
is kept as the server sent it, so pagination goes on unchanged: each page is filtered on its
own, and a page may come back shorter, or empty, with its cursor still there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from keyproxy.mcp.grants import LIST_METHODS, Grant, decide_server_request
from keyproxy.mcp.jsonrpc import (
    DEFAULT_MAX_BYTES,
    Body,
    Id,
    Kind,
    Message,
    MessageError,
    id_text,
    parse_body,
)
from keyproxy.mcp.names import folded_twin


@dataclass(frozen=True)
class Pending:
    """The list requests awaiting an answer, by id text (so 1 and "1" stay apart)."""

    methods: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Body) -> Pending:
        return cls(
            {
                id_text(m.id): m.method
                for m in body.messages
                if m.kind is Kind.REQUEST and m.method is not None and m.method in LIST_METHODS
            }
        )

    def method_for(self, request_id: Id | None) -> str | None:
        return self.methods.get(id_text(request_id)) if request_id is not None else None


# The member of a list's items the grant is checked against, where it is not "name".
_NAMED_BY: Final = {"resources/list": "uri", "resources/templates/list": "uriTemplate"}


def _keeps(method: str, item: object, grant: Grant) -> bool:
    if not isinstance(item, dict):
        return False
    named = _NAMED_BY.get(method, "name")
    if folded_twin(item, frozenset((named,))) is not None:
        return False  # SECURITY: mcp-go's client reads `Name` as `name`
    if method == "tools/list":
        return _exact(item.get("name"), grant.tools)
    if method == "prompts/list":
        return _exact(item.get("name"), grant.prompts)
    if method == "resources/list":
        return grant.reads(item.get("uri"))
    template = item.get("uriTemplate")
    return isinstance(template, str) and grant.allows_template(template)


def _exact(name: object, granted: frozenset[str]) -> bool:
    return isinstance(name, str) and name in granted


def filter_result(method: str, result: Mapping[str, Any], grant: Grant) -> dict[str, Any]:
    """`result` of a list method with only the granted items; other members kept as sent.
    A result whose items member is missing or not an array is refused."""
    member = LIST_METHODS[method]
    items = result.get(member)
    if not isinstance(items, list):
        raise MessageError(f"{method} result has no {member} array")
    return {**result, member: [item for item in items if _keeps(method, item, grant)]}


_UPDATED: Final = "notifications/resources/updated"


def shown(message: Message, grant: Grant) -> bool:
    """Whether a server's notification may reach the caller: one naming a resource
    (`notifications/resources/updated`) only if a read of its URI would be allowed.
    SECURITY: the server sees one client, keyproxy's key, so it may tell every session of a
    change to a resource only some callers are granted."""
    if message.kind is not Kind.NOTIFICATION or message.method != _UPDATED:
        return True
    return grant.reads(message.params.get("uri"))


def filter_message(message: Message, pending: Pending, grant: Grant) -> dict[str, Any] | None:
    """The response `message` as it should reach the caller when it answers a pending list
    request, or holds a list's items array some ungranted (as a JSON-RPC object), or None
    when it passes unchanged."""
    if message.kind is not Kind.RESPONSE or message.result is None:
        return None
    _refuse_folded_items(message.result)
    method = pending.method_for(message.id)
    if method is not None:
        result = filter_result(method, message.result, grant)
    elif listed := _listed(message.result):
        # SECURITY: a list answer where none is pending: a stream resumed after an event (the
        # caller's Last-Event-ID) replays the answers sent on it, and a server may answer a
        # list request on another stream (the GET's) than the request's: the clients match
        # answers by id whatever stream brings them.
        result = dict(message.result)
        for method in listed:
            result = filter_result(method, result, grant)
        if result == message.result:
            return None  # nothing ungranted: it passes as sent
    else:
        return None
    return {"jsonrpc": "2.0", "id": message.id, "result": result}


_ITEMS: Final = frozenset(LIST_METHODS.values())


def _refuse_folded_items(result: Mapping[str, Any]) -> None:
    """SECURITY: mcp-go's client reads `Tools` as `tools` (`folded_twin`), beside or instead
    of it: the items it shows would not be those filtered here."""
    key = folded_twin(result, _ITEMS)
    if key is not None:
        raise MessageError(f"result member {key[:64]!r} differs from a list's only by case")


def _listed(result: Mapping[str, Any]) -> list[str]:
    """The list methods whose items array `result` holds (only list results have one)."""
    return [m for m, member in LIST_METHODS.items() if isinstance(result.get(member), list)]


def _encode(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def filter_json_answer(
    data: bytes,
    pending: Pending,
    grant: Grant,
    version: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """An application/json answer body with its list responses filtered; `data` itself when
    nothing in it answers a pending list request. An unreadable answer is refused, as is one
    holding a server request the route does not allow (a JSON answer holds responses; the
    SDK clients act on a request in it all the same)."""
    body = parse_body(data, version=version, max_bytes=max_bytes)
    for message in body.messages:
        if message.kind is Kind.REQUEST and decide_server_request(message, grant) is not None:
            raise MessageError("a JSON answer holds a server request the route does not allow")
    filtered = [filter_message(m, pending, grant) for m in body.messages]
    if all(f is None for f in filtered):
        return data
    # Re-encoding: the filtered answer is rebuilt from what was read, so only what was
    # parsed exactly reaches the caller.
    values = [
        f if f is not None else as_json(m) for m, f in zip(body.messages, filtered, strict=True)
    ]
    return _encode(values if body.batch else values[0])


def as_json(message: Message) -> dict[str, Any]:
    value: dict[str, Any] = {"jsonrpc": "2.0"}
    if message.method is not None:
        value["method"] = message.method
    if message.kind is not Kind.NOTIFICATION:
        value["id"] = message.id
    if message.has_params:
        value["params"] = dict(message.params)
    if message.result is not None:
        value["result"] = dict(message.result)
    if message.error is not None:
        value["error"] = dict(message.error)
    return value

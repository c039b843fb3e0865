"""Audit facts: one Call per request, naming what was called and never the arguments."""

from __future__ import annotations

import json

import pytest

from keyproxy.mcp import Call, Grant, decide, parse_body
from keyproxy.mcp.audit import MAX_SAID

CASES = [
    (
        {"method": "tools/call", "id": 3, "params": {"name": "t", "arguments": {"k": "secret"}}},
        Call("tools/call", "3", "tool", "t", has_arguments=True),
    ),
    (
        {"method": "tools/call", "id": "3", "params": {"name": "t"}},
        Call("tools/call", '"3"', "tool", "t"),
    ),
    (
        {"method": "prompts/get", "id": 1, "params": {"name": "p", "arguments": {"a": "b"}}},
        Call("prompts/get", "1", "prompt", "p", has_arguments=True),
    ),
    (
        {"method": "resources/read", "id": 1, "params": {"uri": "x://y"}},
        Call("resources/read", "1", "resource", "x://y"),
    ),
    (
        {
            "method": "completion/complete",
            "id": 1,
            "params": {"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a"}},
        },
        Call("completion/complete", "1", "prompt", "p"),
    ),
    (
        {
            "method": "completion/complete",
            "id": 1,
            "params": {"ref": {"type": "ref/resource", "uri": "x://{n}"}},
        },
        Call("completion/complete", "1", "resource", "x://{n}"),
    ),
    (
        {"method": "completion/complete", "id": 1, "params": {"ref": {"type": ["ref/prompt"]}}},
        Call("completion/complete", "1"),
    ),
    (
        {"method": "completion/complete", "id": 1, "params": {"ref": 5}},
        Call("completion/complete", "1"),
    ),
    ({"method": "tools/list", "id": 1}, Call("tools/list", "1")),
    ({"method": "tools/call", "id": 1, "params": {"name": 5}}, Call("tools/call", "1")),
]


@pytest.mark.parametrize(("message", "expected"), CASES)
def test_each_request_yields_its_audit_facts(message: dict[str, object], expected: Call) -> None:
    """Method, target and id as text (string ids quoted), arguments only as present or not."""
    body = parse_body(json.dumps({"jsonrpc": "2.0", **message}).encode())
    (found,) = decide(body, Grant(), "2025-06-18").calls
    assert found == expected
    assert "secret" not in repr(found.fields())


def test_refused_requests_are_audited_too() -> None:
    """A batch's calls are all reported, refused or not, and notifications are not calls."""
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "no"}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]
    decision = decide(parse_body(json.dumps(batch).encode()), Grant(), "2025-03-26")
    assert not decision.allowed
    assert [c.fields() for c in decision.calls] == [
        {"mcp_method": "tools/call", "mcp_id": "1", "mcp_tool": "no", "mcp_has_arguments": False}
    ]


def test_what_a_call_names_is_kept_to_a_bounded_length() -> None:
    """A method, id or tool name of a mebibyte (within a route's max_body) is cut at
    MAX_SAID characters in the call's event: the line stays one `keyproxy audit --calls`
    reads, so a caller cannot hide its refused calls in lines the query skips."""
    long = "x" * 2**20
    batch = [
        {"jsonrpc": "2.0", "id": long, "method": "tools/call", "params": {"name": long}},
        {"jsonrpc": "2.0", "id": 2, "method": long},
    ]
    decision = decide(parse_body(json.dumps(batch).encode()), Grant(), "2025-03-26")
    said = [value for call in decision.calls for value in call.fields().values()]
    assert all(len(str(value)) <= MAX_SAID + 1 for value in said)
    assert decision.calls[0].target == "x" * MAX_SAID + "…"

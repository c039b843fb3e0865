"""Grants: each message is allowed or answered with a JSON-RPC error and never forwarded."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest

from keyproxy.errors import ConfigError
from keyproxy.mcp import (
    SERVER_REQUESTS,
    Grant,
    MessageError,
    Refusal,
    decide,
    decide_server_request,
    parse_body,
)
from keyproxy.mcp.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND

OLD, NEW = "2025-03-26", "2025-06-18"
GRANT = Grant.build(
    tools=["search_issues", "get_issue", "café"],
    prompts=["summarize"],
    resources=["file:///docs/*", "repo://readme"],
)


def request(method: str, params: dict[str, Any] | None = None, rid: object = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        message["params"] = params
    return message


def call(name: object, rid: object = 1) -> dict[str, Any]:
    return request("tools/call", {"name": name, "arguments": {"q": "x"}}, rid)


def encode(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def verdict(value: object, grant: Grant = GRANT, version: str = NEW) -> tuple[Refusal, ...]:
    return decide(parse_body(encode(value), version=version), grant, version).refusals


ALLOWED = [
    call("search_issues"),
    call("café"),
    request("tools/list"),
    request("tools/list", {"cursor": "abc"}),
    request("prompts/get", {"name": "summarize"}),
    request("resources/read", {"uri": "file:///docs/a/b.md"}),
    request("resources/read", {"uri": "repo://readme"}),
    request("resources/subscribe", {"uri": "file:///docs/x"}),
    request("completion/complete", {"ref": {"type": "ref/prompt", "name": "summarize"}}),
    request("completion/complete", {"ref": {"type": "ref/resource", "uri": "file:///docs/{p}"}}),
    request("initialize", {"protocolVersion": NEW}),
    request("ping"),
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
    {"jsonrpc": "2.0", "id": 7, "result": {}},
    {"jsonrpc": "2.0", "id": 7, "result": {"_meta": {}}},
    {"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "declined"}},
]


@pytest.mark.parametrize("message", ALLOWED)
def test_granted_messages_are_allowed(message: dict[str, Any]) -> None:
    """Calls of granted tools, prompts and resources, lists and lifecycle messages pass."""
    assert verdict(message) == ()


NFD_CAFE = unicodedata.normalize("NFD", "café")
REFUSED = [
    (call("delete_repo"), INVALID_PARAMS, "tool 'delete_repo' is not granted"),
    (call("Search_Issues"), INVALID_PARAMS, "is not granted"),
    (call("SEARCH_ISSUES"), INVALID_PARAMS, "is not granted"),
    (call("search_issues "), INVALID_PARAMS, "is not granted"),
    (call("search\u2010issues"), INVALID_PARAMS, "is not granted"),
    (call("\uff53earch_issues"), INVALID_PARAMS, "is not granted"),
    (call(NFD_CAFE), INVALID_PARAMS, "not in Unicode normal form NFC"),
    (call("search_issues\u200b"), INVALID_PARAMS, "control or format character"),
    (call("search_issues\x00"), INVALID_PARAMS, "control or format character"),
    (call("search_issues\n"), INVALID_PARAMS, "control or format character"),
    (call("\u202esearch_issues"), INVALID_PARAMS, "control or format character"),
    (call(""), INVALID_PARAMS, "not a non-empty string"),
    (call(["search_issues"]), INVALID_PARAMS, "not a non-empty string"),
    (request("tools/call", {"arguments": {}}), INVALID_PARAMS, "not a non-empty string"),
    (request("prompts/get", {"name": "other"}), INVALID_PARAMS, "prompt 'other' is not granted"),
    (request("resources/read", {"uri": "file:///etc/passwd"}), INVALID_PARAMS, "not granted"),
    (request("resources/read", {"uri": "file:///docs/../etc"}), INVALID_PARAMS, "'..' segment"),
    (request("resources/read", {"uri": "file:///docs/%2e%2e/x"}), INVALID_PARAMS, "encoded"),
    # A server mapping a file URI to a path without reading a query or fragment out of it.
    (request("resources/read", {"uri": "file:///docs/x?/../../etc"}), INVALID_PARAMS, "'..'"),
    (request("resources/read", {"uri": "file:///docs/x#/../../etc"}), INVALID_PARAMS, "'..'"),
    (request("resources/read", {"uri": "file:///docs/x?/./y"}), INVALID_PARAMS, "'.'"),
    (request("resources/read", {"uri": "file:///docs\\..\\x"}), INVALID_PARAMS, "backslash"),
    (request("resources/read", {"uri": "repo://readme2"}), INVALID_PARAMS, "not granted"),
    (request("resources/unsubscribe", {"uri": "x://y"}), INVALID_PARAMS, "not granted"),
    (
        request("completion/complete", {"ref": {"type": "ref/prompt", "name": "other"}}),
        INVALID_PARAMS,
        "not granted",
    ),
    (
        request("completion/complete", {"ref": {"type": "ref/resource", "uri": "x://{a}"}}),
        INVALID_PARAMS,
        "not granted",
    ),
    (request("completion/complete", {"ref": "x"}), INVALID_PARAMS, "needs a ref object"),
    (request("Tools/Call", {"name": "search_issues"}), METHOD_NOT_FOUND, "'Tools/Call'"),
    (request("tools/call ", {"name": "search_issues"}), METHOD_NOT_FOUND, "not allowed"),
    (request("tools.call", {"name": "search_issues"}), METHOD_NOT_FOUND, "not allowed"),
    (request("tools/invoke", {"name": "search_issues"}), METHOD_NOT_FOUND, "not allowed"),
    (request("tasks/list"), METHOD_NOT_FOUND, "not allowed"),
    ({"jsonrpc": "2.0", "method": "notifications/whatever"}, METHOD_NOT_FOUND, "not allowed"),
]


@pytest.mark.parametrize(("message", "code", "reason"), REFUSED)
def test_ungranted_or_ambiguous_calls_are_refused(
    message: dict[str, Any], code: int, reason: str
) -> None:
    """A name differing by case, space or Unicode form is not the granted one; a name not NFC
    or holding a control or format character, an alias or unknown method, is refused."""
    (refusal,) = verdict(message)
    assert refusal.id == message.get("id")
    assert refusal.code == code
    assert reason in refusal.message


@pytest.mark.parametrize("uri", ["notes:../secret", "notes:..", "notes:./x", "../etc/passwd"])
def test_a_dot_segment_right_after_the_scheme_is_refused(uri: str) -> None:
    """A dot segment opening a URI's path (`notes:../secret`, a rootless path, which a server
    resolves against its own base) is refused as one after a slash is, even where a prefix
    grant (`notes:*`) covers the URI."""
    (refusal,) = verdict(
        request("resources/read", {"uri": uri}), Grant.build(resources=["notes:*"])
    )
    assert refusal.code == INVALID_PARAMS
    assert "segment" in refusal.message


ANSWERS = [
    {"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {"ok": True}}},
    {"jsonrpc": "2.0", "id": 0, "result": {"roots": [{"uri": "file:///"}]}},
    [{"jsonrpc": "2.0", "id": 0, "result": {}}, {"jsonrpc": "2.0", "id": 1, "result": {"x": 1}}],
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_a_result_to_a_withheld_server_request_is_refused(answer: object) -> None:
    """Where the route lets no server request through, a client's result other than ping's
    (empty) is refused: it could only race keyproxy's error to one the caller never saw."""
    (refusal,) = verdict(answer, version=OLD)
    assert (refusal.id, refusal.code) == (None, -32600)
    assert "withholds" in refusal.message
    every = Grant.build(tools=["a"], server_requests=sorted(SERVER_REQUESTS))
    assert verdict(answer, every, OLD) == ()


SAMPLED = {"role": "assistant", "content": {"type": "text", "text": "ok"}, "model": "m"}


@pytest.mark.parametrize(
    ("allowed", "result", "passes"),
    [
        ("roots/list", {"roots": [{"uri": "file:///"}]}, True),
        ("roots/list", {"action": "accept", "content": {"ok": True}}, False),
        ("roots/list", SAMPLED, False),
        ("elicitation/create", {"action": "accept", "content": {"ok": True}}, True),
        ("elicitation/create", {"roots": []}, False),
        ("sampling/createMessage", SAMPLED, True),
        ("sampling/createMessage", {"action": "decline"}, False),
    ],
)
def test_a_result_only_a_withheld_request_has_is_refused_beside_allowed_ones(
    allowed: str, result: dict[str, Any], passes: bool
) -> None:
    """Where the route lets some server requests through, a result holding what only a
    withheld one's result holds (`action`: elicitation, `model`: sampling, `roots`) is
    refused: it can answer nothing the caller was shown."""
    grant = Grant.build(tools=["a"], server_requests=[allowed])
    found = verdict({"jsonrpc": "2.0", "id": 0, "result": result}, grant)
    assert (found == ()) is passes


def test_a_refused_request_is_answered_with_its_id() -> None:
    """The answer is a JSON-RPC error response carrying the request's id, as a client expects."""
    body = parse_body(encode(call("delete_repo", rid="abc")), version=NEW)
    decision = decide(body, GRANT, NEW)
    assert not decision.allowed
    assert json.loads(decision.answer()) == {
        "jsonrpc": "2.0",
        "id": "abc",
        "error": {
            "code": INVALID_PARAMS,
            "message": "tool 'delete_repo' is not granted to this caller",
        },
    }


def test_a_batch_hiding_an_ungranted_call_is_refused_whole() -> None:
    """One ungranted call refuses the batch: each request is answered, none forwarded."""
    batch = [
        call("search_issues", 1),
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
        call("delete_repo", 2),
        request("tools/list", rid=3),
    ]
    decision = decide(parse_body(encode(batch), version=OLD), GRANT, OLD)
    assert not decision.allowed
    answer = json.loads(decision.answer())
    assert [a["id"] for a in answer] == [1, 2, 3]
    assert answer[1]["error"]["message"] == "tool 'delete_repo' is not granted to this caller"
    assert answer[0]["error"]["message"].startswith("batch refused: tool 'delete_repo'")
    assert decide(parse_body(encode([batch[0], batch[3]]), version=OLD), GRANT, OLD).allowed


def test_a_batch_of_notifications_is_refused_with_one_error() -> None:
    """A refused batch with no request to answer gets one error response without an id."""
    batch = [{"jsonrpc": "2.0", "method": "notifications/whatever"}]
    decision = decide(parse_body(encode(batch), version=OLD), GRANT, OLD)
    assert json.loads(decision.answer())["id"] is None


def test_a_methods_list_allows_only_those_and_the_lifecycle() -> None:
    """With `methods`, a known method not listed is refused; an extension method can be named."""
    grant = Grant.build(tools=["a"], methods=["tools/call", "x/custom"])
    assert verdict(call("a"), grant) == ()
    assert verdict(request("x/custom"), grant) == ()
    assert verdict(request("initialize", {}), grant) == ()
    assert verdict(request("tools/list"), grant)[0].code == METHOD_NOT_FOUND
    assert verdict(request("X/custom"), grant)[0].code == METHOD_NOT_FOUND
    assert verdict(call("b"), grant)[0].code == INVALID_PARAMS


def test_tasks_methods_belong_to_their_revision() -> None:
    """tasks/get is a method of 2025-11-25 only."""
    assert verdict(request("tasks/get", {"taskId": "t"}), version="2025-11-25") == ()
    assert verdict(request("tasks/get", {"taskId": "t"}), version=NEW) != ()


BAD_GRANTS = [
    ({"tools": ["Café".replace("é", "e\u0301")]}, "NFC"),
    ({"tools": ["a\tb"]}, "control"),
    ({"tools": ["a", "a"]}, "given twice"),
    ({"tools": "search_issues"}, "must be a list"),
    ({"tools": [3]}, "non-empty string"),
    ({"resources": ["file:///a/*/b"]}, "only at its end"),
    ({"resources": ["file:///a/../b"]}, "'..' segment"),
    ({"server_requests": ["sampling/create"]}, "is not one of"),
]


@pytest.mark.parametrize(("fields", "reason"), BAD_GRANTS)
def test_bad_grants_are_refused_at_build_time(fields: dict[str, Any], reason: str) -> None:
    """A grant naming something that could never match exactly fails when it is built."""
    with pytest.raises(ConfigError, match=reason):
        Grant.build(**fields, error=lambda m: ConfigError("allow.mcp", m))


SERVER = [
    ("ping", (), True),
    ("sampling/createMessage", (), False),
    ("sampling/createMessage", ("sampling/createMessage",), True),
    ("elicitation/create", ("sampling/createMessage",), False),
    ("elicitation/create", ("elicitation/create",), True),
    ("roots/list", (), False),
]


@pytest.mark.parametrize(("method", "allowed", "passes"), SERVER)
def test_server_requests_pass_only_when_the_route_allows_them(
    method: str, allowed: tuple[str, ...], passes: bool
) -> None:
    """Sampling, elicitation and roots requests from the server need the grant; ping does not."""
    grant = Grant.build(server_requests=allowed)
    (message,) = parse_body(encode(request(method, {}, rid=9))).messages
    refusal = decide_server_request(message, grant)
    assert (refusal is None) == passes
    if refusal is not None:
        assert refusal.response()["id"] == 9


def test_an_unreadable_body_is_answered_with_a_parse_error() -> None:
    """A body refused by the reader becomes a JSON-RPC error with the id it could read."""
    with pytest.raises(MessageError) as caught:
        parse_body(b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":[]}')
    assert Refusal.from_error(caught.value).response() == {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {"code": -32600, "message": "params is not a JSON object"},
    }

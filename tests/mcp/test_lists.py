"""List answers are filtered to the grant, keeping the cursor and every other member."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyproxy.mcp import Grant, MessageError, Pending, filter_json_answer, filter_result, parse_body

GRANT = Grant.build(tools=["a", "c"], prompts=["p"], resources=["file:///docs/*", "x://one"])


def tool(name: object) -> dict[str, Any]:
    return {"name": name, "inputSchema": {"type": "object"}}


RESULTS = [
    (
        "tools/list",
        {"tools": [tool("a"), tool("b"), tool("A"), tool("c"), tool(3), "a"], "nextCursor": "n2"},
        {"tools": [tool("a"), tool("c")], "nextCursor": "n2"},
    ),
    ("tools/list", {"tools": [tool("b")], "nextCursor": "n3"}, {"tools": [], "nextCursor": "n3"}),
    ("tools/list", {"tools": [], "_meta": {"k": 1}}, {"tools": [], "_meta": {"k": 1}}),
    # A name a case-blind client (mcp-go) reads instead of the granted one: the item goes.
    ("tools/list", {"tools": [{**tool("a"), "Name": "b"}, tool("c")]}, {"tools": [tool("c")]}),
    ("resources/list", {"resources": [{"uri": "x://one", "URI": "x://two"}]}, {"resources": []}),
    (
        "prompts/list",
        {"prompts": [{"name": "p"}, {"name": "q"}]},
        {"prompts": [{"name": "p"}]},
    ),
    (
        "resources/list",
        {
            "resources": [
                {"uri": "file:///docs/a", "name": "a"},
                {"uri": "file:///etc/x", "name": "b"},
                {"uri": "x://one", "name": "c"},
                {"uri": "x://one/more", "name": "d"},
            ],
            "nextCursor": "r",
        },
        {
            "resources": [{"uri": "file:///docs/a", "name": "a"}, {"uri": "x://one", "name": "c"}],
            "nextCursor": "r",
        },
    ),
    (
        "resources/templates/list",
        {
            "resourceTemplates": [
                {"uriTemplate": "file:///docs/{path}", "name": "docs"},
                {"uriTemplate": "file:///{path}", "name": "all"},
                {"uriTemplate": "x://{thing}", "name": "x"},
            ]
        },
        {"resourceTemplates": [{"uriTemplate": "file:///docs/{path}", "name": "docs"}]},
    ),
]


@pytest.mark.parametrize(("method", "result", "expected"), RESULTS)
def test_list_results_keep_only_granted_items(
    method: str, result: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Only granted names or URIs stay (compared exactly); nextCursor and _meta are kept."""
    assert filter_result(method, result, GRANT) == expected


def test_a_result_without_its_items_array_is_refused() -> None:
    """A tools/list result whose tools member is missing or not an array is not guessed at."""
    for result in ({}, {"tools": {"a": 1}}):
        with pytest.raises(MessageError, match="has no tools array"):
            filter_result("tools/list", result, GRANT)


def answer(result: dict[str, Any], rid: object = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def pending_for(*requests: tuple[object, str]) -> Pending:
    batch = [{"jsonrpc": "2.0", "id": rid, "method": m} for rid, m in requests]
    return Pending.of(parse_body(json.dumps(batch).encode(), version="2025-03-26"))


def test_a_json_answer_to_a_list_request_is_filtered() -> None:
    """The JSON answer to a pending tools/list is re-encoded with the granted tools only."""
    data = json.dumps(answer({"tools": [tool("a"), tool("b")], "nextCursor": "c2"})).encode()
    out = filter_json_answer(data, pending_for((1, "tools/list")), GRANT, "2025-06-18")
    assert json.loads(out) == answer({"tools": [tool("a")], "nextCursor": "c2"})


def test_other_answers_pass_byte_for_byte() -> None:
    """An answer to a request that is not a pending list request, holding nothing
    ungranted, is returned unchanged."""
    pending = pending_for((1, "tools/list"), ("2", "tools/list"))
    for data in (
        b'{"jsonrpc":"2.0", "id":2, "result":{"content":[{"type":"text","text":"b"}]}}',
        b'{"jsonrpc":"2.0", "id":2, "result":{"tools":[{"name":"a"}]}}',
    ):
        assert filter_json_answer(data, pending, GRANT, "2025-06-18") is data


def test_a_list_answer_where_none_is_pending_is_filtered_too() -> None:
    """A result holding a list's items array is filtered whatever request it answers: a
    resumed stream replays earlier list answers, and a server may answer a list request on
    another stream than the request's (the clients match answers by id)."""
    data = json.dumps(answer({"tools": [tool("a"), tool("b")], "prompts": [{"name": "q"}]}, 7))
    out = filter_json_answer(data.encode(), Pending(), GRANT, "2025-06-18")
    assert json.loads(out) == answer({"tools": [tool("a")], "prompts": []}, 7)


# String ids the MCP SDK clients read as the number 1: Python's int() (spaces, "_", a sign,
# any Unicode digit) and JavaScript's Number() (hex, decimals, exponents, a BOM).
NUMBER_ONE = ["1", " 1\n", "+1", "0_1", "\u0661", "\uff11", "0x1", "1.0", "1e0", "\ufeff1"]


@pytest.mark.parametrize("rid", NUMBER_ONE)
def test_a_list_answer_under_an_id_an_sdk_reads_as_the_requests_is_filtered(rid: str) -> None:
    """A server answering the tools/list of id 1 under the string id "1" (or " 1", "0x1"...)
    is still filtered (as a result holding a list's items array): the SDK clients match a
    string id to the number it spells."""
    data = json.dumps(answer({"tools": [tool("a"), tool("b")]}, rid=rid)).encode()
    out = filter_json_answer(data, pending_for((1, "tools/list")), GRANT, "2025-06-18")
    assert json.loads(out) == answer({"tools": [tool("a")]}, rid=rid)


@pytest.mark.parametrize("twin", ["Tools", "TOOLS", "resourcetemplates", "Prompt\u017f"])
@pytest.mark.parametrize("pending", [Pending(), pending_for((1, "tools/list"))])
def test_a_result_with_a_list_member_in_another_case_is_refused(
    twin: str, pending: Pending
) -> None:
    """A result member differing from a list's items member only by case is refused: Go's
    encoding/json (mcp-go's client) reads `Tools` as `tools`, beside or instead of it, so
    the items filtered here would not be the ones it shows."""
    data = json.dumps(answer({"tools": [tool("a")], twin: [tool("b")]})).encode()
    with pytest.raises(MessageError, match="only by case"):
        filter_json_answer(data, pending, GRANT, "2025-06-18")


def test_a_batched_answer_filters_only_its_list_responses() -> None:
    """In a 2025-03-26 batch answer, each list response is filtered and the rest kept."""
    batch = [
        answer({"content": [{"type": "text", "text": "hi"}]}, rid=1),
        answer({"prompts": [{"name": "p"}, {"name": "z"}], "nextCursor": None}, rid="2"),
    ]
    pending = pending_for((1, "tools/call"), ("2", "prompts/list"))
    out = json.loads(filter_json_answer(json.dumps(batch).encode(), pending, GRANT, "2025-03-26"))
    assert out == [batch[0], answer({"prompts": [{"name": "p"}], "nextCursor": None}, rid="2")]


def test_an_unreadable_answer_is_refused() -> None:
    """A list answer with a duplicate member is refused rather than filtered by a guess."""
    data = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"b"}]}}'
    with pytest.raises(MessageError, match="given twice"):
        filter_json_answer(data, pending_for((1, "tools/list")), GRANT, "2025-06-18")


def test_pagination_filters_each_page_and_keeps_walking() -> None:
    """Walking pages by nextCursor yields exactly the granted tools; no cursor is lost."""
    pages: dict[str | None, dict[str, Any]] = {
        None: ({"tools": [tool("b"), tool("a")], "nextCursor": "p2"}),
        "p2": ({"tools": [tool("d")], "nextCursor": "p3"}),
        "p3": ({"tools": [tool("c"), tool("e")]}),
    }
    seen, cursor, rid = [], None, 0
    for _ in range(10):
        rid += 1
        data = json.dumps(answer(pages[cursor], rid)).encode()
        out = json.loads(
            filter_json_answer(data, pending_for((rid, "tools/list")), GRANT, "2025-06-18")
        )
        seen += [t["name"] for t in out["result"]["tools"]]
        cursor = out["result"].get("nextCursor")
        if cursor is None:
            break
    assert (seen, rid) == (["a", "c"], 3)

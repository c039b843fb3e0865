"""Strict JSON-RPC reading: every hostile or ambiguous body is refused with its reason."""

from __future__ import annotations

import json

import pytest

from keyproxy.mcp import (
    Kind,
    MessageError,
    id_text,
    negotiated_version,
    parse_body,
    protocol_version,
)
from keyproxy.mcp.jsonrpc import INVALID_REQUEST, PARSE_ERROR

OLD, NEW = "2025-03-26", "2025-06-18"

CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}}'
NOTE = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'

READ = [
    (CALL, Kind.REQUEST, "tools/call", 1),
    (b'{"jsonrpc":"2.0","id":"x","method":"ping"}', Kind.REQUEST, "ping", "x"),
    (b'{"jsonrpc":"2.0","id":0,"method":"ping"}', Kind.REQUEST, "ping", 0),
    (b'{"jsonrpc":"2.0","id":-5,"method":"ping"}', Kind.REQUEST, "ping", -5),
    (NOTE, Kind.NOTIFICATION, "notifications/initialized", None),
    (b'{"jsonrpc":"2.0","id":1,"result":{}}', Kind.RESPONSE, None, 1),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"m"}}', Kind.RESPONSE, None, 1),
    (b'{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"m"}}', Kind.RESPONSE, None, None),
    (b' \n{"jsonrpc":"2.0","id":2,"method":"ping","params":{}}\n', Kind.REQUEST, "ping", 2),
    ('{"jsonrpc":"2.0","id":"é","method":"ping"}'.encode(), Kind.REQUEST, "ping", "é"),
]


@pytest.mark.parametrize(("data", "kind", "method", "request_id"), READ)
def test_messages_are_told_apart_exactly(
    data: bytes, kind: Kind, method: str | None, request_id: object
) -> None:
    """Requests, notifications and responses are classified by their members, ids kept typed."""
    for version in (OLD, NEW):
        body = parse_body(data, version=version)
        assert not body.batch
        (message,) = body.messages
        assert (message.kind, message.method, message.id) == (kind, method, request_id)


REFUSED = [
    (b"", PARSE_ERROR, "not JSON"),
    (b"{", PARSE_ERROR, "not JSON"),
    (b"{'jsonrpc':'2.0'}", PARSE_ERROR, "not JSON"),
    (CALL + b"x", PARSE_ERROR, "not JSON"),
    (CALL + CALL, PARSE_ERROR, "not JSON"),
    (CALL.decode().encode("utf-16"), PARSE_ERROR, "not UTF-8"),
    (CALL.decode().encode("utf-16-le"), PARSE_ERROR, "not JSON"),
    (CALL.decode().encode("utf-32"), PARSE_ERROR, "not UTF-8"),
    (b"\xef\xbb\xbf" + CALL, PARSE_ERROR, "byte order mark"),
    (CALL.replace(b'"a"', b'"\xff"'), PARSE_ERROR, "not UTF-8"),
    (CALL.replace(b'"a"', b'"\\ud800"'), PARSE_ERROR, "lone surrogate"),
    (CALL.replace(b'"a"', b'"a","name":"b"'), PARSE_ERROR, "'name' given twice"),
    (CALL.replace(b'"id":1', b'"id":1,"id":2'), PARSE_ERROR, "'id' given twice"),
    (CALL.replace(b'"method"', b'"method":"ping","method"'), PARSE_ERROR, "'method' given twice"),
    (CALL.replace(b'"a"}', b'"a","arguments":{"q":1,"q":2}}'), PARSE_ERROR, "'q' given twice"),
    (CALL.replace(b'"id":1', b'"id":NaN'), PARSE_ERROR, "NaN is not JSON"),
    (CALL.replace(b'"id":1', b'"id":1e400'), PARSE_ERROR, "out of range"),
    (b"[" * 100_000 + b"]" * 100_000, PARSE_ERROR, "nested too deeply"),
    (b"[]", INVALID_REQUEST, "empty batch"),
    (b'"ping"', INVALID_REQUEST, "not a JSON object"),
    (b"null", INVALID_REQUEST, "not a JSON object"),
    (b'{"id":1,"method":"ping"}', INVALID_REQUEST, '"jsonrpc": "2.0"'),
    (b'{"jsonrpc":"2","id":1,"method":"ping"}', INVALID_REQUEST, '"jsonrpc": "2.0"'),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', INVALID_REQUEST, "request id is null"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST, "safe integer"),
    (b'{"jsonrpc":"2.0","id":1.0,"method":"ping"}', INVALID_REQUEST, "safe integer"),
    (b'{"jsonrpc":"2.0","id":[1],"method":"ping"}', INVALID_REQUEST, "safe integer"),
    (b'{"jsonrpc":"2.0","id":9007199254740992,"method":"ping"}', INVALID_REQUEST, "safe integer"),
    (b'{"jsonrpc":"2.0","id":1,"method":5}', INVALID_REQUEST, "non-empty string"),
    (b'{"jsonrpc":"2.0","id":1,"method":""}', INVALID_REQUEST, "non-empty string"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}', INVALID_REQUEST, "params"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","Method":"x"}', INVALID_REQUEST, "'Method'"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}', INVALID_REQUEST, "'result'"),
    (b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST, "exactly one of result and error"),
    (
        b'{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":""}}',
        INVALID_REQUEST,
        "exactly one",
    ),
    (b'{"jsonrpc":"2.0","id":1,"result":[]}', INVALID_REQUEST, "result is not"),
    (b'{"jsonrpc":"2.0","id":null,"result":{}}', INVALID_REQUEST, "without a request id"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":"1","message":""}}', INVALID_REQUEST, "code"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":1.5,"message":""}}', INVALID_REQUEST, "code"),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"","x":1}}', INVALID_REQUEST, "code"),
    (b'{"jsonrpc":"2.0"}', INVALID_REQUEST, "neither request"),
]


@pytest.mark.parametrize(("data", "code", "reason"), REFUSED)
def test_hostile_bodies_are_refused_with_a_reason(data: bytes, code: int, reason: str) -> None:
    """Malformed JSON, other encodings, duplicate members at any depth, NaN, lone surrogates,
    deep nesting, bad ids and shapes that are not exactly one message kind are refused."""
    with pytest.raises(MessageError) as caught:
        parse_body(data, version=OLD)
    assert caught.value.code == code
    assert reason in caught.value.message


def test_a_reason_quotes_at_most_64_characters_of_a_member_name() -> None:
    """An unexpected member's name is quoted cut at 64 characters: a server's answer can name
    one of megabytes, and the reason is logged (mcp_bad_answer) once per answer."""
    name = "m" * 2**20
    with pytest.raises(MessageError) as caught:
        parse_body(json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}, name: 1}).encode())
    assert caught.value.message == f"unexpected member {name[:64]!r}"


def test_the_request_id_is_kept_when_the_rest_is_refused() -> None:
    """A request refused for its shape still names its id, so the error can answer it."""
    with pytest.raises(MessageError) as caught:
        parse_body(b'{"jsonrpc":"2.0","id":"r1","method":"ping","params":3}')
    assert caught.value.id == "r1"


def test_a_message_over_the_limit_is_refused_before_it_is_read() -> None:
    """A body above max_bytes is refused by its length alone."""
    huge = CALL.replace(b'"a"', b'"' + b"a" * 5000 + b'"')
    with pytest.raises(MessageError, match="larger than 4096 bytes"):
        parse_body(huge, max_bytes=4096)
    assert parse_body(huge, max_bytes=len(huge)).messages[0].method == "tools/call"


BATCHES = [
    (b"[" + CALL + b"," + NOTE + b"]", None),
    (b'[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"result":{}}]', None),
    (b"[" + CALL + b"," + CALL + b"]", "id twice"),
    (b'[{"jsonrpc":"2.0","id":1,"result":{}},' + NOTE + b"]", "mixes responses"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}]', "initialize"),
    (b"[" + CALL + b",[" + NOTE + b"]]", "not a JSON object"),
]


@pytest.mark.parametrize(("data", "reason"), BATCHES)
def test_batches_are_read_only_where_the_version_has_them(data: bytes, reason: str | None) -> None:
    """2025-03-26 reads well-formed batches; 2025-06-18 and later refuse every batch."""
    for version in (NEW, "2025-11-25"):
        with pytest.raises(MessageError, match="batches are not part"):
            parse_body(data, version=version)
    if reason is None:
        assert parse_body(data, version=OLD).batch
    else:
        with pytest.raises(MessageError, match=reason):
            parse_body(data, version=OLD)


def test_ids_one_and_string_one_stay_apart_in_a_batch() -> None:
    """1 and "1" are different ids: a batch with both is not an id given twice."""
    other = CALL.replace(b'"id":1', b'"id":"1"')
    body = parse_body(b"[" + CALL + b"," + other + b"]", version=OLD)
    assert [id_text(m.id) for m in body.messages] == ["1", '"1"']


@pytest.mark.parametrize(
    ("header", "version"),
    [(None, "2025-03-26"), ("2025-06-18", "2025-06-18"), ("2025-11-25", "2025-11-25")],
)
def test_the_protocol_version_comes_from_the_header(header: str | None, version: str) -> None:
    """No MCP-Protocol-Version header means 2025-03-26, as the transport spec says."""
    assert protocol_version(header) == version


@pytest.mark.parametrize("header", ["2024-11-05", "2025-06-18 ", "", "latest"])
def test_an_unknown_protocol_version_is_refused(header: str) -> None:
    """A version keyproxy does not know is refused, never read as a nearby one."""
    with pytest.raises(MessageError, match="unsupported MCP protocol version"):
        protocol_version(header)
    with pytest.raises(MessageError, match="unsupported"):
        parse_body(CALL, version=header)


def test_params_are_kept_as_read() -> None:
    """A request's params are what was sent; has_params tells {} from absent."""
    body = parse_body(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode())
    assert (body.messages[0].params, body.messages[0].has_params) == ({}, False)


@pytest.mark.parametrize(
    ("result", "version"),
    [
        ({"protocolVersion": "2025-06-18"}, "2025-06-18"),
        ({"protocolVersion": "2024-11-05"}, None),
        ({}, None),
        ({"protocolVersion": 20250618}, None),
    ],
)
def test_the_negotiated_version_is_read_from_the_initialize_answer(
    result: dict[str, object], version: str | None
) -> None:
    """The initialize result names the session's version; one keyproxy cannot read is refused."""
    (message,) = parse_body(
        json.dumps({"jsonrpc": "2.0", "id": 1, "result": result}).encode()
    ).messages
    if version is None:
        with pytest.raises(MessageError, match="unsupported protocol version"):
            negotiated_version(message)
    else:
        assert negotiated_version(message) == version

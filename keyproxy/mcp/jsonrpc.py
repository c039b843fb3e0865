"""Strict reading of the JSON-RPC 2.0 messages MCP's Streamable HTTP transport carries.

A POST body, an SSE event's data, or a JSON answer body is read by `parse_body` into a
`Body` of `Message`s, or refused with a `MessageError` that says why. Nothing is guessed
(PRODUCT.md invariant 12): a body is refused when it is not UTF-8, is larger than the limit,
has an object member given twice at any depth, uses NaN/Infinity or a lone surrogate, is a
batch where the negotiated protocol version has none, or is not exactly a request, a
notification or a response.

    MessageError        the body cannot be read exactly; `code` is the JSON-RPC error code
                        (-32700 parse error, -32600 invalid request), `id` the request id
                        when one could be read, else None
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from keyproxy import strictjson

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602

# The revisions that use the Streamable HTTP transport, oldest first. The spec says a server
# that gets no MCP-Protocol-Version header "SHOULD assume protocol version 2025-03-26".
PROTOCOL_VERSIONS: Final = ("2025-03-26", "2025-06-18", "2025-11-25")
DEFAULT_PROTOCOL_VERSION: Final = "2025-03-26"
# JSON-RPC batches exist in 2025-03-26 only; 2025-06-18 removed them.
BATCH_VERSIONS: Final = frozenset({"2025-03-26"})

DEFAULT_MAX_BYTES: Final = 4 * 1024 * 1024

# An integer id beyond this cannot be held exactly by a JavaScript client or server, so two
# peers could read it as different ids.
_MAX_SAFE_INTEGER: Final = 2**53 - 1

_REQUEST_MEMBERS: Final = frozenset({"jsonrpc", "id", "method", "params"})
_NOTIFICATION_MEMBERS: Final = frozenset({"jsonrpc", "method", "params"})
_RESPONSE_MEMBERS: Final = frozenset({"jsonrpc", "id", "result", "error"})
_ERROR_MEMBERS: Final = frozenset({"code", "message", "data"})

Id: TypeAlias = str | int


class MessageError(Exception):
    """A body that cannot be read exactly. `message` is safe to show a client."""

    def __init__(self, message: str, *, code: int = INVALID_REQUEST, id: Id | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.id = id


class Kind(enum.Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message. `params` is {} when absent; `has_params` says whether it was sent.
    A response has `result` or `error` (the other is None) and no method."""

    kind: Kind
    method: str | None
    id: Id | None
    params: Mapping[str, Any]
    has_params: bool
    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Body:
    """What one POST body, SSE event or JSON answer carried: one message or a batch of them."""

    messages: tuple[Message, ...]
    batch: bool


def protocol_version(header: str | None) -> str:
    """The protocol version a request speaks, from its MCP-Protocol-Version header (the
    spec's default when absent); an unknown version is refused rather than guessed."""
    if header is None:
        return DEFAULT_PROTOCOL_VERSION
    if header not in PROTOCOL_VERSIONS:
        raise MessageError(f"unsupported MCP protocol version {header!r}")
    return header


def negotiated_version(message: Message) -> str:
    """The protocol version an initialize response settles on; an unknown one is refused
    (the session could not be read exactly)."""
    found = message.result.get("protocolVersion") if message.result is not None else None
    if not isinstance(found, str) or found not in PROTOCOL_VERSIONS:
        raise MessageError(
            f"initialize answered with unsupported protocol version {repr(found)[:64]}"
        )
    return found


def id_text(value: Id | None) -> str:
    """A JSON-RPC id as text for logs: a string id quoted, so "1" and 1 stay different."""
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """The JSON value in `data`, read strictly: UTF-8 only (no BOM), at most `max_bytes`, no
    member given twice in any object, no NaN/Infinity, no lone surrogate in any string."""
    if len(data) > max_bytes:
        raise MessageError(f"message larger than {max_bytes} bytes", code=PARSE_ERROR)
    try:
        return strictjson.loads(data)
    except ValueError as e:
        raise MessageError(str(e), code=PARSE_ERROR) from e


def parse_body(
    data: bytes, *, version: str = DEFAULT_PROTOCOL_VERSION, max_bytes: int = DEFAULT_MAX_BYTES
) -> Body:
    """One POST body (or SSE event data, or JSON answer) as its messages, read strictly.

    A batch is read only when `version` has batches; it must be non-empty, hold either only
    requests and notifications or only responses, never `initialize`, and no request id twice.
    """
    if version not in PROTOCOL_VERSIONS:
        raise MessageError(f"unsupported MCP protocol version {version!r}")
    value = loads(data, max_bytes=max_bytes)
    if isinstance(value, list):
        return Body(_parse_batch(value, version), batch=True)
    return Body((parse_message(value),), batch=False)


def _parse_batch(items: list[Any], version: str) -> tuple[Message, ...]:
    if version not in BATCH_VERSIONS:
        raise MessageError(f"JSON-RPC batches are not part of MCP {version}")
    if not items:
        raise MessageError("empty batch")
    messages = tuple(parse_message(item) for item in items)
    responses = sum(m.kind is Kind.RESPONSE for m in messages)
    if responses not in (0, len(messages)):
        raise MessageError("batch mixes responses with requests or notifications")
    if any(m.method == "initialize" for m in messages):
        raise MessageError("initialize must not be part of a batch")
    ids = [m.id for m in messages if m.kind is Kind.REQUEST]
    if len(set(map(id_text, ids))) != len(ids):
        raise MessageError("batch uses one request id twice")
    return messages


def parse_message(value: Any) -> Message:
    """One JSON value as exactly one of request, notification or response."""
    if not isinstance(value, dict):
        raise MessageError("message is not a JSON object")
    request_id = _read_id(value)
    if value.get("jsonrpc") != "2.0":
        raise MessageError('message without "jsonrpc": "2.0"', id=request_id)
    members = frozenset(value)
    if "method" in value:
        kind = Kind.REQUEST if "id" in value else Kind.NOTIFICATION
        allowed = _REQUEST_MEMBERS if kind is Kind.REQUEST else _NOTIFICATION_MEMBERS
        _only(members, allowed, request_id)
        method = value["method"]
        if not isinstance(method, str) or not method:
            raise MessageError("method is not a non-empty string", id=request_id)
        if kind is Kind.REQUEST and request_id is None:
            raise MessageError("request id is null")
        params = value.get("params", {})
        if not isinstance(params, dict):
            raise MessageError("params is not a JSON object", id=request_id)
        return Message(kind, method, request_id, params, "params" in value)
    _only(members, _RESPONSE_MEMBERS, request_id)
    if "id" not in value:
        raise MessageError("message is neither request, notification nor response")
    return _response(value, request_id)


def _response(value: dict[str, Any], request_id: Id | None) -> Message:
    if ("result" in value) == ("error" in value):
        raise MessageError("response needs exactly one of result and error", id=request_id)
    if "result" in value:
        if request_id is None:
            raise MessageError("result without a request id")
        if not isinstance(value["result"], dict):
            raise MessageError("result is not a JSON object", id=request_id)
        return Message(Kind.RESPONSE, None, request_id, {}, False, result=value["result"])
    error = value["error"]
    if (
        not isinstance(error, dict)
        or not frozenset(error) <= _ERROR_MEMBERS
        or type(error.get("code")) is not int
        or not isinstance(error.get("message"), str)
    ):
        raise MessageError("error is not {code: integer, message: string}", id=request_id)
    return Message(Kind.RESPONSE, None, request_id, {}, False, error=error)


def _read_id(value: dict[str, Any]) -> Id | None:
    """The id member: a string or an integer a JavaScript peer holds exactly; None when absent
    or null (a response to an unreadable request). A bool or a float is refused."""
    if "id" not in value or value["id"] is None:
        return None
    found = value["id"]
    if isinstance(found, str):
        return found
    if type(found) is int and abs(found) <= _MAX_SAFE_INTEGER:
        return found
    raise MessageError("id is neither a string nor a safe integer")


def _only(members: frozenset[str], allowed: frozenset[str], request_id: Id | None) -> None:
    extra = sorted(members - allowed)
    if extra:
        # Cut: a server's answer names it too, and the reason goes to the log (mcp_bad_answer).
        raise MessageError(f"unexpected member {extra[0][:64]!r}", id=request_id)

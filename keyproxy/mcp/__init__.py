"""MCP (Model Context Protocol) routes: reading JSON-RPC strictly, grants, list filtering.

Pure: no I/O. The proxy reads a POST body with `parse_body`, decides it with `decide`
(forwarding it only when allowed, else answering `Decision.answer()` itself), keeps the
list requests it sent as `Pending`, and filters the answer with `filter_json_answer` or a
`StreamFilter` over the SSE stream. `Call` holds the audit facts of each request.

    jsonrpc   strict JSON and JSON-RPC 2.0 reading, protocol versions, MessageError
    names     name_problem, uri_problem, SERVER_REQUESTS (foundation: config checks with them)
    grants    Grant, decide, decide_server_request, Refusal, Decision
    lists     Pending, filter_result, filter_json_answer
    sse       EventReader, StreamFilter
    audit     Call
"""

from keyproxy.mcp.audit import Call, call_of, session_label
from keyproxy.mcp.grants import (
    CLIENT_METHODS,
    Decision,
    Grant,
    Refusal,
    ResourceRule,
    decide,
    decide_server_request,
)
from keyproxy.mcp.jsonrpc import (
    BATCH_VERSIONS,
    DEFAULT_MAX_BYTES,
    DEFAULT_PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Body,
    Kind,
    Message,
    MessageError,
    id_text,
    loads,
    negotiated_version,
    parse_body,
    parse_message,
    protocol_version,
)
from keyproxy.mcp.lists import Pending, filter_json_answer, filter_result
from keyproxy.mcp.names import SERVER_REQUESTS, name_problem, uri_problem
from keyproxy.mcp.sse import Event, EventReader, Output, StreamFilter

__all__ = [
    "BATCH_VERSIONS",
    "CLIENT_METHODS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "SERVER_REQUESTS",
    "Body",
    "Call",
    "Decision",
    "Event",
    "EventReader",
    "Grant",
    "Kind",
    "Message",
    "MessageError",
    "Output",
    "Pending",
    "Refusal",
    "ResourceRule",
    "StreamFilter",
    "call_of",
    "decide",
    "decide_server_request",
    "filter_json_answer",
    "filter_result",
    "id_text",
    "loads",
    "name_problem",
    "negotiated_version",
    "parse_body",
    "parse_message",
    "protocol_version",
    "session_label",
    "uri_problem",
]

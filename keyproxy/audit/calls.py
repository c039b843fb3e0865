"""The audit events of MCP calls: one `mcp.call` event per JSON-RPC request an MCP route
read, beside the HTTP request's `request` event (same `request_id`).

Each names the method, the tool, prompt or resource it named, the JSON-RPC id, the MCP
session, the key version, and the caller's identity, task and token; never the arguments
(only whether there were any).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

from keyproxy.mcp import Call

_log = structlog.get_logger("keyproxy.audit")


def emit_calls(calls: Iterable[object], facts: Mapping[str, object], refused: str) -> None:
    """Write one `mcp.call` event per `keyproxy.mcp.Call` in `calls`, each with the request's
    `facts`; `refused` is the reason they were refused ("" when they were forwarded), and the
    event then a `warning`."""
    decision = {"decision": "deny", "reason": refused} if refused else {"decision": "allow"}
    log = _log.warning if refused else _log.info
    for call in calls:
        if isinstance(call, Call):
            log("mcp.call", **facts, **decision, **call.fields())

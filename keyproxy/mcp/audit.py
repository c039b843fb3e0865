"""The audit facts of one JSON-RPC request: what was called, never with what arguments.

call_of(message) -> Call
session_label(session) -> str   the session as events name it: a digest, never the id
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from keyproxy.mcp.jsonrpc import Message, id_text

# Characters of a method, id, name or URI a call's event keeps, the rest cut and marked "…":
# far beyond any real one, and short enough that every call, however long what a caller
# sent, stays a line `keyproxy audit --calls` reads (it skips a line of 1 MiB as no event).
MAX_SAID = 4096

# The params member that names what a method acts on.
_TARGET: dict[str, tuple[str, str]] = {
    "tools/call": ("tool", "name"),
    "prompts/get": ("prompt", "name"),
    "resources/read": ("resource", "uri"),
    "resources/subscribe": ("resource", "uri"),
    "resources/unsubscribe": ("resource", "uri"),
}


@dataclass(frozen=True)
class Call:
    """One request as an audit event sees it. `target_kind` is "tool", "prompt", "resource"
    or "" with `target` the name or URI it named; `has_arguments` says whether arguments were
    sent (they are never kept here)."""

    method: str
    id: str
    target_kind: str = ""
    target: str = ""
    has_arguments: bool = False

    def fields(self) -> dict[str, str | bool]:
        """The facts as audit event fields."""
        found: dict[str, str | bool] = {"mcp_method": self.method, "mcp_id": self.id}
        if self.target_kind:
            found[f"mcp_{self.target_kind}"] = self.target
        found["mcp_has_arguments"] = self.has_arguments
        return found


# completion/complete names its prompt or resource template in `ref`, by its type.
_REF_TARGET: dict[str, tuple[str, str]] = {
    "ref/prompt": ("prompt", "name"),
    "ref/resource": ("resource", "uri"),
}


def call_of(message: Message) -> Call:
    """The audit facts of a request (a notification or response has none worth a call)."""
    method = message.method or ""
    kind, member = _TARGET.get(method, ("", ""))
    named = message.params
    if method == "completion/complete":  # the prompt or template the grant was checked for
        ref = message.params.get("ref")
        named = ref if isinstance(ref, dict) else {}
        ref_type = named.get("type")
        kind, member = (
            _REF_TARGET.get(ref_type, ("", "")) if isinstance(ref_type, str) else ("", "")
        )
    target = named.get(member) if member else None
    arguments = message.params.get("arguments")
    return Call(
        method=_said(method),
        id=_said(id_text(message.id)),
        target_kind=kind if isinstance(target, str) else "",
        target=_said(target) if isinstance(target, str) else "",
        has_arguments=isinstance(arguments, dict) and bool(arguments),
    )


def session_label(session: str) -> str:
    """How an audit event names an MCP session: `sha256:` and the first 16 hex digits of
    the id's digest ("" for none). SECURITY: every caller of a route reaches its server with
    the same key, so a session id read from the log would let another caller join that
    session; the server's own id hashes to the same label, to match its logs."""
    if not session:
        return ""
    digest = hashlib.sha256(session.encode("utf-8", "surrogateescape")).hexdigest()
    return "sha256:" + digest[:16]


def _said(text: str) -> str:
    """`text`, cut at MAX_SAID characters."""
    return text if len(text) <= MAX_SAID else text[:MAX_SAID] + "…"

"""The audit facts of one JSON-RPC request: what was called, never with what arguments.

call_of(message) -> Call
"""

from __future__ import annotations

from dataclasses import dataclass

from keyproxy.mcp.jsonrpc import Message, id_text

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


def call_of(message: Message) -> Call:
    """The audit facts of a request (a notification or response has none worth a call)."""
    method = message.method or ""
    kind, member = _TARGET.get(method, ("", ""))
    target = message.params.get(member) if member else None
    arguments = message.params.get("arguments")
    return Call(
        method=method,
        id=id_text(message.id),
        target_kind=kind if isinstance(target, str) else "",
        target=target if isinstance(target, str) else "",
        has_arguments=isinstance(arguments, dict) and bool(arguments),
    )

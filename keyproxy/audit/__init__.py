"""The audit stream: log set-up and request records (`log`), MCP call events (`calls`), and
queries over the log (`query`)."""

from keyproxy.audit.calls import emit_calls
from keyproxy.audit.log import FLUSH_DELAY, RequestRecord, configure, emit, flush

__all__ = ["FLUSH_DELAY", "RequestRecord", "configure", "emit", "emit_calls", "flush"]

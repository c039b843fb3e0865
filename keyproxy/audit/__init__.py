"""The audit stream: log set-up and request records (`log`), and queries over the log
(`query`)."""

from keyproxy.audit.log import FLUSH_DELAY, RequestRecord, configure, emit, flush

__all__ = ["FLUSH_DELAY", "RequestRecord", "configure", "emit", "flush"]

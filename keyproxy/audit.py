"""The audit log: structlog JSON on stdout, one event per request.

`configure()` sets up structlog for the whole process. Every event passes through
`scrub_secrets`, the last line of defence: any registered key form (see keyproxy.secret) and
anything shaped like a JWT is replaced before rendering, wherever it hides in the event.
Code never puts secrets into events on purpose; this processor is for the mistake nobody saw.

`RequestRecord` collects the fields of one request as the pipeline learns them (invariant 9)
and `emit()` writes them as a single `request` event.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from keyproxy.secret import REDACTED, known_values

# Three base64url parts, the first an encoded JSON object ('{"' is 'eyJ').
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_JWT_REDACTED = "[REDACTED-JWT]"


def _scrub(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        for s in secrets:
            if s in value:
                value = value.replace(s, REDACTED)
        if "eyJ" in value:
            value = _JWT.sub(_JWT_REDACTED, value)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else is rendered as text by the JSON renderer; scrub that text instead.
    return _scrub(repr(value), secrets)


def scrub_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """structlog processor: redact known secret values and JWT-shaped strings."""
    secrets = known_values()
    return {k: _scrub(v, secrets) for k, v in event.items()}


def configure(stream: TextIO | None = None, level: str = "info") -> None:
    """Route structlog to `stream` (default stdout) as JSON lines, scrubbed."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_secrets,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        # Not cached: reconfiguring (tests, `keyproxy dev`) must reach loggers already made.
        cache_logger_on_first_use=False,
    )


@dataclass
class RequestRecord:
    """Everything one audit event says about one request. No query string, no secrets."""

    method: str
    path: str
    source: str
    route: str | None = None
    issuer: str | None = None
    subject: str | None = None
    token_id: str | None = None
    task: str | None = None
    exception_owner: str | None = None  # set for exception tokens: who answers for them
    policy: str | None = None
    decision: str = "deny"
    reason: str = ""
    key_version: int | None = None
    status: int = 0
    upstream_status: int | None = None
    duration_ms: float = 0.0


_log = structlog.get_logger("keyproxy.audit")


def emit(record: RequestRecord) -> None:
    _log.info("request", **asdict(record))

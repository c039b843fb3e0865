"""The audit log is JSON and its last-line-of-defence processor scrubs secrets."""

from __future__ import annotations

import io
import json

import structlog

from keyproxy import audit, secret
from keyproxy.secret import REDACTED, Secret

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLWJ5dGVz"


def test_known_secrets_and_jwts_are_scrubbed() -> None:
    """A registered key and a JWT-shaped string are replaced wherever they hide in an event."""
    value = "audit-test-key-0123456789"
    secret.register(value)
    event = {"msg": f"oops {value}", "nested": {"list": [value, JWT]}, "n": 3, "obj": Secret(value)}
    out = audit.scrub_secrets(None, "info", event)
    text = json.dumps(out)
    assert value not in text
    assert JWT not in text
    assert out["n"] == 3
    assert REDACTED in out["msg"]


def test_request_event_is_one_json_line() -> None:
    """emit() writes a single JSON object with the invariant-9 fields."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        record = audit.RequestRecord(method="POST", path="/v1/x", source="127.0.0.1")
        record.route, record.subject, record.key_version, record.status = "r", "s", 4, 200
        audit.emit(record)
    finally:
        structlog.configure(**previous)
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    for name in (
        "route",
        "method",
        "path",
        "status",
        "duration_ms",
        "key_version",
        "subject",
        "issuer",
        "task",
        "token_id",
        "source",
        "decision",
        "reason",
        "timestamp",
    ):
        assert name in event
    assert event["event"] == "request"

"""keyproxy.audit.log: JSON lines, and a last-line-of-defence processor that scrubs secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import fcntl
import io
import json
import logging
import secrets
import signal
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import structlog
import structlog.testing
from multidict import CIMultiDict, CIMultiDictProxy

from keyproxy import audit, headers, redact, secret
from keyproxy.audit import log as audit_log
from keyproxy.secret import REDACTED, Secret
from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.servers import new_key

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLWJ5dGVz"


def test_known_secrets_and_jwts_are_scrubbed() -> None:
    """A registered key and a JWT-shaped string are replaced wherever they hide in an event."""
    value = "audit-test-key-0123456789"
    secret.register(value)
    event = {"msg": f"oops {value}", "nested": {"list": [value, JWT]}, "n": 3, "obj": Secret(value)}
    out = redact.scrub_secrets(None, "info", event)
    text = json.dumps(out)
    assert value not in text
    assert JWT not in text
    assert out["n"] == 3
    assert REDACTED in out["msg"]


def test_a_secret_registered_later_is_scrubbed_from_texts_found_clean_before() -> None:
    """The index grows key by key (a 1,000-route start registers 1,000 keys) and forgets what
    it had found clean: a text logged clean once is redacted after its secret is registered;
    earlier keys, short ones and overlapping ones stay found, the longest replaced whole."""
    stamp = secrets.token_hex(8)
    # No run of 8 characters in common: a text holding one would hold a fragment of the other.
    first, later = f"first-{secrets.token_hex(8)}-0123456789", f"later-{stamp}-9876543210"
    text = f"upstream said {later}"
    secret.register(first)
    assert redact.scrub_secrets(None, "info", {"m": text})["m"] == text  # clean: remembered
    secret.register(later)
    longer = f"{later}-and-more"
    secret.register(longer, f"s{stamp[:7]}")  # 8 characters: the shortest registered
    out = redact.scrub_secrets(
        None, "info", {"m": text, "f": first, "l": f"x{longer}x", "s": f"[s{stamp[:7]}]"}
    )
    assert out == {
        "m": f"upstream said {REDACTED}",
        "f": REDACTED,
        "l": f"x{REDACTED}x",
        "s": f"[{REDACTED}]",
    }


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


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _record(n: int = 0) -> audit.RequestRecord:
    record = audit.RequestRecord(method="GET", path=f"/v1/models/{n}", source="127.0.0.1")
    record.route, record.issuer, record.subject = "r", "openbao", "agent-1"
    record.token_id, record.task, record.policy = "jti-1", "task-1", "p"
    record.decision, record.reason, record.key_version = "allow", "allowed", 2
    record.status, record.upstream_status, record.duration_ms = 200, 200, 1.5
    return record


def test_request_event_equals_what_the_structlog_chain_writes() -> None:
    """emit()'s direct path writes the same event, field for field and in the same order, as
    the configured processor chain (a bound context variable and a secret included)."""
    value = "audit-equal-key-0123456789"
    secret.register(value)
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        with structlog.contextvars.bound_contextvars(worker=4242):
            record = _record()
            record.subject = f"leaked {value}"
            audit.emit(record)
            structlog.get_logger("x").info("request", **dataclasses.asdict(record))
    finally:
        structlog.configure(**previous)
    fast, chain = (json.loads(line) for line in stream.getvalue().splitlines())
    stamps = [
        dt.datetime.fromisoformat(e.pop("timestamp").replace("Z", "+00:00")) for e in (fast, chain)
    ]
    assert abs((stamps[0] - stamps[1]).total_seconds()) < 5
    assert list(fast.items()) == list(chain.items())
    assert fast["worker"] == 4242
    assert fast["subject"] == f"leaked {REDACTED}"


def test_a_record_found_clean_is_written_as_the_chain_writes_it() -> None:
    """The second event with the same texts (rendered straight from the record) equals the
    first and the processor chain's, field for field and in order; a context variable named
    like the event's own fields does not repeat or replace them."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        # Names the event writes itself among others, in an order of their own.
        context = {"worker": 7, "level": "debug", "event": "x", "timestamp": "t", "zz": 1}
        with structlog.contextvars.bound_contextvars(**context):
            for _ in range(2):
                audit.emit(_record())
            structlog.get_logger("x").info("request", **dataclasses.asdict(_record()))
            big = _record()
            big.key_version = 2**70  # orjson refuses it: written all the same
            audit.emit(big)
    finally:
        structlog.configure(**previous)
    lines = stream.getvalue().splitlines()
    first, second, chain, last = (json.loads(line) for line in lines)
    for event in (first, second, chain):
        event.pop("timestamp")
    assert list(first.items()) == list(second.items()) == list(chain.items())
    assert (second["event"], second["level"], second["worker"]) == ("request", "info", 7)
    assert [lines[1].count(f'"{name}"') for name in ("level", "event", "timestamp")] == [1, 1, 1]
    assert last["key_version"] == 2**70


def test_a_record_with_other_text_is_written_in_ascii_as_the_chain_writes_it() -> None:
    """Text beyond ASCII, in the record or a context variable, is escaped as the standard
    library does, also when the record was found clean before."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    record = _record()
    record.subject = "agent-ü中"
    try:
        with structlog.contextvars.bound_contextvars(team="équipe"):
            audit.emit(record)
            audit.emit(record)
            structlog.get_logger("x").info("request", **dataclasses.asdict(record))
    finally:
        structlog.configure(**previous)
    lines = stream.getvalue().splitlines()
    assert all(line.isascii() for line in lines)
    first, second, chain = (json.loads(line) for line in lines)
    for event in (first, second, chain):
        event.pop("timestamp")
    assert list(first.items()) == list(second.items()) == list(chain.items())
    assert second["subject"] == "agent-ü中"


async def _written(stream: _CountingStream, writes: int) -> None:
    """Until the stream has had `writes` writes (the flush FLUSH_DELAY after a write)."""
    await eventually(
        lambda: stream.writes >= writes,
        "the lines were never written",
        within=5,
        interval=audit_log.FLUSH_DELAY,
    )


async def test_a_line_after_a_quiet_moment_is_written_at_once() -> None:
    """A line written when the stream has had no write for FLUSH_DELAY goes out at once,
    inside an event loop too: a lone request's event is not held back."""
    stream = _CountingStream()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        audit.emit(_record(1))
        assert stream.writes == 1
        assert json.loads(stream.getvalue())["path"] == "/v1/models/1"
    finally:
        structlog.configure(**previous)


async def test_events_after_a_write_are_written_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside an event loop, lines that follow a write within FLUSH_DELAY wait for the end
    of it, not just for the end of the turn, and then go out in one write, in order."""
    monkeypatch.setattr(audit_log, "FLUSH_DELAY", 0.5)  # longer than the loaded machine's hiccups
    stream = _CountingStream()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        for n in range(25):
            audit.emit(_record(n))
        await asyncio.sleep(0)  # the end of this turn of the loop
        for n in range(25, 50):
            audit.emit(_record(n))
        assert stream.writes == 1  # the first line only
        await _written(stream, 2)
        assert stream.writes == 2
        paths = [json.loads(line)["path"] for line in stream.getvalue().splitlines()]
        assert paths == [f"/v1/models/{n}" for n in range(50)]
    finally:
        structlog.configure(**previous)


def test_a_record_found_clean_is_scrubbed_after_its_secret_is_registered() -> None:
    """The memory of clean records is per set of secrets: a new secret is found in a record
    remembered clean before."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    value = f"audit-record-key-{secrets.token_hex(8)}"
    try:
        record = _record()
        record.subject = f"agent {value}"
        audit.emit(record)
        secret.register(value)
        audit.emit(record)
    finally:
        structlog.configure(**previous)
    first, second = (json.loads(line)["subject"] for line in stream.getvalue().splitlines())
    assert first == f"agent {value}"  # not a secret yet
    assert second == f"agent {REDACTED}"


def test_outside_an_event_loop_each_line_is_written_at_once() -> None:
    """The CLI and executor threads write each line immediately, in order."""
    stream = _CountingStream()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        audit.emit(_record(1))
        structlog.get_logger("x").warning("something")
        assert stream.writes == 2
    finally:
        structlog.configure(**previous)
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "request",
        "something",
    ]


def test_events_at_a_filtered_level_are_not_written() -> None:
    """configure(level=...) applies to request events as it does to the chain."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream, level="warning")
    try:
        audit.emit(_record())
    finally:
        structlog.configure(**previous)
    assert stream.getvalue() == ""


def test_what_orjson_refuses_is_still_written() -> None:
    """A lone surrogate (a JWT claim may decode to one), a huge integer and other text still
    make one valid JSON line, in ASCII."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        record = _record()
        record.subject = "agent-\ud800"
        record.task = "caf\u00e9"
        record.key_version = 2**70
        audit.emit(record)
    finally:
        structlog.configure(**previous)
    (line,) = stream.getvalue().splitlines()
    assert line.isascii()
    event = json.loads(line)
    assert event["task"] == "caf\u00e9"
    assert event["key_version"] == 2**70
    assert event["subject"] == "agent-\ud800"


async def test_lines_logged_while_a_write_is_due_share_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside an event loop, lines logged while a flush is already scheduled join it: one
    write for all of them."""
    monkeypatch.setattr(audit_log, "FLUSH_DELAY", 0.5)  # longer than the loaded machine's hiccups
    stream = _CountingStream()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        audit.emit(_record(0))
        audit.emit(_record(1))  # the flush for it is scheduled
        for n in range(2, 5):
            audit.emit(_record(n))
        assert stream.writes == 1
        await _written(stream, 2)
        assert stream.writes == 2
        assert len(stream.getvalue().splitlines()) == 5
    finally:
        structlog.configure(**previous)


class _FailingOnce(_CountingStream):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def write(self, text: str) -> int:
        if self.fail:
            self.fail = False
            raise OSError("disk full")
        return super().write(text)


def test_lines_of_a_failed_write_are_kept_for_the_next() -> None:
    """A write the stream refuses loses nothing: its lines go out with the next one."""
    stream = _FailingOnce()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        with pytest.raises(OSError, match="disk full"):
            audit.emit(_record(1))
        audit.emit(_record(2))
    finally:
        structlog.configure(**previous)
    paths = [json.loads(line)["path"] for line in stream.getvalue().splitlines()]
    assert paths == ["/v1/models/1", "/v1/models/2"]


def test_request_events_reach_structlogs_capture_logs() -> None:
    """A processor chain changed in place (structlog.testing.capture_logs) is honoured."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        with structlog.testing.capture_logs() as captured:
            audit.emit(_record(3))
    finally:
        structlog.configure(**previous)
    assert [e["path"] for e in captured if e["event"] == "request"] == ["/v1/models/3"]
    assert stream.getvalue() == ""


def test_a_refusal_is_a_warning_and_an_allowed_request_is_info() -> None:
    """Denied requests are logged at warning, so a level filter can keep them without the
    allowed traffic; at level warning only they are written."""
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream, level="warning")
    try:
        allowed, denied = _record(1), _record(2)
        allowed.decision, denied.decision = "allow", "deny"
        audit.emit(allowed)
        audit.emit(denied)
    finally:
        structlog.configure(**previous)
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert (event["level"], event["decision"]) == ("warning", "deny")


def test_a_request_id_holding_a_secret_is_scrubbed_in_a_record_found_clean() -> None:
    """The request id is checked on its own, so a record whose other texts were found clean
    still has a secret in its id redacted; a clean id is written as it is."""
    key = "sk-audit-" + secrets.token_urlsafe(24)
    secret.register(key)
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        for request_id in ("req-1", f"x{key}", "req-2"):
            record = _record()
            record.request_id = request_id
            audit.emit(record)
    finally:
        structlog.configure(**previous)
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
    assert ids == ["req-1", f"x{REDACTED}", "req-2"]


def test_a_callers_id_shaped_like_a_generated_one_is_still_scrubbed() -> None:
    """Only an id keyproxy generated skips the scrubber: a caller's id of 32 hex digits (as
    generated ones are) that is a key is redacted."""
    key = secrets.token_hex(16)
    secret.register(key)
    sent = headers.request_id(CIMultiDictProxy(CIMultiDict({headers.REQUEST_ID: key})))
    made = headers.request_id(CIMultiDictProxy(CIMultiDict()))
    assert sent == key
    assert type(sent) is str
    assert type(made) is headers.GeneratedId
    stream = io.StringIO()
    previous = structlog.get_config()
    audit.configure(stream)
    try:
        for request_id in (sent, made):
            record = _record()
            record.request_id = request_id
            audit.emit(record)
    finally:
        structlog.configure(**previous)
    ids = [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]
    assert ids == [REDACTED, made]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("no_color", "coloured"), [("", True), ("1", False)])
def test_a_terminal_gets_the_console_form_in_colour_unless_no_color(
    monkeypatch: pytest.MonkeyPatch, no_color: str, coloured: bool
) -> None:
    """With console=True, events (keyproxy's and the standard library's) are written in
    structlog's console form, scrubbed, with colours only when NO_COLOR is not set, and
    controls in their values written as escapes (a terminal would obey them)."""
    key = "sk-console-" + secrets.token_urlsafe(24)
    secret.register(key)
    if no_color:
        monkeypatch.setenv("NO_COLOR", no_color)
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    stream = _Terminal()
    previous = structlog.get_config()
    audit.configure(stream, level="info", console=True)
    try:
        structlog.get_logger("x").warning("vault.login_failed", detail=key)
        structlog.get_logger("x").warning("token.refused", task="a\x1b]0;OWNED\x07b\u202e")
        audit.emit(_record())
        import logging  # noqa: PLC0415  # the standard library's records, rendered the same

        logging.getLogger("aiohttp.server").warning("from the standard library")
        audit.flush()
    finally:
        structlog.configure(**previous)
    text = stream.getvalue()
    assert "vault.login_failed" in text
    assert "from the standard library" in text
    assert "request" in text
    assert key not in text
    assert not text.lstrip().startswith("{")
    assert ("\x1b[" in text) is coloured
    assert "a\\u001b]0;OWNED\\u0007b\\u202e" in text
    assert "\x1b]" not in text


def test_standard_library_records_come_out_as_scrubbed_json(audit_log: Path) -> None:
    """A record of any library's logger, traceback included, is one JSON line of the audit
    stream with registered secrets and JWT-shaped text redacted."""
    key = new_key()
    secret.register(key)
    jwtish = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln"
    before = len(audit_log.read_text().splitlines())
    logging.getLogger("aiohttp.server").error("Error handling request %s", key)
    try:
        _refuse(f"bad header {jwtish} {key}")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception")
    logging.getLogger("hvac.adapters").warning("%s", {"token": key})
    audit.flush()
    lines = audit_log.read_text().splitlines()[before:]
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert [e["logger"] for e in events] == ["aiohttp.server", "asyncio", "hvac.adapters"]
    assert [e["level"] for e in events] == ["error", "error", "warning"]
    assert "ValueError: bad header" in events[1]["exception"]
    assert key not in "\n".join(lines)
    assert jwtish not in "\n".join(lines)


def _refuse(text: str) -> None:
    raise ValueError(text)


_BLOCKED_WRITER = """
import signal, structlog
from keyproxy import audit
signal.signal(signal.SIGUSR1, lambda *_: None)
audit.configure()
structlog.get_logger("keyproxy.audit").info("big", pad="x" * 1_000_000)
structlog.get_logger("keyproxy.audit").info("after")
"""


@pytest.mark.parametrize("unbuffered", [True, False])
def test_a_signal_during_a_blocked_write_cuts_no_line(unbuffered: bool) -> None:
    """A signal (a reload's SIGHUP, a stop's SIGTERM) reaching a process whose write to
    stdout waits on a full pipe makes the write return part done: every line still comes
    out whole, and the lines after it too (Python's streams dropped the rest of the write)."""
    argv = [sys.executable, *(["-u"] if unbuffered else []), "-c", _BLOCKED_WRITER]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as child:
        assert child.stdout is not None
        pipe = child.stdout.fileno()
        full = fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ)

        def queued() -> int:
            return int.from_bytes(fcntl.ioctl(pipe, termios.FIONREAD, bytes(4)), sys.byteorder)

        # Full, with the megabyte line's write not done: the writer waits inside it.
        eventually_blocking(queued, "the writer fills the pipe", until=lambda n: n == full)
        child.send_signal(signal.SIGUSR1)
        out, _ = child.communicate(timeout=30)
    events = [json.loads(line)["event"] for line in out.decode().splitlines()]
    assert events == ["big", "after"]

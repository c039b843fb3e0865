"""The audit log: structlog JSON on stdout, one event per request.

`configure()` sets up structlog for the whole process. Every event passes through
`keyproxy.redact.scrub_secrets`, the last line of defence, before it is rendered.

`RequestRecord` collects the fields of one request as the pipeline learns them (invariant 9)
and `emit()` writes them as a single `request` event. That event is on every request's path,
so `emit()` runs the same steps as the processor chain below without structlog's per-call
machinery (a test holds the two outputs equal). A line is written at once unless the stream
had a write less than FLUSH_DELAY (1 ms) ago; inside an event loop it then waits for the end
of that delay and goes out with the others of it: a burst of requests costs one write system
call (one per 4 KiB to a pipe: keyproxy.audit.lines), not one each, and a lone request's line
is not held back.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import datetime
import json
import logging
import operator
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
import structlog

from keyproxy import redact, text
from keyproxy.audit.lines import WholeLines
from keyproxy.headers import GeneratedId
from keyproxy.redact import scrub_secrets


def _json(event: Any, **_: Any) -> str:
    """One compact JSON line in ASCII, whatever stdout's encoding: orjson for the common
    case; the standard library (which escapes) for other text and for what orjson refuses
    (a lone surrogate from a decoded claim, an integer beyond 64 bits). Values are scalars,
    lists and dicts by now: scrub_secrets turned anything else into text."""
    try:
        line = orjson.dumps(event).decode()
    except orjson.JSONEncodeError:
        line = ""
    if line and line.isascii():
        return line
    return json.dumps(event, separators=(",", ":"), default=repr)


# How long a line may wait inside an event loop for others to share its write. Under load a
# write per request (a system call, and a flush of unbuffered stdout) cost more than building
# the event; this is also the most a SIGKILL can take with it.
FLUSH_DELAY = 0.001


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Sink:
    """The audit stream, as structlog's logger. A line is written at once when the stream
    has had no write for FLUSH_DELAY. Otherwise, inside an event loop, it is kept and
    written with every line that comes meanwhile when that delay is over, in one write and
    one flush (stdout is often unbuffered: PYTHONUNBUFFERED in containers). Outside one (the
    CLI, executor threads) a line is written at once, after any that were waiting."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._out = WholeLines(stream)
        self._lock = threading.Lock()  # Vault calls log from executor threads
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None
        self._quiet_until = 0.0  # monotonic time FLUSH_DELAY after the last write

    def msg(self, message: str) -> None:
        self.line(message)

    def line(self, message: str) -> None:
        """Write `message` (after any waiting) now, or keep it for the shared write."""
        loop = _running_loop()
        with self._lock:
            self._pending.append(message)
            wait = self._quiet_until - time.monotonic()
            if loop is None or wait <= 0:
                self._write_pending()
            elif self._flush_on is not loop:  # else the flush already scheduled writes it
                self._flush_on = loop
                loop.call_later(wait, self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        lines, self._pending, self._flush_on = self._pending, [], None
        if not lines or self._stream.closed:
            return
        self._quiet_until = time.monotonic() + FLUSH_DELAY
        # Not lost if it fails: what it did not write goes first with the next (lines.py).
        self._out.write("\n".join(lines) + "\n")


class _SinkFactory:
    """structlog's logger factory: always the one sink. It also carries the formatter of the
    standard library's records of the same set-up, so both kinds are rendered alike."""

    def __init__(self, sink: _Sink, formatter: logging.Formatter) -> None:
        self.sink = sink
        self.formatter = formatter

    def __call__(self, *args: Any) -> _Sink:
        return self.sink


@dataclass(frozen=True)
class _Setup:
    """What `configure()` installed, so `emit()` can tell it is still in place."""

    processors: list[Any]
    snapshot: tuple[Any, ...]  # the list as configured: structlog.testing changes it in place
    wrapper: Any
    factory: _SinkFactory
    request_events: bool  # whether the level lets `info` through
    console: bool = False  # rendered for a person: emit() takes structlog's own path


_setup: _Setup | None = None


def _shown_values(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The event with controls in its text written as escapes (keyproxy.text.shown)."""
    return {key: text.shown(v) if isinstance(v, str) else v for key, v in event.items()}


def configure(stream: TextIO | None = None, level: str = "info", *, console: bool = False) -> None:
    """Route structlog, and every standard-library log record (aiohttp, asyncio, hvac,
    urllib3, ...), to `stream` (default stdout) as JSON lines, all through the same scrubbing
    chain. With `console` (a person reading a terminal) lines are structlog's console form
    instead, in colour unless NO_COLOR is set or the stream is not a terminal."""
    global _setup  # noqa: PLW0603  # one process-wide logging set-up, like structlog's own
    out = stream or sys.stdout
    renderer: Any = structlog.processors.JSONRenderer(serializer=_json)
    escape: list[Any] = []
    if console:
        colors = out.isatty() and not os.environ.get("NO_COLOR")
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
        escape = [_shown_values]  # a terminal obeys what JSON would have escaped
    # After scrubbing: the time stamp is ours, holding nothing, and never the same twice (the
    # scrubber remembers texts it found clean; this one would only crowd them out).
    tail: list[Any] = [
        structlog.processors.format_exc_info,
        scrub_secrets,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *escape,
        renderer,
    ]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        *tail,
    ]
    flush()  # what the previous set-up still holds goes to its own stream
    factory = _SinkFactory(_Sink(out), _formatter(tail))
    wrapper = structlog.make_filtering_bound_logger(level)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        # Not cached: reconfiguring (tests, `keyproxy dev`) must reach loggers already made.
        cache_logger_on_first_use=False,
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    _route_stdlib(factory, threshold)
    _setup = _Setup(
        processors, tuple(processors), wrapper, factory, threshold <= logging.INFO, console
    )


class _StdlibHandler(logging.Handler):
    """Standard-library log records, rendered by structlog's ProcessorFormatter into the
    audit stream. They follow the set-up structlog writes with now (tests put a previous one
    back by structlog.configure alone), so both kinds of events always share one stream and
    one form. A record that cannot be formatted is reported by its logger's name and level
    only: logging's own fallback would print its message and arguments to stderr."""

    def __init__(self, factory: _SinkFactory) -> None:
        super().__init__()
        self.factory = factory

    def emit(self, record: logging.LogRecord) -> None:
        factory = structlog.get_config()["logger_factory"]
        if not isinstance(factory, _SinkFactory):
            factory = self.factory
        try:
            line = factory.formatter.format(record)
        except Exception:  # noqa: BLE001  # whatever broke, the record's text must not leak
            line = _json(
                {
                    "event": "log_record_unformattable",
                    "logger": record.name,
                    "level": record.levelname.lower(),
                }
            )
        factory.sink.line(line)


def _formatter(tail: list[Any]) -> logging.Formatter:
    """Standard-library records through the processors of `tail`, after the steps
    structlog's own events take first (context, level, and the logger's name)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )


def _route_stdlib(factory: _SinkFactory, threshold: int) -> None:
    """Send every record reaching the root logger to the set-up of `factory`."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibHandler(factory))
    root.setLevel(threshold)


def flush() -> None:
    """Write out the lines waiting for their FLUSH_DELAY (at exit, too): those of the last
    set-up, and of the one structlog writes to now if another was put back."""
    sinks = [_setup.factory.sink] if _setup is not None else []
    factory = structlog.get_config()["logger_factory"]
    if isinstance(factory, _SinkFactory) and factory.sink not in sinks:
        sinks.append(factory.sink)
    for sink in sinks:
        sink.flush()


atexit.register(flush)


@dataclass(slots=True)  # no attribute outside the fields below can reach the event
class RequestRecord:
    """Everything one audit event says about one request. No query string, no secrets."""

    method: str
    path: str
    source: str
    request_id: str = ""
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
    key_fingerprint: str | None = None  # of the key that version holds (KeyVersion's)
    status: int = 0
    upstream_status: int | None = None
    duration_ms: float = 0.0
    config: str | None = None  # the short hash of the configuration the request ran under
    limit: str | None = None  # the configured limit that refused the request
    # A delegated token's: its token ids from the root ("root,child,..."), and who acted at
    # each delegation ("issuer|subject,..."), in order. None for any other caller.
    chain: str | None = None
    actors: str | None = None


_log = structlog.get_logger("keyproxy.audit")


def _timestamp() -> str:
    """Now in UTC as TimeStamper(fmt="iso", utc=True) writes it (always with microseconds)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


_NAMES = tuple(f.name for f in dataclasses.fields(RequestRecord))
_VALUES = operator.attrgetter(*_NAMES)
# The record's text fields, read in one call: once their tuple is found clean, an event with
# the same texts skips the scan of each. Every other field must be a number (or None), which
# has nothing to scrub: a field of any other type would need its own place in that tuple.
_TEXT_TYPES, _NUMBER_TYPES = {"str", "str | None"}, {"int", "int | None", "float"}
# The request id is left out: it differs for every request, so a tuple holding it would never
# be found again. It is checked on its own (`_clean_id`).
_TEXTS = operator.attrgetter(
    *(
        f.name
        for f in dataclasses.fields(RequestRecord)
        if f.type in _TEXT_TYPES and f.name != "request_id"
    )
)
if not all(f.type in _TEXT_TYPES | _NUMBER_TYPES for f in dataclasses.fields(RequestRecord)):
    raise TypeError("RequestRecord fields must be text or numbers (see audit._TEXTS)")
_FIELDS = frozenset(_NAMES) | {"event"}
_RECORD_TEXTS_MAX = 1024  # characters: records with longer texts are scanned every time


def emit(record: RequestRecord) -> None:
    """Write the request's audit event (at `warning` for a refusal, else `info`)."""
    setup = _setup
    level = "info" if record.decision == "allow" else "warning"
    config = structlog.get_config()
    if (
        setup is None
        or config["processors"] is not setup.processors
        or config["logger_factory"] is not setup.factory
        or config["wrapper_class"] is not setup.wrapper
        or tuple(setup.processors) != setup.snapshot
        or setup.console
    ):
        # structlog was set up by someone else: let it do everything.
        getattr(_log, level)("request", **dict(zip(_NAMES, _VALUES(record), strict=True)))
        return
    if level == "info" and not setup.request_events:
        return
    # The processor chain of configure(), step by step, for an event of scalar fields.
    # Measured, not assumed: the request event through structlog's own chain (the branch
    # above) cost 933,000 instructions per request against 807,000 this way (+15.6%,
    # bench/instructions.py --compare, docs/performance.md).
    known = redact.current().clean  # of this moment (see _Redactor.text)
    texts = _TEXTS(record)
    # A record whose texts were found clean is rendered as it is (orjson writes a dataclass's
    # fields in order); any other is scrubbed first. Remembering them buys 147,000
    # instructions per request (17.8%, bench/instructions.py --compare).
    fields = ""
    if texts in known.records and _clean_id(record.request_id):
        try:
            fields = orjson.dumps(record).decode()
        except orjson.JSONEncodeError:  # an integer beyond 64 bits: rendered as below
            fields = ""
    if not fields or not fields.isascii():
        fields = _scrubbed(record, texts, known)
    context = structlog.contextvars.get_contextvars()
    if context:
        # Context variables fill in names the event does not have, in their order
        # (merge_contextvars); level and timestamp are then set, where a variable of that
        # name already stands or else last (add_log_level, TimeStamper).
        rest = scrub_secrets(None, level, {k: v for k, v in context.items() if k not in _FIELDS})
        rest["level"] = level
        rest["timestamp"] = _timestamp()
        line = f'{fields[:-1]},"event":"request",{_json(rest)[1:]}'
    else:
        line = f'{fields[:-1]},"event":"request","level":"{level}","timestamp":"{_timestamp()}"}}'
    setup.factory.sink.line(line)


def _clean_id(request_id: str) -> bool:
    """Whether a request id holds nothing to redact (a caller chooses its own: it could be a
    credential; one keyproxy generated holds nothing)."""
    return type(request_id) is GeneratedId or redact.current().text(request_id) is request_id


def _scrubbed(record: RequestRecord, texts: tuple[Any, ...], known: redact.Clean) -> str:
    """The record's fields as a JSON object, scrubbed; remembered as clean if they were."""
    event = dict(zip(_NAMES, _VALUES(record), strict=True))
    scrubbed = scrub_secrets(None, "info", event)
    if scrubbed == event and sum(len(t) for t in texts if t) <= _RECORD_TEXTS_MAX:
        if len(known.records) >= redact.CLEAN_MAX:
            known.records.clear()
        known.records.add(texts)
    return _json(scrubbed)

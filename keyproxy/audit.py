"""The audit log: structlog JSON on stdout, one event per request.

`configure()` sets up structlog for the whole process. Every event passes through
`scrub_secrets`, the last line of defence: any registered key form (see keyproxy.secret) and
anything shaped like a JWT is replaced before rendering, wherever it hides in the event.
Code never puts secrets into events on purpose; this processor is for the mistake nobody saw.

`RequestRecord` collects the fields of one request as the pipeline learns them (invariant 9)
and `emit()` writes them as a single `request` event. That event is on every request's path,
so `emit()` runs the same steps as the processor chain below without structlog's per-call
machinery (a test holds the two outputs equal), and inside an event loop lines wait up to
FLUSH_DELAY (1 ms) and go out together: a burst of requests costs one write system call,
not one each. The proxy asks for its lines at once (`now`) when no request is in flight.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import logging
import operator
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from keyproxy.secret import REDACTED, known_values

# Three base64url parts, the first an encoded JSON object ('{"' is 'eyJ').
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_JWT_REDACTED = "[REDACTED-JWT]"
# Window length of the secret index. Any string of at least 2 * _GRAM - 1 characters contains
# a whole window at an offset that is a multiple of _GRAM, wherever it starts: so a text is
# searched by looking up one window in every _GRAM characters. The registry holds no value
# shorter than 8 characters; shorter ones would be compared one by one.
_GRAM = 4
_CLEAN_MAX = 8192  # texts remembered as clean, per set of secrets
_CLEAN_LEN = 256  # longer texts are scanned every time, not remembered


class _Clean:
    """What was found clean under one set of secrets: texts, and the text fields of whole
    request records. Replaced whole when a secret is added, so a scan that began before
    cannot write into the new one."""

    __slots__ = ("records", "texts")

    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.records: set[tuple[Any, ...]] = set()


class _Redactor:
    """The known secret values, indexed so that a search costs the same for ten values or ten
    thousand: one dict look-up per `_GRAM` characters of text.

    It remembers texts found clean (no secret, no JWT), since an audit event repeats most of
    its values (route, subject, policy, reason); it never keeps a text that held a secret, and
    forgets them all when a secret is added.
    """

    def __init__(self) -> None:
        self.secrets: frozenset[str] = frozenset()
        self._windows: dict[str, frozenset[str]] = {}
        self._short: tuple[str, ...] = ()
        self.clean = _Clean()
        self._lock = threading.Lock()

    def update(self, secrets: frozenset[str]) -> None:
        """Index the values of `secrets` not indexed yet (the registry only grows), rather
        than rebuilding the index for every new key (1,000 routes started in 21 s of CPU).
        Readers take no lock: each window's set is replaced whole, never changed in place."""
        with self._lock:
            if secrets <= self.secrets:
                return  # nothing new (another thread may have indexed a later set already)
            short = list(self._short)
            for value in secrets - self.secrets:
                if len(value) < 2 * _GRAM - 1:
                    short.append(value)
                    continue
                for i in range(len(value) - _GRAM + 1):
                    window = value[i : i + _GRAM]
                    self._windows[window] = self._windows.get(window, frozenset()) | {value}
            self._short = tuple(short)
            self.clean = _Clean()  # a text found clean before may hold a new value
            self.secrets = secrets

    def text(self, value: str) -> str:
        # The set of this moment: a text scanned before a new secret was indexed goes into
        # the set that update() throws away, never into the fresh one.
        clean = self.clean.texts
        if value in clean:
            return value
        out = value
        for found in self._candidates(value):
            if found in out:
                out = out.replace(found, REDACTED)
        if "eyJ" in out:
            out = _JWT.sub(_JWT_REDACTED, out)
        if out is value and len(value) <= _CLEAN_LEN:
            if len(clean) >= _CLEAN_MAX:
                clean.clear()
            clean.add(value)
        return out

    def _candidates(self, value: str) -> list[str]:
        """Secrets that may occur in `value`, longest first (so a longer one is replaced
        whole before a shorter one it contains)."""
        windows = self._windows
        found: set[str] = set()
        for i in range(0, len(value) - _GRAM + 1, _GRAM):
            hit = windows.get(value[i : i + _GRAM])
            if hit is not None:
                found |= hit
        found.update(self._short)
        return sorted(found, key=len, reverse=True) if found else []


_current = _Redactor()


def _redactor() -> _Redactor:
    """The redactor, brought up to date with the registry when it has grown."""
    secrets = known_values()
    if _current.secrets is not secrets:
        _current.update(secrets)
    return _current


def _scrub(value: Any, redactor: _Redactor) -> Any:
    if isinstance(value, str):
        return redactor.text(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, redactor) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, redactor) for v in value]
    # Anything else is rendered as text by the JSON renderer; scrub that text instead.
    return redactor.text(repr(value))


def scrub_secrets(_: WrappedLogger, __: str, event: EventDict) -> dict[str, Any]:
    """structlog processor: redact known secret values and JWT-shaped strings."""
    redactor = _redactor()
    clean = redactor.clean.texts
    out: dict[str, Any] = {}
    for name, value in event.items():
        # Most values of a request event are short strings seen before, or numbers.
        kind = type(value)
        if kind is str:
            out[name] = value if value in clean else redactor.text(value)
        elif kind is int or kind is float or value is None:
            out[name] = value
        else:
            out[name] = _scrub(value, redactor)
    return out


def _json(event: Any, **_: Any) -> str:
    """One compact JSON line in ASCII, whatever stdout's encoding: orjson for the common
    case; the standard library (which escapes) for other text and for what orjson refuses
    (a lone surrogate from a decoded claim, an integer beyond 64 bits). Values are scalars,
    lists and dicts by now: scrub_secrets turned anything else into text."""
    try:
        text = orjson.dumps(event).decode()
    except orjson.JSONEncodeError:
        text = ""
    if text and text.isascii():
        return text
    return json.dumps(event, separators=(",", ":"), default=repr)


_KEPT_ON_FAILURE = 100_000  # lines kept for another try when the stream refuses a write
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
    """The audit stream, as structlog's logger. Inside an event loop, lines are kept and
    written together FLUSH_DELAY later, in one write and one flush (stdout is often
    unbuffered: PYTHONUNBUFFERED in containers). Outside one (the CLI, executor threads) a
    line is written at once, after any that were waiting."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # Vault calls log from executor threads
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def msg(self, message: str) -> None:
        self.line(message)

    def line(self, message: str, *, now: bool = False) -> None:
        """Keep `message` for the shared write, or with `now` write it and all waiting."""
        loop = None if now else _running_loop()
        with self._lock:
            self._pending.append(message)
            if loop is None:
                self._write_pending()
            elif self._flush_on is not loop:  # else the flush already scheduled writes it
                self._flush_on = loop
                loop.call_later(FLUSH_DELAY, self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        lines, self._pending, self._flush_on = self._pending, [], None
        if not lines or self._stream.closed:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except BaseException:
            # Not lost with the failed write: tried again with the next line. Bounded, so a
            # stream that stays broken cannot hold the whole process's memory.
            self._pending = (lines + self._pending)[-_KEPT_ON_FAILURE:]
            raise


class _SinkFactory:
    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

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


_setup: _Setup | None = None


def configure(stream: TextIO | None = None, level: str = "info") -> None:
    """Route structlog to `stream` (default stdout) as JSON lines, scrubbed."""
    global _setup  # noqa: PLW0603  # one process-wide logging set-up, like structlog's own
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
        scrub_secrets,
        # After scrubbing: ours, holding nothing, and never the same twice (the scrubber
        # remembers texts it found clean; this one would only crowd them out).
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.JSONRenderer(serializer=_json),
    ]
    flush()  # what the previous set-up still holds goes to its own stream
    factory = _SinkFactory(_Sink(stream or sys.stdout))
    wrapper = structlog.make_filtering_bound_logger(level)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        # Not cached: reconfiguring (tests, `keyproxy dev`) must reach loggers already made.
        cache_logger_on_first_use=False,
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    _setup = _Setup(processors, tuple(processors), wrapper, factory, threshold <= logging.INFO)


def flush() -> None:
    """Write out the lines waiting for their FLUSH_DELAY (at exit, too)."""
    if _setup is not None:
        _setup.factory.sink.flush()


atexit.register(flush)


@dataclass(slots=True)  # no attribute outside the fields below can reach the event
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


_second: list[Any] = [None, ""]  # the second last formatted, and its text


def _timestamp() -> str:
    """Now in UTC as TimeStamper(fmt="iso", utc=True) writes it, formatting the date and time
    of day once per second."""
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{micros:06d}Z"


_NAMES = tuple(f.name for f in dataclasses.fields(RequestRecord))
_VALUES = operator.attrgetter(*_NAMES)
# The record's text fields, read in one call: once their tuple is found clean, an event with
# the same texts skips the scan of each. Every other field must be a number (or None), which
# has nothing to scrub: a field of any other type would need its own place in that tuple.
_TEXT_TYPES, _NUMBER_TYPES = {"str", "str | None"}, {"int", "int | None", "float"}
_TEXTS = operator.attrgetter(
    *(f.name for f in dataclasses.fields(RequestRecord) if f.type in _TEXT_TYPES)
)
if not all(f.type in _TEXT_TYPES | _NUMBER_TYPES for f in dataclasses.fields(RequestRecord)):
    raise TypeError("RequestRecord fields must be text or numbers (see audit._TEXTS)")
_FIELDS = frozenset(_NAMES) | {"event"}
_RECORD_TEXTS_MAX = 1024  # characters: records with longer texts are scanned every time


def emit(record: RequestRecord, *, now: bool = False) -> None:
    """Write the request's audit event; with `now`, at once, with any lines waiting (the
    caller knows the loop has nothing else to do)."""
    setup = _setup
    config = structlog.get_config()
    if (
        setup is None
        or config["processors"] is not setup.processors
        or config["logger_factory"] is not setup.factory
        or config["wrapper_class"] is not setup.wrapper
        or tuple(setup.processors) != setup.snapshot
    ):
        # structlog was set up by someone else: let it do everything.
        _log.info("request", **dict(zip(_NAMES, _VALUES(record), strict=True)))
        return
    if not setup.request_events:
        return
    # The processor chain of configure(), step by step, for an event of scalar fields.
    known = _redactor().clean  # of this moment (see _Redactor.text)
    texts = _TEXTS(record)
    # A record whose texts were found clean is rendered as it is (orjson writes a dataclass's
    # fields in order); any other is scrubbed first.
    fields = ""
    if texts in known.records:
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
        rest = scrub_secrets(None, "info", {k: v for k, v in context.items() if k not in _FIELDS})
        rest["level"] = "info"
        rest["timestamp"] = _timestamp()
        line = f'{fields[:-1]},"event":"request",{_json(rest)[1:]}'
    else:
        line = f'{fields[:-1]},"event":"request","level":"info","timestamp":"{_timestamp()}"}}'
    setup.factory.sink.line(line, now=now)


def _scrubbed(record: RequestRecord, texts: tuple[Any, ...], known: _Clean) -> str:
    """The record's fields as a JSON object, scrubbed; remembered as clean if they were."""
    event = dict(zip(_NAMES, _VALUES(record), strict=True))
    scrubbed = scrub_secrets(None, "info", event)
    if scrubbed == event and sum(len(t) for t in texts if t) <= _RECORD_TEXTS_MAX:
        if len(known.records) >= _CLEAN_MAX:
            known.records.clear()
        known.records.add(texts)
    return _json(scrubbed)

"""Reading an MCP server's SSE answer stream event by event, and filtering it to the grant.

    EventReader().feed(chunk) -> list[Event]       each complete event with its exact bytes
    StreamFilter(grant, version, pending).feed(chunk) -> Output

The reader follows the WHATWG event-stream rules (lines end in CRLF, LF or CR; a blank line
ends an event; "data" lines are joined with LF; one space after the colon is dropped; an "id"
holding NUL is ignored; other fields are ignored), and is strict where a lenient reader and
the caller's could disagree: the stream must be UTF-8 with no byte order mark, and an event
is bounded in size. An incomplete event at the end of the stream is dropped, as the rules say.

It is written here rather than taken from an SSE library because the filter must re-emit
every event it does not change byte for byte, which needs each event's exact bytes; the
decoders at hand (httpx-sse, httpx2's) yield only the parsed fields and are tied to their
HTTP clients.

The filter parses each "message" event's data as JSON-RPC (strictly; an unreadable one stops
the stream), replaces a response to a pending list request with the filtered one, withholds
server-to-client requests the route does not allow (returned so the proxy can answer the
server), and passes everything else through unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Final

from keyproxy.mcp.grants import Grant, Refusal, decide_server_request
from keyproxy.mcp.jsonrpc import (
    DEFAULT_MAX_BYTES,
    Kind,
    Message,
    MessageError,
    parse_body,
)
from keyproxy.mcp.lists import Pending, as_json, filter_message, shown

_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_BOM: Final = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Event:
    """One complete event: `raw` its exact bytes (up to and including the blank line that
    ended it), `lines` the raw lines with their endings, the fields as the rules read them."""

    raw: bytes
    lines: tuple[bytes, ...]
    event: str = "message"
    data: str | None = None
    id: str | None = None


class EventReader:
    """Cuts a byte stream into events, however the bytes are split into chunks."""

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max = max_event_bytes
        self._buffer = bytearray()
        self._checked = 0  # bytes at the buffer's start known to hold no line end
        self._lines: list[bytes] = []
        self._size = 0
        self._head = b""  # the stream's first bytes, until a BOM is ruled out

    def feed(self, chunk: bytes) -> list[Event]:
        """The events `chunk` completes, in order."""
        if len(self._head) < len(_BOM):
            # SECURITY: however the first bytes are cut into chunks: a client's decoder strips
            # a BOM and reads the first line's field, which here would be an unknown one.
            self._head = (self._head + chunk)[: len(_BOM)]
            if self._head == _BOM:
                raise MessageError("event stream starts with a byte order mark")
        self._buffer += chunk
        return self._split(final=False)

    def close(self) -> list[Event]:
        """The events the end of the stream completes (a final lone CR ends its line); an
        unfinished event is dropped."""
        events = self._split(final=True)
        self._buffer, self._checked, self._lines, self._size = bytearray(), 0, [], 0
        return events

    def _split(self, *, final: bool) -> list[Event]:
        events = []
        start = 0
        buffer = self._buffer
        search = self._checked
        while (match := _LINE_END.search(buffer, search)) is not None:
            # A CR as the last byte may be the first half of a CRLF still on its way.
            if match.group() == b"\r" and match.end() == len(buffer) and not final:
                break
            raw = bytes(buffer[start : match.end()])
            blank = match.start() == start
            start = search = match.end()
            self._lines.append(raw)
            self._size += len(raw)
            if blank:
                events.append(_event(tuple(self._lines)))
                self._lines, self._size = [], 0
        del buffer[:start]
        # What is left holds no line end, but perhaps a final CR awaiting its LF.
        self._checked = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
        if self._size + len(buffer) > self._max:
            raise MessageError(f"event larger than {self._max} bytes")
        return events


def _event(lines: tuple[bytes, ...]) -> Event:
    event, data, last_id = "", [], None
    for raw in lines:
        try:
            line = _LINE_END.sub(b"", raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MessageError("event stream is not UTF-8") from e
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
    return Event(
        raw=b"".join(lines),
        lines=lines,
        event=event or "message",
        data="\n".join(data) if data else None,
        id=last_id,
    )


@dataclass(frozen=True)
class Output:
    """What one chunk yields: `data` to send the caller now, and the server requests withheld
    from it (each with the error response the proxy may send the server instead)."""

    data: bytes
    withheld: tuple[Refusal, ...] = ()
    messages: tuple[Message, ...] = field(default=(), repr=False)


class StreamFilter:
    """Filters one SSE answer stream to `grant`; `pending` are the list requests it answers."""

    def __init__(
        self,
        grant: Grant,
        version: str,
        pending: Pending | None = None,
        *,
        max_event_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._grant = grant
        self._version = version
        self._pending = pending or Pending()
        self._max = max_event_bytes
        self._reader = EventReader(max_event_bytes=max_event_bytes)

    def feed(self, chunk: bytes) -> Output:
        return self._emit(self._reader.feed(chunk))

    def close(self) -> Output:
        return self._emit(self._reader.close())

    def _emit(self, events: list[Event]) -> Output:
        out: list[bytes] = []
        withheld: list[Refusal] = []
        seen: list[Message] = []
        for event in events:
            data, refused, messages = self._filter(event)
            out.append(data)
            withheld.extend(refused)
            seen.extend(messages)
        return Output(b"".join(out), tuple(withheld), tuple(seen))

    def _filter(self, event: Event) -> tuple[bytes, list[Refusal], tuple[Message, ...]]:
        # Only "message" events carry JSON-RPC: the MCP SDKs ignore every other type.
        if event.data is None or event.event != "message":
            return event.raw, [], ()
        body = parse_body(event.data.encode(), version=self._version, max_bytes=self._max)
        kept: list[dict[str, object] | Message] = []
        refused: list[Refusal] = []
        changed = False
        for message in body.messages:
            if message.kind is Kind.REQUEST and (r := decide_server_request(message, self._grant)):
                refused.append(r)
                changed = True
                continue
            if not shown(message, self._grant):  # a notification: nothing to answer
                changed = True
                continue
            filtered = filter_message(message, self._pending, self._grant)
            changed = changed or filtered is not None
            kept.append(filtered if filtered is not None else message)
        if not changed:
            return event.raw, [], body.messages
        if not kept:
            return b"", refused, body.messages
        values = [k if isinstance(k, dict) else as_json(k) for k in kept]
        data = json.dumps(
            values if body.batch else values[0], ensure_ascii=False, separators=(",", ":")
        )
        return _rebuild(event, data), refused, body.messages


def _rebuild(event: Event, data: str) -> bytes:
    """`event` with its data lines replaced by one carrying `data`, where the first stood;
    every other line (event, id, retry, comments) kept as it was."""
    out = []
    placed = False
    for raw in event.lines:
        if raw.startswith(b"data:") or raw.rstrip(b"\r\n") == b"data":
            if not placed:
                ending = raw[len(raw.rstrip(b"\r\n")) :]
                out.append(b"data: " + data.encode() + ending)
                placed = True
            continue
        out.append(raw)
    return b"".join(out)

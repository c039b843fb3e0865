"""The SSE reader and stream filter: exact events however the stream is chunked."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from keyproxy.mcp import EventReader, Grant, MessageError, Pending, StreamFilter, parse_body

SEEDS = range(40)


def chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """`data` cut at random points (seeded), often into single bytes, sometimes empty."""
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        size = rng.choice([0, 1, 1, 2, 3, 7, rng.randint(1, 64)])
        yield data[at : at + size]
        at += size


def read_all(data: bytes, seed: int | None = None) -> list[tuple[str, str | None, str | None]]:
    reader = EventReader()
    parts = [data] if seed is None else list(chunks(data, seed))
    events = [e for part in parts for e in reader.feed(part)] + reader.close()
    return [(e.event, e.data, e.id) for e in events]


STREAM = (
    b": keep-alive\n\n"
    b"data: one\n\n"
    b"event: message\r\ndata:two\r\ndata:  three\r\n\r\n"
    b"id: 7\rdata: four\r\r"
    b"event: other\ndata: x\nretry: 100\nunknown: y\n\n"
    b"id: a\x00b\ndata\n\n"
    b"id: 8\n\n"
    b"data: \xc3\xa9\n\n"
)
EVENTS = [
    ("message", None, None),
    ("message", "one", None),
    ("message", "two\n three", None),
    ("message", "four", "7"),
    ("other", "x", None),
    ("message", "", None),
    ("message", None, "8"),
    ("message", "é", None),
]


def test_the_reader_follows_the_event_stream_rules() -> None:
    """LF, CRLF and CR end lines; data lines join with LF; one leading space is dropped; an id
    with NUL is ignored; comments and unknown fields are skipped."""
    assert read_all(STREAM) == EVENTS


@pytest.mark.parametrize("seed", SEEDS)
def test_the_reader_gives_the_same_events_however_the_stream_is_split(seed: int) -> None:
    """Any chunking, including a CRLF split between two chunks, yields the same events."""
    assert read_all(STREAM, seed) == EVENTS


def test_each_event_keeps_its_exact_bytes() -> None:
    """The events' raw bytes, in order, are the stream itself."""
    reader = EventReader()
    events = reader.feed(STREAM) + reader.close()
    assert b"".join(e.raw for e in events) == STREAM


def test_an_unfinished_event_at_the_end_is_dropped() -> None:
    """Without its blank line an event is never dispatched; a final lone CR ends a line."""
    assert read_all(b"data: a\n\ndata: b\n") == [("message", "a", None)]
    assert read_all(b"data: a\r\r") == [("message", "a", None)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xef\xbb\xbfdata: a\n\n", "byte order mark"),
        (b"data: \xff\n\n", "not UTF-8"),
        (b"data: " + b"a" * 5000, "larger than 4096"),
        (b"data: a\n" * 1000, "larger than 4096"),
    ],
)
def test_streams_that_could_be_read_two_ways_are_refused(data: bytes, reason: str) -> None:
    """A BOM, bytes that are not UTF-8, or an event above the limit (even unfinished) stop it."""
    reader = EventReader(max_event_bytes=4096)
    with pytest.raises(MessageError, match=reason):
        reader.feed(data)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_byte_order_mark_is_refused_however_the_stream_is_split(seed: int) -> None:
    """A BOM cut across the first chunks is still refused: a client's decoder strips it and
    reads the first line as `data`, where keyproxy would read an unknown field and pass it."""
    data = b"\xef\xbb\xbf" + event(server_request("sampling/createMessage", "s"))
    parts = [b"", data[:1], data[1:2], *chunks(data[2:], seed)]
    with pytest.raises(MessageError, match="byte order mark"):
        read_all(b"".join(parts), seed)
    reader = EventReader()
    with pytest.raises(MessageError, match="byte order mark"):  # noqa: PT012  # fed in parts
        for part in parts:
            reader.feed(part)


GRANT = Grant.build(tools=["a"], server_requests=["elicitation/create"])


def event(value: object, *, extra: bytes = b"", end: bytes = b"\n") -> bytes:
    return extra + b"data: " + json.dumps(value).encode() + end + end


def tools_answer(rid: object, *names: str, cursor: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"tools": [{"name": n, "inputSchema": {}} for n in names]}
    if cursor is not None:
        result["nextCursor"] = cursor
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def server_request(method: str, rid: object) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": {}}


PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
UNCHANGED = [
    b": ping\n\n",
    event(PROGRESS, extra=b"id: e1\n"),
    event(server_request("ping", "s0")),
    event(server_request("elicitation/create", "s1"), end=b"\r\n"),
    b"event: endpoint\ndata: not json\n\n",
    event(tools_answer(2, "a")),
]
WITHHELD = event(server_request("sampling/createMessage", "s2"))
LISTED = event(tools_answer(1, "b", "a", "c", cursor="next"), extra=b"id: e9\nretry: 5\n")
STREAM_IN = b"".join([*UNCHANGED[:3], WITHHELD, *UNCHANGED[3:], LISTED])
PENDING = Pending.of(parse_body(json.dumps(server_request("tools/list", 1)).encode()))


def run_filter(data: bytes, seed: int | None) -> tuple[bytes, list[Any]]:
    stream = StreamFilter(GRANT, "2025-06-18", PENDING)
    outputs = [stream.feed(c) for c in ([data] if seed is None else chunks(data, seed))]
    outputs.append(stream.close())
    return b"".join(o.data for o in outputs), [r for o in outputs for r in o.withheld]


def expected_filtered() -> bytes:
    compact = json.dumps(tools_answer(1, "a", cursor="next"), separators=(",", ":"))
    return b"id: e9\nretry: 5\ndata: " + compact.encode() + b"\n\n"


@pytest.mark.parametrize("seed", [None, *SEEDS])
def test_the_stream_filter_changes_only_what_it_must(seed: int | None) -> None:
    """The answer to the pending tools/list is filtered (cursor, id and retry kept), an
    ungranted server request is withheld, and every other event passes byte for byte."""
    out, withheld = run_filter(STREAM_IN, seed)
    assert out == b"".join([*UNCHANGED, expected_filtered()])
    assert [r.response() for r in withheld] == [
        {
            "jsonrpc": "2.0",
            "id": "s2",
            "error": {
                "code": -32601,
                "message": "sampling/createMessage is not allowed on this route",
            },
        }
    ]


def test_batched_events_keep_what_is_allowed() -> None:
    """In 2025-03-26 a batch on the stream loses only its withheld requests and list items."""
    requests = [server_request("roots/list", "r"), PROGRESS]
    responses = [tools_answer(1, "a", "z"), tools_answer(5, "q")]
    stream = StreamFilter(GRANT, "2025-03-26", PENDING)
    out = stream.feed(event(requests) + event(responses)).data + stream.close().data
    first, second = out.split(b"\n\n", 1)
    assert json.loads(first.removeprefix(b"data: ")) == [PROGRESS]
    assert json.loads(second.removeprefix(b"data: ")) == [tools_answer(1, "a"), tools_answer(5)]


def updated(uri: object) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}


def test_a_resource_change_reaches_only_callers_granted_the_resource() -> None:
    """The server tells every session of a change (it sees one client, the key's): a
    notification naming a resource outside the grant is dropped, as a read of it would be
    refused; the others pass byte for byte."""
    grant = Grant.build(resources=["file:///docs/*"])
    shown = [event(updated("file:///docs/a.md")), event(PROGRESS)]
    hidden = [
        event(updated("file:///secrets/key")),
        event(updated("file:///docs/x?/../../etc")),
        event(updated(7)),
        event({"jsonrpc": "2.0", "method": "notifications/resources/updated"}),
    ]
    stream = StreamFilter(grant, "2025-06-18", PENDING)
    out = stream.feed(b"".join([*hidden[:2], shown[0], *hidden[2:], shown[1]]))
    assert out.data + stream.close().data == b"".join(shown)
    assert not out.withheld  # nothing to answer: a notification has no id


def test_an_unreadable_message_event_stops_the_stream() -> None:
    """A message event whose data is not exactly JSON-RPC is refused, never passed on."""
    stream = StreamFilter(GRANT, "2025-06-18", PENDING)
    with pytest.raises(MessageError, match="given twice"):
        stream.feed(b'data: {"jsonrpc":"2.0","id":1,"id":2,"result":{}}\n\n')

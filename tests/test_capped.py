"""Whole files and bodies, never read past their limit; a body read to its end however it is
cut into parts (a `StreamReader.read(n)` alone returns only what has arrived)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import make_mocked_request

from keyproxy import asked, capped, lifecycle
from keyproxy.errors import BadRequest, RequestTimeout


@pytest.fixture
async def connection() -> AsyncIterator[BaseProtocol]:
    """A connected protocol (over a socket pair) for the readers to belong to."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, protocol = await loop.create_connection(lambda: BaseProtocol(loop), sock=ours)
    yield protocol
    transport.close()
    theirs.close()


def _reader(protocol: BaseProtocol, *parts: bytes) -> StreamReader:
    """aiohttp's own body reader, as its protocol fills it: `parts` arrived so far."""
    reader = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    for part in parts:
        reader.feed_data(part)
    return reader


async def _arriving(reader: StreamReader, rest: list[bytes], reading: asyncio.Task[object]) -> None:
    """The rest of a body, each part fed once the reading task has taken what came before:
    one yield lets it run to its next wait (a read that took all that had arrived returns
    there, and the task is done)."""
    for part in rest:
        await asyncio.sleep(0)  # a yield to the reading task, not a wait for time
        assert not reading.done(), "the body was taken as whole before all of it arrived"
        reader.feed_data(part)
    reader.feed_eof()


@pytest.mark.parametrize(
    "parts",
    [
        [b'{"scope": ', b'{"r": {}}}'],
        [b"{", b'"a"', b": ", b"1", b"}"],
        [b"x" * 1000, b"y" * 1000, b"z"],
    ],
)
async def test_a_body_in_parts_is_read_whole(parts: list[bytes], connection: BaseProtocol) -> None:
    reader = _reader(connection, parts[0])
    task = asyncio.create_task(capped.read_body(reader, 4096))
    await _arriving(reader, parts[1:], task)
    assert await task == b"".join(parts)


@pytest.mark.parametrize(("size", "whole"), [(0, True), (99, True), (100, True), (101, False)])
async def test_a_body_at_the_limit_is_read_and_one_past_it_is_not(
    size: int, whole: bool, connection: BaseProtocol
) -> None:
    reader = _reader(connection, *[b"a"] * size)  # one byte a part
    reader.feed_eof()
    assert await capped.read_body(reader, 100) == (b"a" * size if whole else None)


async def test_no_more_than_one_byte_past_the_limit_is_read(connection: BaseProtocol) -> None:
    reader = _reader(connection, b"a" * 60, b"b" * 60, b"c" * 1000)
    reader.feed_eof()
    assert await capped.read_body(reader, 100) is None
    assert len(await reader.read()) == 60 + 60 + 1000 - 101


@pytest.mark.parametrize(("size", "whole"), [(0, True), (100, True), (101, False), (10_000, False)])
def test_a_file_at_the_limit_is_read_and_a_longer_one_is_not(
    tmp_path: Path, size: int, whole: bool
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"k" * size)
    assert capped.read_file(path, 100) == (b"k" * size if whole else None)


def test_a_file_that_cannot_be_read_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="No such file"):
        capped.read_file(tmp_path / "missing", 100)


# ---------------------------------------------------------------------------- the broker


def _request(reader: StreamReader, content_type: str = "application/json") -> object:
    return make_mocked_request(
        "POST", "/token", headers={"Content-Type": content_type}, payload=reader
    )


@pytest.mark.parametrize("form", [False, True])
async def test_an_exchange_body_in_parts_is_read_whole(
    form: bool, connection: BaseProtocol
) -> None:
    """POST /token's fields, sent in several TCP segments: all of them, not the first."""
    body = (
        b"grant_type=x&scope=r&task=" + b"t" * 500
        if form
        else json.dumps({"scope": {"r": {}}, "task": "t" * 500}).encode()
    )
    reader = _reader(connection, body[:7])
    task = asyncio.create_task(asked.fields_of(_request(reader), form))  # type: ignore[arg-type]
    await _arriving(reader, [body[7:300], body[300:]], task)
    fields = await task
    assert fields["task"] == "t" * 500


async def test_a_revoke_reason_in_parts_is_read_whole(connection: BaseProtocol) -> None:
    reader = _reader(connection, b'{"reas')
    task = asyncio.create_task(lifecycle._reason(_request(reader)))  # type: ignore[arg-type]
    await _arriving(reader, [b'on": "fai', b'led"}'], task)
    assert await task == "failed"


async def test_an_exchange_body_over_the_limit_is_refused(connection: BaseProtocol) -> None:
    reader = _reader(connection, b"{" + b" " * asked.MAX_BODY, b"}")
    reader.feed_eof()
    with pytest.raises(BadRequest, match="request body above"):
        await asked.fields_of(_request(reader), False)  # type: ignore[arg-type]


async def test_an_exchange_body_that_stops_arriving_times_out(
    monkeypatch: pytest.MonkeyPatch, connection: BaseProtocol
) -> None:
    """A caller that sends part of its body and then nothing holds the broker no longer than
    BODY_TIMEOUT (10 s; shortened here): a 408, as the proxy's body_timeout."""
    monkeypatch.setattr(asked, "BODY_TIMEOUT", 0.05)
    reader = _reader(connection, b'{"scope"')
    with pytest.raises(RequestTimeout) as timed_out:
        await asked.fields_of(_request(reader), False)  # type: ignore[arg-type]
    assert timed_out.value.reason == "body_timeout"


@pytest.mark.parametrize(
    "failure",
    [web.RequestPayloadError("400, message: bad chunk"), ConnectionResetError("Connection lost")],
)
async def test_a_body_aiohttp_cannot_read_is_a_400(
    failure: BaseException, connection: BaseProtocol
) -> None:
    """What aiohttp's server sets on a body it cannot read (a payload error, the caller's
    connection lost) is the caller's 400 bad_body, never a 500 with a traceback logged."""
    reader = _reader(connection, b'{"scope"')
    reader.set_exception(failure)
    with pytest.raises(BadRequest) as refused:
        await asked.fields_of(_request(reader), False)  # type: ignore[arg-type]
    assert refused.value.reason == "bad_body"

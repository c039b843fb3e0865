"""keyproxy.pool: the proxy's own connections to its upstreams, against scripted HTTP/1.1
servers on 127.0.0.1 that count their connections and record what they read.

What is checked is where a client can go wrong for a proxy: which connection the next
request takes (never one whose last answer is in doubt), interim answers, a request resent
only when that is safe, the body's framing, the egress fence and TLS verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from keyproxy import pool as pool_module
from keyproxy.errors import EgressDenied
from keyproxy.pool import Pool
from keyproxy.upstream import tls_context
from tests.helpers.certs import pem_files
from tests.helpers.polling import eventually
from tests.helpers.servers import reset as reset_connection

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG = 8 * 1024 * 1024  # more than the client reads ahead: a part stays on the wire

Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection: read a request (its head and a declared body), answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self) -> tuple[bytes, bytes]:
        """The next request's head and body, or (b"", b"") when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b"", b""
        body = b""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                body = await self.reader.readexactly(int(value))
        return head, body

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class Server:
    """A scripted upstream: `handler` runs once per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.closed = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.Task[object], asyncio.StreamWriter] = {}

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open.values():
            writer.close()
        if self._open:
            await asyncio.wait(self._open, timeout=5)
        await self._server.wait_closed()

    def url(self, path: str = "/x", scheme: str = "http", host: str = "127.0.0.1") -> URL:
        return URL(f"{scheme}://{host}:{self.port}{path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        conn = _Recording(reader, writer, self.requests)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1
            del self._open[task]


class _Recording(Conn):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: list[tuple[bytes, bytes]],
    ) -> None:
        super().__init__(reader, writer)
        self._requests = requests

    async def request(self) -> tuple[bytes, bytes]:
        head, body = await super().request()
        if head:
            self._requests.append((head, body))
        return head, body


async def keep_alive(conn: Conn) -> None:
    """Answer every request on the connection with 200 `ok`."""
    while (await conn.request())[0]:
        await conn.answer(OK)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    made = Pool(LOOPBACK, tls_context(True, None))
    yield made
    await made.close()


async def fetch(
    pool: Pool,
    url: URL,
    method: str = "GET",
    body: pool_module.Body = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    async with pool.request(method, url, CIMultiDict(headers or {}), body, 5.0) as answer:
        return answer.status, await answer.content.read()


async def test_a_connection_is_reused_after_an_answer_read_to_its_end(pool: Pool) -> None:
    async with Server(keep_alive) as server:
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert await fetch(pool, server.url(), "POST", b"{}") == (200, b"ok")
        assert server.connections == 1
    heads = [head for head, _ in server.requests]
    assert heads[0].startswith(b"GET /x HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}".encode() in heads[0]
    assert b"Content-Length" not in heads[0]
    assert b"Content-Length: 2\r\n" in heads[1]
    assert server.requests[1][1] == b"{}"


async def test_an_answer_left_unread_closes_its_connection(pool: Pool) -> None:
    async def large(conn: Conn) -> None:
        while (await conn.request())[0]:
            await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"a" * BIG)

    async with Server(large) as server:
        async with pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer:
            assert answer.status == 200
            assert answer.content_length == BIG
            await answer.content.readany()  # a part: the rest would be read as the next answer
        async with pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer:
            assert len(await answer.content.read()) == BIG
        assert server.connections == 2


@pytest.mark.parametrize(
    ("request_headers", "answer_head"),
    [
        ({"Connection": "close"}, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"),
        ({}, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"),
        ({}, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n"),
    ],
    ids=["request-says-close", "answer-says-close", "http-1.0"],
)
async def test_a_close_asked_either_way_is_honoured(
    pool: Pool, request_headers: dict[str, str], answer_head: bytes
) -> None:
    async def answering(conn: Conn) -> None:
        while (await conn.request())[0]:
            await conn.answer(answer_head + b"\r\nok")

    async with Server(answering) as server:
        for _ in range(2):
            assert await fetch(pool, server.url(), headers=request_headers) == (200, b"ok")
        assert server.connections == 2


async def test_a_switch_is_yielded_and_its_connection_never_reused(pool: Pool) -> None:
    """After a 101 the connection speaks another protocol: what follows it must never be read
    as the next request's answer."""

    async def switching(conn: Conn) -> None:
        if (await conn.request())[0]:
            await conn.answer(
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + OK.replace(b"ok", b"no")
            )
            await conn.request()

    async with Server(switching) as server:
        async with pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer:
            assert answer.status == 101
        server.handler = keep_alive
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert server.connections == 2


async def test_interim_answers_are_skipped(pool: Pool) -> None:
    async def interim(conn: Conn) -> None:
        while (await conn.request())[0]:
            await conn.answer(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
            )

    async with Server(interim) as server:
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert server.connections == 1


async def closes_on_the_second_request(conn: Conn) -> None:
    """Answers one request per connection, then closes on the next without answering: a
    keep-alive connection the upstream closed just as it was reused."""
    if (await conn.request())[0]:
        await conn.answer(OK)
        await conn.request()


async def test_an_idempotent_request_is_resent_once_on_a_new_connection(pool: Pool) -> None:
    async with Server(closes_on_the_second_request) as server:
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert await fetch(pool, server.url(), "PUT", b"v") == (200, b"ok")
        assert server.connections == 2
        assert [body for _, body in server.requests] == [b"", b"v", b"v"]


async def test_a_post_is_never_resent(pool: Pool) -> None:
    """The upstream may have acted on it before it closed."""
    async with Server(closes_on_the_second_request) as server:
        assert await fetch(pool, server.url()) == (200, b"ok")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(pool, server.url(), "POST", b"once")
        assert server.connections == 1
        assert [body for _, body in server.requests] == [b"", b"once"]


async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_a_streamed_body_goes_with_its_declared_length_or_chunked(pool: Pool) -> None:
    chunked: list[bytes] = []

    async def chunked_too(conn: Conn) -> None:
        while True:
            head, _ = await conn.request()
            if not head:
                return
            if b"Transfer-Encoding: chunked" in head:
                chunked.append(await conn.reader.readuntil(b"0\r\n\r\n"))
            await conn.answer(OK)

    async with Server(chunked_too) as server:
        length = {"Content-Length": "5"}
        status = await fetch(pool, server.url(), "POST", parts(b"abc", b"de"), headers=length)
        assert status == (200, b"ok")
        assert await fetch(pool, server.url(), "POST", parts(b"abc", b"de")) == (200, b"ok")
        assert server.connections == 1
    assert server.requests[0][1] == b"abcde"
    assert b"Transfer-Encoding: chunked" in server.requests[1][0]
    assert chunked == [b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"]


async def test_an_answer_before_the_body_is_heard_and_its_connection_closed(pool: Pool) -> None:
    """An upstream that refuses a streamed body before reading it: its answer reaches the
    caller, and the connection, whose body was never read whole, is not reused."""
    release = asyncio.Event()

    async def early(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.answer(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        await release.wait()

    async def forever() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await asyncio.Event().wait()  # the caller is still sending when the answer comes
        yield b""

    async with Server(early) as server:
        status = await fetch(
            pool, server.url(), "POST", forever(), headers={"Content-Length": "9999"}
        )
        assert status == (413, b"")
        release.set()
        server.handler = keep_alive
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert server.connections == 2


async def test_an_error_answer_to_a_body_closes_its_connection(pool: Pool) -> None:
    """The upstream may have refused the body before reading it, and over TLS the bytes
    still unsent do not show in the transport's buffer: the connection is not reused. An
    error answer to a request without a body keeps it."""

    async def refusing(conn: Conn) -> None:
        while True:
            head, body = await conn.request()
            if not head:
                return
            status = b"413 Too Large" if body else b"404 Not Found"
            await conn.answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")

    async with Server(refusing) as server:
        assert await fetch(pool, server.url()) == (404, b"")
        assert await fetch(pool, server.url()) == (404, b"")
        assert server.connections == 1
        assert await fetch(pool, server.url(), "POST", b"x" * 100) == (413, b"")
        assert await fetch(pool, server.url()) == (404, b"")
        assert server.connections == 2


async def test_a_head_answer_has_no_body_and_keeps_its_connection(pool: Pool) -> None:
    async def head(conn: Conn) -> None:
        while (await conn.request())[0]:
            await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")

    async with Server(head) as server:
        assert await fetch(pool, server.url(), "HEAD") == (200, b"")
        assert await fetch(pool, server.url(), "HEAD") == (200, b"")
        assert server.connections == 1


async def test_an_answer_without_length_is_read_to_the_close(pool: Pool) -> None:
    async def until_close(conn: Conn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")

    async with (
        Server(until_close) as server,
        pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer,
    ):
        assert answer.content_type == "text/event-stream"
        assert answer.content_length is None
        assert await answer.content.read() == b"data: 1\n\n"


@pytest.mark.parametrize("reset", [False, True])
async def test_an_answer_that_ends_with_a_reset_says_it_may_be_cut(pool: Pool, reset: bool) -> None:
    """A body delimited by the connection's end reads the same to aiohttp whether the
    upstream closed the connection or it was reset; the answer tells them apart."""

    async def then_close(conn: Conn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart of it")
        if reset:
            reset_connection(conn.writer)

    async with (
        Server(then_close) as server,
        pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer,
    ):
        assert await answer.content.read() == b"part of it"
        assert answer.cut_short is reset


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_an_answer_with_no_body_is_never_said_cut(
    pool: Pool, method: str, status: int
) -> None:
    """An answer to HEAD, a 204 or a 304 has no body, whatever its headers say: a reset
    after it cuts nothing, so a caller's connection is never cut for it."""

    async def bodiless_then_reset(conn: Conn) -> None:
        await conn.request()
        await conn.answer(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n\r\n".encode())
        reset_connection(conn.writer)

    async with (
        Server(bodiless_then_reset) as server,
        pool.request(method, server.url(), CIMultiDict(), None, 5.0) as answer,
    ):
        assert answer.status == status
        assert await answer.content.read() == b""
        # The reset has reached this end of the connection (its only witness is private).
        await eventually(lambda: answer._conn.lost is not None, "the upstream did not reset")
        assert not answer.cut_short


async def test_an_answer_of_declared_length_or_chunked_is_never_said_cut(pool: Pool) -> None:
    """Its own framing tells a whole body from a cut one (aiohttp raises for the latter):
    the connection's end says nothing about it."""

    async def framed_then_reset(conn: Conn) -> None:
        await conn.request()
        await conn.answer(OK)
        reset_connection(conn.writer)

    async with (
        Server(framed_then_reset) as server,
        pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer,
    ):
        assert await answer.content.read() == b"ok"
        await eventually(lambda: server.closed, "the upstream did not reset")
        assert not answer.cut_short


async def test_a_malformed_answer_is_a_client_error_quoting_nothing(pool: Pool) -> None:
    async def malformed(conn: Conn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nBad Header sk-secret-echo\r\n\r\n")

    async with Server(malformed) as server:
        with pytest.raises(aiohttp.ClientConnectionError) as raised:
            await fetch(pool, server.url())
    assert "secret" not in repr(raised.value)
    assert raised.value.__cause__ is None


async def test_an_answer_cut_in_its_head_is_never_resent_nor_quoted(pool: Pool) -> None:
    """An upstream that closes in the middle of an answer's head may have acted on the
    request: even a PUT is not sent again, and the error quotes none of what it sent."""

    async def cut(conn: Conn) -> None:
        await conn.request()
        await conn.answer(OK)
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nX-Echo: sk-secret-echo\r\nContent-Le")

    async with Server(cut) as server:
        assert await fetch(pool, server.url()) == (200, b"ok")
        with pytest.raises(aiohttp.ClientConnectionError) as raised:
            await fetch(pool, server.url(), "PUT", b"once")
        assert len(server.requests) == 2
    assert not isinstance(raised.value, aiohttp.ServerDisconnectedError)
    assert "secret" not in repr(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None


async def test_a_name_that_does_not_resolve_is_a_client_error(pool: Pool) -> None:
    with pytest.raises(aiohttp.ClientConnectionError, match="could not be resolved"):
        await fetch(pool, URL("http://no-such-host.invalid/x"))


async def test_a_header_value_with_a_line_break_is_never_sent(pool: Pool) -> None:
    async with Server(keep_alive) as server:
        with pytest.raises(ValueError, match="header injection"):
            await fetch(pool, server.url(), headers={"X-A": "1\r\nX-Injected: 2"})
        assert server.requests == []


async def test_the_fence_refuses_an_address_not_allowed() -> None:
    """A name resolving to an address the route may not reach: never connected to."""
    fenced = Pool((), tls_context(True, None))
    try:
        async with Server(keep_alive) as server:
            with pytest.raises(EgressDenied):
                await fetch(fenced, server.url(host="localhost"))
            assert server.connections == 0
    finally:
        await fenced.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "[::ffff:127.0.0.1]"])
async def test_the_fence_refuses_an_ip_literal_not_allowed(host: str) -> None:
    """An IP-literal upstream is not resolved: the pool judges it itself, and a number some
    parsers read as an address (`127.1`) is refused as well."""
    fenced = Pool((), tls_context(True, None))
    try:
        async with Server(keep_alive) as server:
            with pytest.raises(EgressDenied):
                await fetch(fenced, server.url(host=host))
            assert server.connections == 0
    finally:
        await fenced.close()


async def test_a_name_is_resolved_and_connected_to_within_the_fence(pool: Pool) -> None:
    async with Server(keep_alive) as server:
        assert await fetch(pool, server.url(host="localhost")) == (200, b"ok")
        assert f"Host: localhost:{server.port}".encode() in server.requests[0][0]


async def test_no_connection_within_the_connect_timeout_is_a_timeout(pool: Pool) -> None:
    """A TLS upstream that never finishes its handshake."""

    async def silent(conn: Conn) -> None:
        await conn.reader.read()

    async with Server(silent) as server:
        with pytest.raises(TimeoutError):
            async with pool.request(
                "GET", server.url(scheme="https"), CIMultiDict(), None, 0.2
            ) as _:
                pass


def silent_address() -> tuple[socket.socket, list[socket.socket], int]:
    """A loopback port that never completes a connection: a listener whose backlog is full,
    so the kernel drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.3", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filling = []
    for _ in range(4):
        conn = socket.socket()
        conn.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            conn.connect(("127.0.0.3", port))
        filling.append(conn)
    return listener, filling, port


def open_descriptors() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def test_a_cancellation_while_connecting_is_raised_and_leaves_no_socket() -> None:
    """The read deadline or a token's end cancels a request that is still connecting: the
    cancellation is raised at once (never absorbed by the staggered attempts) and no socket
    of theirs stays open."""
    listener, filling, port = silent_address()
    try:
        before = open_descriptors()
        found = [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.3", port)),
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.3", port)),
        ]
        racing = asyncio.ensure_future(pool_module._racing(found))
        await eventually(  # the second attempt starts 0.25 s after the first
            open_descriptors, "both attempts under way", until=lambda n: n >= before + 2
        )
        assert not racing.done()
        racing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await racing
        await eventually(
            open_descriptors, "the attempts' sockets closed", until=lambda n: n <= before
        )
    finally:
        for sock in (listener, *filling):
            sock.close()


async def tls_server(files: dict[str, Path], handler: Handler) -> tuple[asyncio.Server, int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files["server"], files["server-key"])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(Conn(reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def test_tls_verifies_the_upstream_against_the_routes_ca(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    server, port = await tls_server(files, keep_alive)
    trusting = Pool(LOOPBACK, tls_context(True, str(files["ca"])))
    other = Pool(LOOPBACK, tls_context(True, str(files["other-ca"])))
    unverified = Pool(LOOPBACK, tls_context(False, None))
    try:
        for host in ("127.0.0.1", "localhost"):
            url = URL(f"https://{host}:{port}/x")
            assert await fetch(trusting, url) == (200, b"ok")
            assert await fetch(unverified, url) == (200, b"ok")
            with pytest.raises(aiohttp.ClientConnectionError, match="certificate was refused"):
                await fetch(other, url)
    finally:
        for made in (trusting, other, unverified):
            await made.close()
        server.close()
        await server.wait_closed()


async def test_idle_connections_are_closed_after_the_keep_alive(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "KEEPALIVE", 0.05)
    async with Server(keep_alive) as server:
        assert await fetch(pool, server.url()) == (200, b"ok")
        await eventually(lambda: server.closed, "the idle connection closed", within=5)
        assert await fetch(pool, server.url()) == (200, b"ok")
        assert server.connections == 2


async def test_a_closed_pool_keeps_no_connection(pool: Pool) -> None:
    async with Server(keep_alive) as server:
        async with pool.request("GET", server.url(), CIMultiDict(), None, 5.0) as answer:
            await pool.close()  # a reload retired it while this answer was read
            assert await answer.content.read() == b"ok"
        await eventually(lambda: server.closed, "the connection closed", within=5)


@pytest.mark.parametrize("close_notify", [True, False])
async def test_a_tls_answer_ended_without_close_notify_says_it_may_be_cut(
    tmp_path: Path, close_notify: bool
) -> None:
    """Over TLS a body delimited by the connection's end is whole only if the upstream said
    so (close_notify): a bare TCP FIN, which anyone on the path can send, may have cut it."""

    async def then_end(conn: Conn) -> None:
        await conn.request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart of it")
        if close_notify:
            return  # tls_server closes it: close_notify, then FIN
        conn.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)  # FIN alone
        await asyncio.wait_for(conn.reader.read(), 5)  # the client's end, then ours

    files = pem_files(tmp_path)
    server, port = await tls_server(files, then_end)
    made = Pool(LOOPBACK, tls_context(True, str(files["ca"])))
    try:
        url = URL(f"https://127.0.0.1:{port}/x")
        async with made.request("GET", url, CIMultiDict(), None, 5.0) as answer:
            assert await answer.content.read() == b"part of it"
            assert answer.cut_short is not close_notify
    finally:
        await made.close()
        server.close()
        await server.wait_closed()

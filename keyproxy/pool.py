"""The proxy's connections to its upstreams: a keep-alive pool, and one request sent and its
answer read on aiohttp's own HTTP/1.1 protocol.

    Pool(allowed, tls)      one per egress and TLS setting (keyproxy.upstream.UpstreamSessions)
    async with pool.request(method, url, headers, body, connect_timeout) as answer:
                            .status, .headers, .content (a StreamReader), .content_length,
                            .content_type, .compression, .cut_short
    await pool.close()      the idle connections closed, none pooled after

Why not `aiohttp.ClientSession.request` (the rotators and MCP replies use it): what it wraps
around the protocol keyproxy never uses, and it was most of a request's cost (docs/
performance.md, "The proxy's own upstream pool"). aiohttp's machinery stays where it does
the work (`ResponseHandler`: the C response parser, flow control, decompression, a
connection's end; `StreamWriter`: the request head, which refuses CR and LF in values, and
the body), with the egress fence's resolver; this module does the pool and the request line.

SECURITY: the address connected to is the one the fence (netguard.GuardedResolver) allowed,
resolved for every new connection; certificates are verified against the route's CAs and the
upstream's name. A connection goes back to the pool only after a final answer read to its
end, to a request sent whole, where neither side asked to close it, never after a 101: any
doubt about where its next answer starts closes it. No exception raised here quotes the
upstream's bytes (a parser's message can): they may echo the key.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import aiohappyeyeballs
import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EofStream
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from keyproxy import netguard
from keyproxy.config import Network
from keyproxy.errors import EgressDenied
from keyproxy.netguard import GuardedResolver

# An idle connection is closed after this long (aiohttp's own keep-alive default).
KEEPALIVE: Final = 15.0
# A request sent on a pooled connection the upstream had closed meanwhile is sent once more,
# on a new connection, if its method is idempotent and its body can be sent again (RFC 9112
# 9.3.1; aiohttp's rule).
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose request without a body declares no length (aiohttp's GET_METHODS); the
# others say `Content-Length: 0`.
_NO_LENGTH: Final = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})

Body = bytes | AsyncIterable[bytes] | None
_Key = tuple[str, str, int]  # scheme, host, port


class _Connection(ResponseHandler):
    """aiohttp's response protocol, remembering how its connection ended: aiohttp ends a
    body delimited by it alike whether the upstream closed it, it was reset, or a TLS
    connection ended without the upstream's close_notify."""

    lost: BaseException | None = None

    def eof_received(self) -> None:
        # SECURITY: asyncio's TLS layer ends the stream for a bare TCP FIN too (anyone on the
        # path can send one); a close_notify, read as data, is heard before its SHUTDOWN state.
        tls = getattr(getattr(self.transport, "_ssl_protocol", None), "_state", None)
        if tls is sslproto.SSLProtocolState.SHUTDOWN:
            self.lost = ConnectionAbortedError("the TLS connection ended without close_notify")
        super().eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or self.lost
        super().connection_lost(exc)


class Answer:
    """The upstream's answer: status, headers, and its body as it arrives."""

    __slots__ = ("_conn", "_until_closed", "compression", "content", "headers", "status")

    def __init__(
        self,
        message: RawResponseMessage,
        payload: aiohttp.StreamReader,
        conn: _Connection,
        *,
        head: bool = False,
    ) -> None:
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self._conn = conn
        # A body without a length or chunks: it ends with the connection.
        self._until_closed = (
            not (head or message.chunked or message.code in (204, 304))
            and "Content-Length" not in message.headers
        )
        # The content coding the parser takes off the body as it arrives, or None.
        self.compression: str | None = message.compression

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return int(length) if length is not None else None  # the parser checked its digits

    @property
    def cut_short(self) -> bool:
        """Whether a body ended by its connection's end ended by a reset or (TLS) without
        close_notify, not a close: maybe cut short."""
        return self._until_closed and self._conn.lost is not None

    @property
    def content_type(self) -> str:
        """The media type, lowercase, without parameters ("" when none is declared)."""
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()


class Pool:
    """Keep-alive connections to the upstreams of one egress and TLS setting."""

    def __init__(self, allowed: Sequence[Network], tls: ssl.SSLContext) -> None:
        self._allowed = tuple(allowed)
        self._resolver = GuardedResolver(self._allowed)
        self._tls = tls
        self._idle: dict[_Key, list[tuple[float, _Connection]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: Body,
        connect_timeout: float,
    ) -> AsyncIterator[Answer]:
        """Send one request and yield its answer (past interim answers, as aiohttp's client;
        a 101 is yielded, its connection closed after it). Raises TimeoutError when no
        connection is made within `connect_timeout`, EgressDenied, or aiohttp.ClientError."""
        key = (url.scheme, url.raw_host or "", url.port or 0)
        # True: may be sent again; None: being sent again, on a new connection.
        again: bool | None = method in IDEMPOTENT and not isinstance(body, AsyncIterable)
        while True:
            conn = self._pooled(key) if again is not None else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, connect_timeout)
            sending: asyncio.Task[None] | None = None
            try:
                sending = await _send(conn, method, url, headers, body)
                message, payload = await _answer(conn)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError):
                _drop(conn, sending)
                if reused and again:
                    again = None
                    continue
                raise
            except BaseException:
                _drop(conn, sending)
                raise
            break
        try:
            yield Answer(message, payload, conn, head=method == "HEAD")
        finally:
            if _reusable(conn, message, sending, headers, body) and not self._closed:
                self._put_back(key, conn)
            else:
                _drop(conn, sending)

    async def close(self) -> None:
        """Close the idle connections; those in use close when their answers end."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()  # (none is set again: nothing is put back once closed)
        for conns in self._idle.values():
            for _, conn in conns:
                conn.close()
        self._idle.clear()
        await self._resolver.close()

    def _pooled(self, key: _Key) -> _Connection | None:
        conns = self._idle.get(key)
        oldest = time.monotonic() - KEEPALIVE
        while conns:
            since, conn = conns.pop()
            if since > oldest and conn.is_connected() and not conn.should_close:
                return conn
            conn.close()
        return None

    def _put_back(self, key: _Key, conn: _Connection) -> None:
        self._idle.setdefault(key, []).append((time.monotonic(), conn))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for KEEPALIVE; again while any are left."""
        self._sweeper = None
        oldest = time.monotonic() - KEEPALIVE
        for key, conns in list(self._idle.items()):
            for since, conn in conns:
                if since <= oldest:
                    conn.close()
            self._idle[key] = [(since, conn) for since, conn in conns if since > oldest]
            if not self._idle[key]:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE / 2, self._sweep)

    async def _connect(self, key: _Key, within: float) -> _Connection:
        """A new connection to an address the fence allows, `within` seconds (resolving,
        connecting and the TLS handshake alike), the addresses tried as aiohttp's connector
        tries them (Happy Eyeballs, RFC 8305: the next 0.25 s after the last)."""
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._tls if scheme == "https" else None
        failure = ""
        async with asyncio.timeout(within):
            try:
                found = await self._addresses(host, port)
            except EgressDenied:
                raise
            except OSError:
                found = []
                failure = "the upstream's name could not be resolved"
            if found:
                try:
                    sock = await _racing(found)
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop),
                        sock=sock,
                        ssl=tls,
                        server_hostname=host.rstrip(".") if tls is not None else None,
                    )
                except ssl.SSLCertVerificationError:
                    failure = "the upstream's certificate was refused"
                except OSError:  # refused, unreachable, the TLS handshake failed
                    failure = "the upstream could not be reached"
                else:
                    return conn
        # Raised here, not in the handler: the causes may hold what the upstream sent.
        raise aiohttp.ClientConnectionError(failure)

    async def _addresses(self, host: str, port: int) -> list[aiohappyeyeballs.AddrInfoType]:
        """The addresses to try: an IP literal's own, else those the fence allows a name.
        Raises EgressDenied for a literal the fence refuses (or a number some resolvers
        read as an address: `127.1`), before any connection."""
        netguard.check_host(host, self._allowed)
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            resolved = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
            found = [(result["family"], result["host"]) for result in resolved]
        else:
            found = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, host)]
        return [
            (
                family,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, port, 0, 0) if family == socket.AF_INET6 else (address, port),
            )
            for family, address in found
        ]


async def _racing(found: Sequence[aiohappyeyeballs.AddrInfoType]) -> socket.socket:
    """A socket connected to one of `found`, the attempts staggered (aiohappyeyeballs).
    Through a shield: the library waits for a losing attempt with CancelledError suppressed,
    so a cancellation there (keyproxy.deadline.Watch) would be lost; here it is raised at
    once, and the race, cancelled, has any socket it still makes closed."""
    racing = asyncio.ensure_future(
        aiohappyeyeballs.start_connection(found, happy_eyeballs_delay=0.25, interleave=1)
    )
    try:
        return await asyncio.shield(racing)
    except asyncio.CancelledError:
        racing.cancel()
        racing.add_done_callback(_close_won)
        raise


def _close_won(racing: asyncio.Future[socket.socket]) -> None:
    if not racing.cancelled() and racing.exception() is None:
        racing.result().close()


async def _send(
    conn: ResponseHandler,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: Body,
) -> asyncio.Task[None] | None:
    """Write the request on `conn`: a body in bytes at once, without waiting for it to
    drain (it is in memory already), a streamed one by a task of its own (returned). Either
    way an upstream that answers before it has read the body is heard."""
    conn.set_response_params(skip_payload=method == "HEAD", read_until_eof=True)
    loop = asyncio.get_running_loop()
    writer = StreamWriter(conn, loop)
    head = headers.copy()  # the caller's are its own: an MCP reply reuses them
    head["Host"] = url.host_port_subcomponent or ""
    if isinstance(body, bytes):
        head["Content-Length"] = str(len(body))
    elif body is None:
        head.popall("Content-Length", None)
        if method not in _NO_LENGTH:
            head["Content-Length"] = "0"
    elif "Content-Length" not in head:  # the caller's declared length goes with its stream
        head["Transfer-Encoding"] = "chunked"
        writer.enable_chunking()
    await writer.write_headers(f"{method} {url.raw_path_qs} HTTP/1.1", head)
    if not isinstance(body, AsyncIterable):
        if body:
            await writer.write(body, drain=False)
        writer.set_eof()
        return None
    return loop.create_task(_upload(conn, writer, body))


async def _upload(conn: ResponseHandler, writer: StreamWriter, body: AsyncIterable[bytes]) -> None:
    """A streamed body, written as it comes; a failure ends the exchange (aiohttp's rule)."""
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        conn.set_exception(aiohttp.ClientOSError(exc.errno, "the request could not be sent"))
    except Exception as exc:  # noqa: BLE001  # the caller's body broke: the exchange ends
        conn.set_exception(exc)


async def _answer(conn: ResponseHandler) -> tuple[RawResponseMessage, aiohttp.StreamReader]:
    """The answer's head and body, past any interim answer but a 101."""
    while True:
        failure: aiohttp.ClientError | None = None
        try:
            message, payload = await conn.read()
        except (EofStream, aiohttp.ServerDisconnectedError) as exc:
            # Closed before an answer began (resent if it may be), or in its middle (never).
            if isinstance(getattr(exc, "message", None), RawResponseMessage):
                failure = aiohttp.ClientConnectionError("the upstream closed mid-answer")
            else:
                failure = aiohttp.ServerDisconnectedError()
        except aiohttp.ClientOSError as exc:
            failure = aiohttp.ClientOSError(exc.errno, "the upstream connection failed")
        except (HttpProcessingError, aiohttp.ClientError):
            failure = aiohttp.ClientConnectionError("the upstream's answer was malformed")
        if failure is not None:
            # Raised here, not in the handler: the parser's errors and a partial answer
            # quote what the upstream sent, which may echo the key.
            raise failure
        if not 100 <= message.code < 200 or message.code == 101:
            return message, payload


def _reusable(
    conn: ResponseHandler,
    message: RawResponseMessage,
    sending: asyncio.Task[None] | None,
    headers: CIMultiDict[str],
    body: Body,
) -> bool:
    """May the next request use `conn`? Only after a final answer read to its end, with no
    close asked either way, the request sent whole and nothing of it left unsent, and not
    after a body answered with an error: the upstream may have refused it before reading
    it, and the bytes the transport still holds (a TLS transport reports none of those its
    socket has not taken) would be read as the next request."""
    transport = conn.transport
    return (
        message.code >= 200
        and (message.code < 400 or not body)
        and not message.should_close
        and not conn.should_close
        and conn.is_connected()
        and transport is not None
        and not transport.get_write_buffer_size()
        and (sending is None or (sending.done() and not sending.cancelled()))
        and headers.get("Connection") != "close"  # keyproxy.outgoing: a body a GET carries
    )


def _drop(conn: ResponseHandler, sending: asyncio.Task[None] | None) -> None:
    if sending is not None and not sending.done():
        sending.cancel()
    conn.close()

"""The forwarding step: send the built request upstream and stream the answer back.

`Forwarder` is one route's, prepared once (its connection pool, keyproxy.pool, which applies
the egress fence to every new connection; its timeouts). `Exchange` is one request's: it owns
the read deadline (a `keyproxy.deadline.Watch`), knows what the upstream answered as soon as it did
(`upstream_status`), and alone knows whether the answer's status line went out. Before that a
failure raises a `RequestError`; after it, the connection is cut (a truncated body must never
look complete) and the `Outcome` says why.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final, NamedTuple, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from keyproxy.config import Route
from keyproxy.deadline import ReadDeadlines, Watch
from keyproxy.errors import (
    BadGateway,
    GatewayTimeout,
    RequestError,
    RequestTimeout,
)
from keyproxy.headers import response_headers
from keyproxy.inject import Rendered, Scrubber, scrub_bytes
from keyproxy.pool import Answer, Pool
from keyproxy.tokens import TaskToken
from keyproxy.tokens.inflight import NOT_WATCHED, UNVERIFIABLE, InFlight

# Response encodings aiohttp's parser decodes, so the scrubber sees clear text. We ask for identity;
# anything else the upstream sends anyway is refused rather than passed through unscrubbed.
DECODED_ENCODINGS: Final = frozenset({"gzip", "deflate"})

# Answers with a declared length up to this size are scrubbed and sent whole.
WHOLE_BODY: Final = 64 * 1024
# Why a caller's task token ends an exchange under way (keyproxy.tokens.inflight), and the
# reason an answer it cuts has in the audit event.
TOKEN_ENDS: Final = {
    "revoked": "token_revoked",
    "expired": "token_expired",
    UNVERIFIABLE: UNVERIFIABLE,
}


class Reshaper(Protocol):
    """Rewrites an answer's bytes before the key scrubber sees them (an MCP route's filter)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...


# Given the upstream's answer, its reshaper, or None to pass the bytes as sent.
Reshape = Callable[[Answer], Reshaper | None]
# The answer's headers as the caller gets them, given them as they go back (an MCP route
# seals its session id).
Rewrite = Callable[[list[tuple[str, str]]], list[tuple[str, str]]]


class Outgoing(NamedTuple):
    """The upstream request, the key injected (`keyproxy.proxy`'s build step), how its
    answer is reshaped before the scrubber (an MCP route's filter; None: as sent) and how
    its headers are rewritten (None: as they go back)."""

    url: URL
    headers: CIMultiDict[str]
    body: bytes | aiohttp.StreamReader | None
    reshape: Reshape | None = None
    rewrite: Rewrite | None = None


class Outcome(NamedTuple):
    """How the forwarding step ended: the answer the caller got, and why it was cut short
    ("" when it was not)."""

    response: web.StreamResponse
    cut: str = ""


class Forwarder:
    """What one route's forwarding needs that does not change per request, prepared once."""

    __slots__ = (
        "connect_timeout",
        "deadlines",
        "first_read",
        "pool",
        "read_timeout",
        "session",
    )

    def __init__(
        self, route: Route, session: aiohttp.ClientSession, pool: Pool, deadlines: ReadDeadlines
    ) -> None:
        self.session = session  # an MCP route's replies to its server
        self.pool = pool
        self.deadlines = deadlines
        self.connect_timeout = route.connect_timeout
        self.read_timeout = route.read_timeout
        self.first_read = route.connect_timeout + route.read_timeout  # connect + first answer


def read_deadlines(routes: Iterable[Route]) -> ReadDeadlines:
    """The read deadlines of the requests to `routes`, swept to within a tenth of the
    shortest read timeout (and a second), but never more often than every 10 ms."""
    shortest = min((r.read_timeout for r in routes), default=10.0)
    return ReadDeadlines(granularity=min(1.0, max(0.01, shortest / 10)))


class Exchange:
    """The forwarding step of one request: send it upstream, stream the answer back, under
    the read deadline of its own `Watch`. What the upstream answered is kept from the moment
    it did (`upstream_status`), for the audit event even of a request that fails after."""

    __slots__ = ("_ends", "_forwarder", "_sent", "_watch", "upstream_status")

    def __init__(
        self,
        forwarder: Forwarder,
        token: TaskToken | None = None,
        inflight: InFlight | None = None,
    ) -> None:
        self._forwarder = forwarder
        # Ended when the caller's task token ends (keyproxy.tokens.inflight).
        self._ends = (
            NOT_WATCHED if token is None or inflight is None else inflight.watching(token, self.end)
        )
        # Until the answer starts: connecting (if a new connection is needed) and waiting.
        self._watch = Watch(forwarder.deadlines, forwarder.read_timeout, forwarder.first_read)
        self.upstream_status: int | None = None
        self._sent: web.StreamResponse | None = None  # once its status line went out

    def end(self, why: str) -> None:
        """The caller's task token ended (`why`, one of TOKEN_ENDS) while this exchange ran:
        it stops now, refused before the answer started (keyproxy.tokens.inflight.InFlight
        .refusal), else the answer is cut."""
        self._watch.end(why)

    async def send(
        self,
        request: web.Request,
        outgoing: Outgoing,
        rendered: Rendered,
        rid: str,
    ) -> Outcome:
        forwarder = self._forwarder
        watch = self._watch
        body = outgoing.body
        try:
            with self._ends, watch:
                async with forwarder.pool.request(
                    request.method,
                    outgoing.url,
                    outgoing.headers,
                    # The caller's pace while uploading is not the upstream's silence.
                    _uploaded(body, watch) if isinstance(body, aiohttp.StreamReader) else body,
                    forwarder.connect_timeout,
                ) as upstream:  # SECURITY: a redirect is an answer, back to the caller
                    watch.heard()
                    self.upstream_status = upstream.status
                    if upstream.status < 200:
                        # SECURITY: a 101 relayed would tell a front proxy to tunnel the
                        # caller's bytes. Until WebSockets are supported on purpose, a 502;
                        # the connection is closed (keyproxy.pool).
                        raise BadGateway(
                            "upstream_protocol_switch", "the upstream tried to switch protocols"
                        )
                    reshape = outgoing.reshape
                    shaper = reshape(upstream) if reshape is not None else None
                    return await self._stream_back(
                        request, upstream, rendered, rid, shaper=shaper, rewrite=outgoing.rewrite
                    )
        except RequestError:
            raise
        except TimeoutError as exc:
            token_ended = TOKEN_ENDS.get(watch.expired)
            if self._sent is not None:
                # The status line is gone: cut the answer short.
                return Outcome(self._sent, _abort(request, token_ended or "upstream_timeout"))
            if token_ended:
                raise self._ends.refusal(watch.expired) from None
            if watch.expired == "caller":
                raise RequestTimeout(
                    "body_timeout", "the request body did not arrive in time"
                ) from exc
            raise GatewayTimeout("upstream_timeout", "the upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:  # the pool raises the fence's refusal itself
            raise BadGateway("upstream_error", "the upstream could not be reached") from exc

    async def _stream_back(
        self,
        request: web.Request,
        upstream: Answer,
        rendered: Rendered,
        rid: str,
        *,
        shaper: Reshaper | None = None,
        rewrite: Rewrite | None = None,
    ) -> Outcome:
        encoding = _decoded_coding(upstream)
        headers = response_headers(upstream.headers, rendered, rid)
        if rewrite is not None:
            headers = rewrite(headers)
        watch = self._watch
        # The upstream's reason phrase is not forwarded: it is free text that could echo the
        # key.
        length = upstream.content_length
        if (
            length is not None
            and length <= WHOLE_BODY
            and not encoding
            and request.method != "HEAD"
        ):
            # A short answer of declared length (and not compressed, which could make it
            # large) is read, scrubbed and sent whole: one write to the caller instead of
            # headers, chunk and end, and a cut-short body is still a 502.
            content = upstream.content
            # Usually it all came with the headers: take it without waiting.
            body = content.read_nowait() if content.is_eof() else await _read_whole(content, watch)
            if shaper is not None:
                body = shaper.feed(body) + shaper.close()
            watch.pause()  # the rest is the caller's turn
            whole = web.Response(
                status=upstream.status, body=scrub_bytes(body, rendered.byte_forms), headers=headers
            )
            # From here an end (a timeout, the token's) cuts the connection: once prepare
            # begins no other answer can replace this one.
            self._sent = whole
            try:  # sent here, so the audit event knows whether it reached the caller
                await whole.prepare(request)
                await whole.write_eof()
            except Exception:  # noqa: BLE001  # whatever broke the write, the answer is the same
                return Outcome(whole, _abort(request))
            return Outcome(whole)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        watch.pause()
        self._sent = response  # as above
        await response.prepare(request)
        watch.heard()
        scrubber = Scrubber(rendered.byte_forms)
        try:
            async for chunk in upstream.content.iter_any():
                out = scrubber.feed(shaper.feed(chunk) if shaper is not None else chunk)
                if out:
                    watch.pause()  # the caller's turn: a slow reader is not a silent upstream
                    await response.write(out)
                watch.heard()
            if upstream.cut_short:  # its end was a reset: the caller must not see it whole
                return Outcome(response, _abort(request))
            watch.pause()
            tail = scrubber.feed(shaper.close()) if shaper is not None else b""
            tail += scrubber.flush()
            if tail:
                await response.write(tail)
            await response.write_eof()
        except Exception:  # noqa: BLE001  # whatever broke the stream, the answer is the same
            return Outcome(response, _abort(request))
        return Outcome(response)


def _decoded_coding(upstream: Answer) -> str:
    """The content coding the parser takes off the answer's body ("" for none), so that the
    scrubber reads the bytes the caller will. SECURITY: any other coding is a 502
    (unsupported_encoding), never passed on unscrubbed: one the parser does not decode, a
    second one (it decodes by the last Content-Encoding line, keyproxy once read the
    first), or a transfer coding but chunked (a `Transfer-Encoding: gzip` is left on)."""
    headers = upstream.headers
    if upstream.compression is None and not (
        "Content-Encoding" in headers or "Transfer-Encoding" in headers
    ):
        return ""  # most answers: nothing to look at
    codings = [
        coding
        for value in headers.getall("Content-Encoding", ())
        for coding in _codings(value)
        if coding != "identity"
    ]
    transfer = [c for v in headers.getall("Transfer-Encoding", ()) for c in _codings(v)]
    # (The parser's coding without a header to say so: its state left over from an earlier
    # answer on the connection, a trailer's.)
    if not codings and upstream.compression is None and all(c == "chunked" for c in transfer):
        return ""
    if (
        len(codings) == 1
        and codings[0] in DECODED_ENCODINGS
        and upstream.compression == codings[0]
        and all(c == "chunked" for c in transfer)
    ):
        return codings[0]
    raise BadGateway("unsupported_encoding", "the upstream answer could not be checked")


def _codings(value: str) -> list[str]:
    """A coding list header's codings, lowercase, without empty members."""
    return [c for c in (part.strip().lower() for part in value.split(",")) if c]


async def _uploaded(content: aiohttp.StreamReader, watch: Watch) -> AsyncIterator[bytes]:
    """The caller's body as it arrives: the upstream is not waited on while the caller
    sends, and is again while it takes each part and once all is sent. A caller silent for
    the read timeout in the middle of its body times the request out (408)."""
    while True:
        watch.caller_turn()
        chunk = await content.readany()
        watch.heard()
        if not chunk:
            return
        yield chunk


async def _read_whole(content: aiohttp.StreamReader, watch: Watch) -> bytes:
    """A short body that did not come with the headers, read as it arrives."""
    parts = []
    while not content.at_eof():
        parts.append(await content.readany())
        watch.heard()
    return b"".join(parts)


def _abort(request: web.Request, reason: str = "stream_aborted") -> str:
    """The status line is gone already: cut the connection, so a truncated body can never
    look complete to the caller. Returns `reason`, the audit event's."""
    if request.transport is not None:
        request.transport.abort()
    return reason

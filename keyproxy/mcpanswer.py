"""An MCP route's answers, filtered before the key scrubber sees them (docs/mcp.md).

    answer_filter(upstream, grant, version, pending, requests=, reply=) -> AnswerFilter | None

List answers keep only granted items (JSON or SSE), and a server stream (SSE, also a GET's)
withholds the server-to-client requests the route does not allow, each answered to the
server with its error (`Reply`) so the server does not wait; a JSON answer holding one is
refused. An answer the filter cannot read is a 502 (`mcp_bad_answer` in the log says why).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import structlog
from aiohttp.helpers import MimeType, parse_mimetype

from keyproxy import mcp
from keyproxy.errors import BadGateway
from keyproxy.pool import Answer

log = structlog.get_logger("keyproxy.mcproute")  # the MCP step's, as operators know it

_JSON = "application/json"
_SSE = "text/event-stream"

# Sends the server the error answer to a server request withheld from the caller.
Reply = Callable[[bytes], None]


def answer_filter(
    upstream: Answer,
    grant: mcp.Grant,
    version: str,
    pending: mcp.Pending,
    *,
    requests: bool,
    reply: Reply | None,
) -> AnswerFilter | None:
    """The filter the upstream's answer passes through, or None when it passes as sent
    (not a 2xx with a body, not an MCP body).

    SECURITY: an answer is judged as the MCP SDKs' clients read it, so that none they
    would read escapes its filter: any 2xx but a 202 (whose body they ignore), its media
    type by prefix, JSON first (Python's); one that the TypeScript client, finding either
    type anywhere in the header, would read another way is refused."""
    if not 200 <= upstream.status < 300 or upstream.status == 202:
        return None
    kind = upstream.content_type
    declared = ", ".join(upstream.headers.getall("Content-Type", ())).lower()
    if (_SSE in declared and not kind.startswith(_SSE)) or (
        _JSON in declared and not kind.startswith((_JSON, _SSE))
    ):
        # SECURITY: the TypeScript SDK's client finds either media type anywhere in the
        # header (event streams first), the Python one by prefix (JSON first): where
        # they read it differently, some client would read what no filter read.
        raise bad_answer("the Content-Type names JSON or an event stream ambiguously")
    if kind.startswith(_JSON):
        # SECURITY: read whatever request it answers: it may hold a server request to
        # withhold. The answer to a body of no request, which no client reads, is not.
        return _Json(grant, version, pending) if requests else None
    if kind.startswith(_SSE):
        if not _utf8(upstream.headers.getall("Content-Type")):
            # SECURITY: the SDK's client (httpx) decodes a stream by its charset, the
            # filter as UTF-8: in UTF-16, bytes it reads as no event are a client's events.
            raise bad_answer("the event stream's charset is not UTF-8")
        return _Stream(mcp.StreamFilter(grant, version, pending), reply)
    return None


def _utf8(content_types: list[str]) -> bool:
    """Whether a message's one Content-Type names no charset but UTF-8 (a reader decoding
    by it reads what keyproxy read)."""
    return len(content_types) == 1 and utf8_charset(parse_mimetype(content_types[0]))


def utf8_charset(kind: MimeType) -> bool:
    charsets = kind.parameters.getall("charset", [])
    return [c.lower() for c in charsets] in ([], ["utf-8"], ["utf8"])  # both UTF-8's names


def bad_answer(why: str) -> BadGateway:
    """The 502 for an answer the filter refuses; why, for the operator, in the log (the
    caller is told only that it could not be read: `why` may quote the server)."""
    log.warning("mcp_bad_answer", why=why)
    return BadGateway("mcp_bad_answer", "the MCP server's answer could not be read")


class AnswerFilter:
    """An answer's bytes in, the bytes for the caller out (before the key scrubber)."""

    def feed(self, chunk: bytes) -> bytes:
        raise NotImplementedError

    def close(self) -> bytes:
        raise NotImplementedError


class _Stream(AnswerFilter):
    """An SSE stream, filtered event by event; each server request withheld from the caller
    is answered to the server (`reply`) with its error, so the server does not wait."""

    def __init__(self, stream: mcp.StreamFilter, reply: Reply | None) -> None:
        self._stream = stream
        self._reply = reply

    def feed(self, chunk: bytes) -> bytes:
        try:
            return self._sent(self._stream.feed(chunk))
        except mcp.MessageError as exc:
            raise bad_answer(exc.message) from None

    def close(self) -> bytes:
        try:
            return self._sent(self._stream.close())
        except mcp.MessageError as exc:
            raise bad_answer(exc.message) from None

    def _sent(self, out: mcp.Output) -> bytes:
        if self._reply is not None:
            for refusal in out.withheld:
                self._reply(json.dumps(refusal.response(), separators=(",", ":")).encode())
        return out.data


class _Json(AnswerFilter):
    """A JSON answer, read whole (within the message limit) and filtered."""

    def __init__(self, grant: mcp.Grant, version: str, pending: mcp.Pending) -> None:
        self._grant = grant
        self._version = version
        self._pending = pending
        self._data = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        self._data += chunk
        if len(self._data) > mcp.DEFAULT_MAX_BYTES:
            raise bad_answer(f"JSON answer larger than {mcp.DEFAULT_MAX_BYTES} bytes")
        return b""

    def close(self) -> bytes:
        try:
            return mcp.filter_json_answer(
                bytes(self._data), self._pending, self._grant, self._version
            )
        except mcp.MessageError as exc:
            raise bad_answer(exc.message) from None
